"""Paired differences from dense (bfloat16) of the RULER runs at 80 samples: per length, the mean
over the 240 samples (3 subtasks x 80) of (configuration - dense) in points, a 95% bootstrap
interval (4,000 resamples of the samples, seed 0) and how many samples changed score. The
512-token runs are 2026-12-06's (../fp8_labels_gpu_2026-12-06/), on the same samples; this
folder's dense run gives the same score on every one of them."""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
OLD = os.path.join(HERE, "..", "fp8_labels_gpu_2026-12-06")


def load(path):
    d = json.load(open(path))
    return {s["id"]: (s["length"], list(s["scores"].values())[0]) for s in d["samples"]}


base = load(os.path.join(HERE, "dense", "ruler.json"))
old_dense = load(os.path.join(OLD, "ruler80_dense.json"))
print("dense here vs 2026-12-06's dense: same score on", sum(base[i][1] == old_dense[i][1] for i in base),
      "of", len(base), "samples")
runs = {
    "exact-512": os.path.join(OLD, "ruler80_exact.json"),
    "rm32-512": os.path.join(OLD, "ruler80_rm32.json"),
    "exact-1k": os.path.join(HERE, "exact-1k", "ruler.json"),
    "dense-f32": os.path.join(HERE, "dense-f32", "ruler.json"),
}
rng = random.Random(0)
for name, path in runs.items():
    other = load(path)
    for length in (2048, 4096, 6144):
        ids = [i for i in base if base[i][0] == length]
        diffs = [100 * (other[i][1] - base[i][1]) for i in ids]
        m = sum(diffs) / len(diffs)
        boots = sorted(sum(rng.choice(diffs) for _ in diffs) / len(diffs) for _ in range(4000))
        print(f"{name:9s} {length // 1024}K diff {m:+.2f}  95% CI [{boots[100]:+.2f}, {boots[3899]:+.2f}]  "
              f"changed {sum(d != 0 for d in diffs)}/{len(diffs)}")
