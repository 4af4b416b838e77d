"""Shared fixtures: the default model loaded once per session, by lserve and by transformers."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on a CPU; this must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_llm():
    """lserve's LLM on the embedded default model (float32, CPU, torch backend)."""
    from lserve import LLM

    return LLM(dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def hf_model():
    """transformers' own model from the same GGUF file: the independent reference."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from lserve.model.loader import default_model_path

    hf_logging.set_verbosity_error()
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one unpadded prompt (stops at EOS like lserve)."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=model.config.eos_token_id,
        )
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="session")
def lserve_server():
    """One `lserve serve` process (default model, CPU) shared by the server tests; stopped at the end."""
    from tests.server_helpers import DEFAULT_ARGS, RemoteServer

    server = RemoteServer(*DEFAULT_ARGS)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's tokenizer (chat template included)."""
    from lserve.engine.tokenizer import load_tokenizer
    from lserve.model.loader import resolve_source

    return load_tokenizer(resolve_source(None, "auto"))


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tmp_path_factory: pytest.TempPathFactory, tokenizer):
    """A tiny random Llama (HF folder, 1,024-token window) with the default model's vocabulary and
    tokenizer, so that commands can build real prompts for it."""
    from tests.helpers_models import hf_config, hf_model, save_hf

    folder = tmp_path_factory.mktemp("tiny_tok")
    save_hf(hf_model(hf_config(vocab_size=len(tokenizer), max_position_embeddings=1024)), folder)
    tokenizer.save_pretrained(str(folder))
    return folder
