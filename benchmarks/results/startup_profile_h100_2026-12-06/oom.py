"""GPU check (issue 17): default memory plan from the start-up profile; max_num_batched_tokens=16384
with the KV cache filled runs without running out of memory. Llama-3-8B shape, dummy weights."""
import logging, sys, time
import torch
from lserve import LLM, SamplingParams
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
kind = sys.argv[1] if len(sys.argv) > 1 else "dense"
extra = {}
if kind != "dense":
    from lserve.sparse.patterns import HeadPattern, save_pattern
    path = save_pattern(HeadPattern(torch.rand((32, 8), generator=torch.Generator().manual_seed(0)), {"method": "random"}),
                        "/tmp/random-heads.json")
    extra = dict(streaming_sparsity=0.5, attn_pattern=str(path), token_budget=4096)
t0 = time.perf_counter()
llm = LLM(model="dummy:llama-3-8b-262k", max_num_batched_tokens=16384, max_model_len=262144, **extra)
core = llm.engine.core
print(f"[{kind}] ready in {time.perf_counter() - t0:.1f} s; pages {core.kv_manager.num_pages} x {core.kv_cache.shape.page_size}"
      f" = {core.kv_manager.num_pages * core.kv_cache.shape.page_size} tokens; seats {core.num_seats}")
free, total = torch.cuda.mem_get_info()
print(f"[{kind}] after start-up: {(total - free) / 2**30:.2f} of {total / 2**30:.2f} GiB in use")
cap = core.kv_manager.num_pages * core.kv_cache.shape.page_size
n = 60000
k = max(1, min(cap // n + 1, 12))  # enough requests to need every page: the scheduler fills the cache, preempts
torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
outs = llm.generate([{"prompt_token_ids": [(i * 7 + j) % 30000 + 10 for j in range(n)]} for i in range(k)],
                    SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
print(f"[{kind}] {k} requests x {n} tokens ({k * n} > {cap} cache tokens) done in {time.perf_counter() - t0:.1f} s; "
      f"peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB; outputs {[len(o.outputs[0].token_ids) for o in outs]}")
free, total = torch.cuda.mem_get_info()
print(f"[{kind}] after the run: {(total - free) / 2**30:.2f} of {total / 2**30:.2f} GiB in use (driver's view)")
