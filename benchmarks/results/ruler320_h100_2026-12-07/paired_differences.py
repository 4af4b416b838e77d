"""Paired differences from dense (bfloat16) of the RULER runs at 320 samples per subtask and
length: per length and per subtask x length, the mean over the samples of (configuration - dense)
in points, a 95% bootstrap interval (4,000 resamples of the samples, seed 0) and how many samples
changed score."""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))


def load(path):
    d = json.load(open(path))
    return {s["id"]: (s["length"], s["id"].split("/")[1], list(s["scores"].values())[0]) for s in d["samples"]}


def interval(diffs, rng):
    boots = sorted(sum(rng.choice(diffs) for _ in diffs) / len(diffs) for _ in range(4000))
    return boots[100], boots[3899]


base = load(os.path.join(HERE, "r320_dense", "ruler.json"))
rng = random.Random(0)
for name in ("rm32", "exact", "rm32-d2", "rm32-1k"):
    other = load(os.path.join(HERE, f"r320_{name}", "ruler.json"))
    for length in (2048, 4096, 6144):
        ids = [i for i in base if base[i][0] == length]
        groups = [("all", ids)] + [(t, [i for i in ids if base[i][1] == t])
                                   for t in ("niah_multikey", "niah_multivalue", "niah_multiquery")]
        for label, sel in groups:
            diffs = [100 * (other[i][2] - base[i][2]) for i in sel]
            lo, hi = interval(diffs, rng)
            print(f"{name:7s} {length // 1024}K {label:15s} diff {sum(diffs) / len(diffs):+.2f}  "
                  f"95% CI [{lo:+.2f}, {hi:+.2f}]  changed {sum(d != 0 for d in diffs)}/{len(diffs)}")
