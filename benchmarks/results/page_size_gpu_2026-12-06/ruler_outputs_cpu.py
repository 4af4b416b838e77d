"""What selection gets wrong on RULER multi-query / multi-value at 4K: outputs side by side (CPU, float32)."""
import json, sys
from lserve import LLM
from lserve.eval.ruler import make_ruler_samples
from lserve.eval.sample import PromptFormat
from lserve.eval.system import load_tokenizer_for
from lserve.eval.runner import run_with_llm
from lserve.eval.scoring import score
base = {"dtype": "float32", "device": "cpu", "max_num_seqs": 16}
fmt = PromptFormat(load_tokenizer_for(base), chat=None)
samples = make_ruler_samples(fmt, [4096], ["niah_multiquery", "niah_multivalue"], 10, 0)
B = dict(token_budget=512, page_score="rope_mass", selector_interval=1, selection_local_tokens=128)
configs = {"dense": {}, "p16": {**B, "page_size": 16}, "p16-b2048": {**B, "page_size": 16, "token_budget": 2048}}
outs = {}
for name, extra in configs.items():
    llm = LLM(**base, **extra)
    outs[name] = run_with_llm(llm, samples, name)
    del llm
rows = []
for i, s in enumerate(samples):
    row = {"id": s.sample_id, "answers": s.answers}
    for name in configs:
        row[name] = outs[name][i]
        row[name + "_score"] = score(s.scorer, outs[name][i], s.answers)
    rows.append(row)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
for name in configs:
    print(name, sum(r[name + "_score"] for r in rows) / len(rows))
for r in rows:
    if r["dense_score"] != r["p16_score"]:
        print(r["id"], r["answers"], "\n  dense:", repr(r["dense"][:200]), r["dense_score"], "\n  p16:  ", repr(r["p16"][:200]), r["p16_score"], "\n  2048: ", repr(r["p16-b2048"][:200]), r["p16-b2048_score"])
