"""FP8 weights (`quantization="fp8"`): the format, the kernels against the PyTorch reference,
the engine, and the error where FP8 matrix products are missing.

The kernels (the activation quantizer and the one-row GEMV with FP8 weights) run under Triton's
interpreter on the CPU and natively on a GPU; the multi-row product goes through
`torch._scaled_mm`, which the CPU build of torch has as well.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch

from lserve import LLM, SamplingParams
from lserve.errors import NotSupportedError
from lserve.kv_cache.fp8 import FP8_DTYPE, quantize
from lserve.model.layers import GatedMLP, Linear
from lserve.ops.fp8_linear import (
    check_fp8_matmul,
    fp8_linear,
    fp8_linear_reference,
    quantize_activations,
    quantize_activations_kernel,
    quantize_weight,
)
from lserve.ops.gemv import gemv
from tests.helpers_models import has_fp8_matmul, hf_config, hf_model, random_ids, save_hf, save_word_tokenizer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


cpu_fp8 = pytest.mark.skipif(not has_fp8_matmul(torch.device("cpu")),
                             reason="this CPU build of torch has no FP8 products with per-row scales (2.13 has)")


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_weights_get_a_power_of_two_scale_per_output_channel() -> None:
    w = _randn(40, 96, seed=1) * torch.logspace(-3, 2, 40)[:, None]  # rows five decades apart
    w[7] = 0.0
    values, scales = quantize_weight(w)
    assert values.dtype == FP8_DTYPE and values.shape == (40, 96) and scales.shape == (40,)
    assert scales.dtype == torch.float32
    mantissa, _ = torch.frexp(scales)
    assert torch.all(mantissa == 0.5)  # powers of two
    row_max = values.float().abs().amax(1)
    nonzero = torch.arange(40) != 7
    assert torch.all(row_max[nonzero] >= 224) and torch.all(row_max <= 448)  # E4M3's top binade is used
    back = values.float() * scales[:, None]
    rel = ((back - w).abs() / w.abs().amax(1, keepdim=True).clamp(min=1e-30))[nonzero]
    assert rel.max() <= 2.0**-4  # half a unit of a 3-bit mantissa, relative to the row's largest element
    assert torch.all(back[7] == 0)


@pytest.mark.parametrize("rows,k", [(1, 16), (37, 1000), (5, 4100), (3, 13)])
def test_the_activation_kernel_writes_the_reference_bytes(rows: int, k: int) -> None:
    """Odd sizes (a K that crosses the 4096-wide tile), rows of very different magnitude, a zero row."""
    x = _randn(rows, k, seed=rows + k) * torch.logspace(-6, 4, rows)[:, None]
    x[rows // 2] = 0.0
    x = x.to(DEVICE)
    values, scales = quantize_activations_kernel(x)
    want_values, want_scales = quantize(x)
    assert scales.shape == (rows, 1)
    assert torch.equal(scales[:, 0], want_scales)
    assert torch.equal(values.view(torch.uint8), want_values.view(torch.uint8))
    v2, s2 = quantize_activations(x)
    assert torch.equal(v2.view(torch.uint8), want_values.view(torch.uint8)) and torch.equal(s2, scales)


def _w8a16(x: torch.Tensor, w8: torch.Tensor, ws: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """The one-row GEMV's product: x as it is times the dequantized weight, in float32."""
    out = x.float() @ (w8.float() * ws[:, None]).T
    return out + b.float() if b is not None else out


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("n,k", [(37, 100), (70, 333)])
@pytest.mark.parametrize("bias", [False, True])
def test_the_gemv_reads_fp8_weights(rows: int, n: int, k: int, bias: bool) -> None:
    w8, ws = quantize_weight(_randn(n, k, seed=n + k))
    x = _randn(rows, k, seed=rows, scale=3.0)
    b = _randn(n, seed=9) if bias else None
    got = gemv(x.to(DEVICE), w8.to(DEVICE), b.to(DEVICE) if b is not None else None, block_n=16, block_k=32,
               weight_scale=ws.to(DEVICE)).cpu()
    torch.testing.assert_close(got, _w8a16(x, w8, ws, b), rtol=1e-5, atol=1e-4)
    # negative checks: the product is neither the unquantized weight's nor one without the scales
    assert (got - x @ _randn(n, k, seed=n + k).T - (b if b is not None else 0)).abs().max() > 1e-3
    assert (got - _w8a16(x, w8, torch.ones_like(ws), b)).abs().max() > 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gated_gemv_with_fp8_weights(dtype: torch.dtype) -> None:
    """[gate | up] quantized as one weight: each half's rows keep their own scales."""
    inter, k = 45, 160
    w = torch.cat([_randn(inter, k, seed=1), _randn(inter, k, seed=2, scale=40.0)])
    w8, ws = quantize_weight(w)
    x = _randn(2, k, seed=3).to(dtype)
    gate, up = _w8a16(x, w8, ws).chunk(2, dim=-1)
    gate, up = gate.to(dtype).float(), up.to(dtype).float()
    want = (torch.nn.functional.silu(gate).to(dtype).float() * up).to(dtype)
    got = gemv(x.to(DEVICE), w8.to(DEVICE), gated=True, weight_scale=ws.to(DEVICE), block_k=64)
    # bfloat16: the gate, its SiLU and the product are each rounded (a few units of 2**-8 apart)
    tol = 1e-4 if dtype == torch.float32 else 4e-2  # (float32: sums of 160 products, in another order)
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=tol, atol=tol * 10)


def test_the_gemv_rejects_bad_fp8_arguments() -> None:
    w8, ws = quantize_weight(torch.ones(16, 32))
    x = torch.ones(1, 32, device=DEVICE)
    with pytest.raises(ValueError, match="E4M3"):
        gemv(x, w8.float().to(DEVICE), weight_scale=ws.to(DEVICE))
    with pytest.raises(ValueError, match="scales"):
        gemv(x, w8.to(DEVICE), weight_scale=ws[:8].to(DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        gemv(x, w8.to(DEVICE))


@pytest.mark.skipif(not has_fp8_matmul(DEVICE), reason="no FP8 products with per-row scales here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_scaled_mm_product_matches_the_reference(dtype: torch.dtype) -> None:
    w8, ws = quantize_weight(_randn(48, 80, seed=4))
    x = _randn(3, 5, 80, seed=5, scale=2.0).to(dtype).to(DEVICE)
    b = _randn(48, seed=6).to(dtype).to(DEVICE)
    out_dtype = check_fp8_matmul(DEVICE, dtype)
    got = fp8_linear(x, w8.to(DEVICE), ws.to(DEVICE), b, out_dtype)
    assert got.shape == (3, 5, 48) and got.dtype == dtype
    want = fp8_linear_reference(x.cpu(), w8, ws, b.cpu())
    # float32 out: the same exact products, summed in another order (on a GPU perhaps with fewer bits)
    tol = (1e-5 if not got.is_cuda else 1e-3) if out_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=tol, atol=tol * 10)


@cpu_fp8
def test_a_quantized_linear_and_mlp_match_the_reference() -> None:
    torch.manual_seed(0)
    lin = Linear(64, 32, bias=True)
    mlp = GatedMLP(64, 48)
    x = torch.randn(7, 64)
    with torch.no_grad():
        want_lin = fp8_linear_reference(x, *quantize_weight(lin.weight), lin.bias)
        gu = fp8_linear_reference(x, *quantize_weight(mlp.gate_up_proj.weight))
        gate, up = gu.chunk(2, dim=-1)
        want_mlp = fp8_linear_reference(torch.nn.functional.silu(gate) * up, *quantize_weight(mlp.down_proj.weight))
        for module in (lin, mlp.gate_up_proj, mlp.down_proj):
            module.quantize_fp8_(torch.float32)
        assert lin.weight.dtype == FP8_DTYPE and lin.weight_scale is not None
        torch.testing.assert_close(lin(x), want_lin, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mlp(x), want_mlp, rtol=1e-5, atol=1e-5)


def test_no_fp8_matmul_is_a_clear_error_before_loading(monkeypatch: pytest.MonkeyPatch, tiny_qwen: Path) -> None:
    def missing(*args, **kwargs):
        raise RuntimeError("torch._scaled_mm is only supported on CUDA devices with compute capability >= 9.0")

    monkeypatch.setattr(torch, "_scaled_mm", missing)
    with pytest.raises(NotSupportedError, match="compute capability 8.9 or newer.*only supported"):
        check_fp8_matmul(torch.device("cpu"), torch.float32)
    with mock.patch("lserve.model.loader.load_named_tensors") as load, \
            pytest.raises(NotSupportedError, match="quantization='fp8' needs FP8 matrix products"):
        LLM(model=str(tiny_qwen), quantization="fp8", device="cpu")
    load.assert_not_called()


def test_the_cli_prints_one_line_for_missing_fp8(monkeypatch: pytest.MonkeyPatch, capsys, tiny_qwen: Path) -> None:
    from lserve.cli import main

    monkeypatch.setattr(torch, "_scaled_mm", mock.Mock(side_effect=RuntimeError("no fp8 here")))
    assert main(["generate", "--model", str(tiny_qwen), "--prompt", "hi", "--quantization", "fp8",
                 "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "needs FP8 matrix products" in err and "Traceback" not in err


def test_the_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="quantization='int4' is not one of None, 'fp8'"):
        LLM(quantization="int4")


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 (q/k/v biases) with a word tokenizer."""
    folder = save_hf(hf_model(hf_config("qwen2"), seed=3), tmp_path_factory.mktemp("fp8w") / "model")
    save_word_tokenizer(folder)
    return folder


def _prompt_logprobs(llm: LLM, ids: list[int]) -> torch.Tensor:
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    return torch.tensor([next(iter(e.values())).logprob for e in out.prompt_logprobs[1:]])


def _reference_llm(**kw) -> LLM:
    """An engine whose linear layers compute `fp8_linear_reference` on the quantized weights."""
    llm = LLM(**kw)
    with torch.no_grad():
        for m in llm.engine.core.model.modules():
            if isinstance(m, Linear):
                w8, ws = quantize_weight(m.weight)
                m.forward = (lambda x, m=m, w8=w8, ws=ws: fp8_linear_reference(x, w8, ws, m.bias))
    return llm


@cpu_fp8
def test_the_engine_quantizes_every_decoder_linear_and_computes_the_reference(tiny_qwen: Path) -> None:
    """Each decoder linear layer is E4M3 (embedding and LM head are not); a prompt's log-probabilities,
    in chunks through the KV cache, equal a model whose linear layers compute the reference."""
    ids = random_ids(70, seed=2).tolist()
    kw = dict(model=str(tiny_qwen), dtype="float32", device="cpu", max_num_batched_tokens=32, page_size=16)
    llm = LLM(quantization="fp8", **kw)
    model = llm.engine.core.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 4 * 2 and all(m.weight.dtype == FP8_DTYPE for m in linears)
    assert model.embed_tokens.weight.dtype == torch.float32
    got = _prompt_logprobs(llm, ids)
    torch.testing.assert_close(got, _prompt_logprobs(_reference_llm(**kw), ids), rtol=1e-4, atol=1e-4)
    plain = _prompt_logprobs(LLM(**kw), ids)
    assert (got - plain).abs().max() > 1e-4  # the weights really are quantized


@cpu_fp8
def test_the_default_model_keeps_its_greedy_text_with_fp8_weights_and_kv(default_llm: LLM) -> None:
    fp8 = LLM(dtype="float32", device="cpu", quantization="fp8", kv_cache_dtype="fp8", num_kv_pages=64)
    prompts = ["The capital of France is", "List three colours:"]
    params = SamplingParams(temperature=0, max_tokens=8)
    want = [o.outputs[0].token_ids for o in default_llm.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in fp8.generate(prompts, params, use_tqdm=False)]
    assert [g[:4] for g in got] == [w[:4] for w in want]


@gpu
def test_fp8_weights_on_the_gpu_with_graphs_and_the_gemv(tiny_qwen: Path) -> None:
    """bfloat16 on the GPU: prefill (scaled_mm) gives the prompt log-probabilities of the reference
    within bfloat16 error; batch-1 decode steps (the GEMV, in CUDA graphs) give the eager steps'
    tokens, and their log-probabilities are the reference's."""
    ids = random_ids(70, seed=2).tolist()
    kw = dict(model=str(tiny_qwen), max_num_batched_tokens=32, page_size=16, dtype="bfloat16", device="cuda")
    llm = LLM(quantization="fp8", **kw)
    assert llm.engine.core.model.layers[0].mlp.down_proj.weight.dtype == FP8_DTYPE
    torch.testing.assert_close(_prompt_logprobs(llm, ids), _prompt_logprobs(_reference_llm(**kw), ids),
                               rtol=0.05, atol=0.15)
    prompts = [{"prompt_token_ids": random_ids(n, seed=n).tolist()} for n in (40, 9, 23)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    graphs = [o.outputs[0].token_ids for o in llm.generate(prompts[:1], params, use_tqdm=False)]
    eager = LLM(quantization="fp8", enforce_eager=True, **kw)
    assert [o.outputs[0].token_ids for o in eager.generate(prompts[:1], params, use_tqdm=False)] == graphs
    assert [len(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)] == [12] * 3
