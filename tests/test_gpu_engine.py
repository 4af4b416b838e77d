"""The engine on a CUDA GPU with the Triton backend (the default there): a smoke run on dummy weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lserve import LLM, SamplingParams

pytestmark = pytest.mark.gpu

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32,
    "vocab_size": 1000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "eos_token_id": 2,
}


def test_triton_backend_runs_the_engine(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    llm = LLM(str(tmp_path), load_format="dummy", dtype="bfloat16", num_kv_pages=200, max_num_batched_tokens=512)
    core = llm.engine.core
    assert core.backend_name == "triton"
    prompts = [[(7 * i + j) % 900 + 10 for j in range(n)] for i, n in enumerate((5, 700, 129, 1500))]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [20] * 4
    assert core.kv_manager.num_free_pages == core.kv_manager.num_pages
