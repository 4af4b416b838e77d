"""CPU float32: multivalue 4K samples that the GPU selections lost, at several budgets with exact scores."""
import sys, time, json
from lserve import LLM, SamplingParams
from lserve.eval.sample import PromptFormat
from lserve.eval.system import load_tokenizer_for
from lserve.eval.ruler import make_ruler_samples
from lserve.eval.scoring import score

base = {}
fmt = PromptFormat(load_tokenizer_for(base), chat=None)
samples = make_ruler_samples(fmt, [4096], ["niah_multivalue"], 19, 0)
pick = [int(x) for x in sys.argv[1].split(",")]
samples = [s for s in samples if s.index in pick]
B = "page_score=rope_mass,selector_interval=1,page_size=16,selection_local_tokens=128,score_channels=64"
extra = dict(kv.split("=") for kv in sys.argv[3].split(",")) if len(sys.argv) > 3 else {}
extra = {k: int(v) for k, v in extra.items()}
configs = {"dense": {}}
for b in [int(x) for x in sys.argv[2].split(",")]:
    configs[f"exact-{b}"] = dict(page_score="rope_mass", selector_interval=1, page_size=16,
                                 selection_local_tokens=128, score_channels=64, token_budget=b, **extra)
res = {}
for name, kw in configs.items():
    t = time.time()
    llm = LLM(dtype="float32", max_num_seqs=8, **kw)
    outs = llm.generate([{"prompt_token_ids": s.prompt_ids} for s in samples],
                        SamplingParams(temperature=0, max_tokens=samples[0].max_tokens), use_tqdm=False)
    for s, o in zip(samples, outs):
        text = o.outputs[0].text
        res.setdefault(s.index, {})[name] = (score(s.scorer, text, s.answers), text[:90].replace("\n", " | "))
    print(f"{name} done in {time.time() - t:.0f}s", flush=True)
    del llm
for i, r in res.items():
    print(i)
    for name, (sc, txt) in r.items():
        print(f"  {name:10s} {sc:.2f}  {txt}")
