"""Model loaders end to end against transformers: HF folders (plain, sharded, Qwen2, Mistral, tied,
rope scaling), GGUF files (F32 and quantised, llama.cpp's q/k permutation), dummy weights and errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers_models import (  # noqa: E402
    LLAMA3_ROPE,
    hf_config,
    hf_logits,
    hf_model,
    llamacpp_llama3_rope_factors,
    load_lserve,
    lserve_logits,
    random_ids,
    save_hf,
    write_llama_gguf,
)

from lserve.errors import ModelLoadError  # noqa: E402
from lserve.model.config import ArchConfig  # noqa: E402
from lserve.model.layers import rope_inv_freq  # noqa: E402
from lserve.model.loader import load_model, read_arch_config, resolve_source  # noqa: E402

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

ATOL = 1e-4
RTOL = 1e-4
SEQ = 37  # odd on purpose


def assert_logits_match(ours: torch.Tensor, ref: torch.Tensor, atol: float = ATOL) -> None:
    assert ours.shape == ref.shape
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=atol, rtol=RTOL)


@pytest.fixture(scope="module")
def llama_ref(tmp_path_factory: pytest.TempPathFactory):
    """One random tiny Llama, saved once as an HF folder; reused by several tests."""
    model = hf_model(hf_config("llama"), seed=0)
    folder = save_hf(model, tmp_path_factory.mktemp("llama"))
    return model, folder


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return random_ids(SEQ)


# --- Hugging Face folders ---------------------------------------------------------------------------


def test_hf_llama_folder_matches_transformers(llama_ref, ids) -> None:
    ref, folder = llama_ref
    source = resolve_source(str(folder), "auto")
    assert source.load_format == "hf"
    arch, factors = read_arch_config(source)
    assert factors is None
    assert (arch.architecture, arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (
        "LlamaForCausalLM", 2, 4, 2, 16,
    )
    assert arch.vocab_size == 300 and arch.intermediate_size == 96 and arch.rope_type == "default"
    assert not arch.tie_word_embeddings and not arch.attention_bias
    assert arch.eos_token_ids == (2,) and arch.bos_token_id == 1
    model = load_model(source, arch, factors, torch.float32, torch.device("cpu"))
    assert model.lm_head is not None
    assert_logits_match(lserve_logits(model, ids), hf_logits(ref, ids))


def test_hf_offset_positions(llama_ref) -> None:
    """Positions are honoured (not assumed to start at 0): compare with transformers' position_ids."""
    ref, folder = llama_ref
    model = load_lserve(folder)
    ids = random_ids(SEQ, seed=5)
    positions = torch.arange(SEQ) + 100
    positions[SEQ // 2 :] += 60  # a gap: a uniform shift alone would not change RoPE's relative angles
    ours = lserve_logits(model, ids, positions)
    with torch.no_grad():
        theirs = ref(input_ids=ids[None], position_ids=positions[None]).logits[0].float()
    assert_logits_match(ours, theirs)
    assert not torch.allclose(ours, lserve_logits(model, ids), atol=1e-2)


def test_hf_prefix_logits_are_consistent(llama_ref) -> None:
    """Each prefix's last-row logits equal the full sequence's row (causality end to end)."""
    ref, folder = llama_ref
    model = load_lserve(folder)
    ids = random_ids(5, seed=7)
    ours = lserve_logits(model, ids)
    theirs = hf_logits(ref, ids)
    for n in range(1, 6):
        assert_logits_match(lserve_logits(model, ids[:n])[-1], theirs[n - 1])
    assert_logits_match(ours, theirs)


def test_hf_sharded_safetensors(tmp_path, llama_ref, ids) -> None:
    ref, _ = llama_ref
    folder = save_hf(ref, tmp_path / "sharded", max_shard_size="50KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 3, shards
    assert not (folder / "model.safetensors").exists()
    model = load_lserve(folder)
    assert_logits_match(lserve_logits(model, ids), hf_logits(ref, ids))


@pytest.mark.parametrize(
    ("family", "tied"),
    [("llama", True), ("qwen2", False), ("qwen2", True), ("mistral", False), ("mistral", True)],
)
def test_hf_families_match_transformers(tmp_path, ids, family: str, tied: bool) -> None:
    ref = hf_model(hf_config(family, tie_word_embeddings=tied), seed=3)
    folder = save_hf(ref, tmp_path / family)
    arch, _ = read_arch_config(resolve_source(str(folder), "auto"))
    assert arch.tie_word_embeddings is tied
    assert arch.attention_bias is (family == "qwen2")
    assert arch.sliding_window is None
    model = load_lserve(folder)
    assert (model.lm_head is None) is tied
    if tied:
        # One shared matrix, and the checkpoint really had no separate head.
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            assert "lm_head.weight" not in set(f.keys())
    if family == "qwen2":
        bias = model.layers[0].self_attn.qkv_proj.bias
        assert bias is not None and bias.abs().sum() > 0
    assert_logits_match(lserve_logits(model, ids), hf_logits(ref, ids))


def test_hf_head_dim_override(tmp_path, ids) -> None:
    """head_dim given explicitly (not hidden/heads), as in Qwen3-style/Mistral-Nemo configs."""
    ref = hf_model(hf_config("mistral", head_dim=8), seed=4)
    folder = save_hf(ref, tmp_path / "hd")
    model = load_lserve(folder)
    assert model.config.head_dim == 8
    assert_logits_match(lserve_logits(model, ids), hf_logits(ref, ids))


def test_hf_bf16_checkpoint_loads_into_float32(tmp_path, llama_ref, ids) -> None:
    ref, _ = llama_ref
    import copy

    bf = copy.deepcopy(ref).to(torch.bfloat16)
    folder = save_hf(bf, tmp_path / "bf16")
    model = load_lserve(folder, dtype=torch.float32)
    assert model.layers[0].mlp.gate_up_proj.weight.dtype == torch.float32
    # Reference: the float32 model with its weights rounded to bf16 (not `bf.float()`: that would
    # also have rounded transformers' rotary inv_freq buffer).
    ref32 = copy.deepcopy(ref)
    with torch.no_grad():
        for p in ref32.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    assert_logits_match(lserve_logits(model, ids), hf_logits(ref32, ids))


# --- rope scaling -----------------------------------------------------------------------------------


def _hf_rope_inv_freq(config) -> torch.Tensor:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = config.rope_parameters["rope_type"]
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    assert attention_factor == 1.0
    return inv_freq.float()


@pytest.mark.parametrize(
    "rope",
    [LLAMA3_ROPE, {**LLAMA3_ROPE, "rope_theta": 500000.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0},
     {"rope_type": "linear", "factor": 2.5}],
    ids=["llama3", "llama3-theta5e5", "linear"],
)
def test_rope_inv_freq_matches_transformers(rope) -> None:
    rope = dict(rope)
    theta = rope.pop("rope_theta", 10000.0)
    config = hf_config("llama", rope_parameters={**rope, "rope_theta": theta})
    ours = rope_inv_freq(16, theta, rope)
    theirs = _hf_rope_inv_freq(config)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=1e-6)
    # The llama3 case must exercise all three regimes (kept, ramped, slowed) at head_dim 16.
    if rope["rope_type"] == "llama3" and theta == 10000.0:
        base = rope_inv_freq(16, theta, None)
        ratio = (base / ours).tolist()
        assert ratio[0] == pytest.approx(1.0)
        assert any(1.0 < r < rope["factor"] - 1e-3 for r in ratio)
        assert ratio[-1] == pytest.approx(rope["factor"])


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
def test_arch_config_reads_llama3_rope_both_spellings(key) -> None:
    """transformers 5 writes `rope_parameters` (with rope_theta inside); 4.x wrote `rope_scaling`."""
    cfg = {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 96, "num_hidden_layers": 2, "vocab_size": 300,
    }
    if key == "rope_parameters":
        cfg[key] = {**LLAMA3_ROPE, "rope_theta": 500000.0}
    else:
        cfg[key] = dict(LLAMA3_ROPE)
        cfg["rope_theta"] = 500000.0
    arch = ArchConfig.from_hf_dict(cfg)
    assert arch.rope_type == "llama3"
    assert arch.rope_theta == 500000.0
    assert "rope_theta" not in (arch.rope_scaling or {})
    assert arch.rope_scaling["original_max_position_embeddings"] == 64


def test_hf_llama31_rope_scaling_end_to_end(tmp_path) -> None:
    config = hf_config("llama", rope_parameters={**LLAMA3_ROPE, "rope_theta": 10000.0})
    ref = hf_model(config, seed=5)
    folder = save_hf(ref, tmp_path / "llama31")
    saved = json.loads((folder / "config.json").read_text())
    assert (saved.get("rope_parameters") or saved.get("rope_scaling"))["rope_type"] == "llama3"
    model = load_lserve(folder)
    assert model.config.rope_type == "llama3"
    torch.testing.assert_close(model.rotary.inv_freq, ref.model.rotary_emb.inv_freq.float(), atol=0, rtol=1e-6)
    torch.testing.assert_close(model.rotary.inv_freq, _hf_rope_inv_freq(config), atol=0, rtol=1e-6)
    ids = random_ids(150, seed=11)  # positions well past original_max_position_embeddings=64
    assert_logits_match(lserve_logits(model, ids), hf_logits(ref, ids))
    # Scaling really matters for this model: unscaled frequencies give different logits.
    plain = load_lserve(folder)
    plain.rotary.inv_freq = rope_inv_freq(16, 10000.0, None)
    assert not torch.allclose(lserve_logits(plain, ids), hf_logits(ref, ids), atol=1e-2)


def test_hf_linear_rope_scaling_end_to_end(tmp_path, ids) -> None:
    config = hf_config("llama", rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    ref = hf_model(config, seed=6)
    model = load_lserve(save_hf(ref, tmp_path / "linear"))
    assert_logits_match(lserve_logits(model, ids), hf_logits(ref, ids))


# --- GGUF -------------------------------------------------------------------------------------------


def test_gguf_f32_matches_transformers(tmp_path, llama_ref, ids) -> None:
    ref, _ = llama_ref
    path = write_llama_gguf(ref, tmp_path / "tiny-f32.gguf")
    source = resolve_source(str(path), "auto")
    assert source.load_format == "gguf" and source.name == "tiny-f32"
    arch, factors = read_arch_config(source)
    assert factors is None
    assert (arch.architecture, arch.vocab_size, arch.hidden_size, arch.intermediate_size) == (
        "LlamaForCausalLM", 300, 64, 96,
    )
    assert (arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (2, 4, 2, 16)
    assert arch.max_position_embeddings == 256 and arch.rope_theta == 10000.0
    assert arch.rms_norm_eps == pytest.approx(ref.config.rms_norm_eps)
    assert arch.eos_token_ids == (2,) and arch.bos_token_id == 1
    assert not arch.tie_word_embeddings
    model = load_model(source, arch, factors, torch.float32, torch.device("cpu"))
    assert_logits_match(lserve_logits(model, ids), hf_logits(ref, ids))
    # Same parameters as the HF-folder load, bit for bit (F32 round trip, exact un-permute).
    hf_loaded = load_lserve(llama_ref[1])
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), hf_loaded.named_parameters(), strict=True):
        assert n1 == n2
        assert torch.equal(p1, p2), n1


def test_gguf_without_unpermute_would_differ(tmp_path, llama_ref, ids) -> None:
    """Guard that the test above is meaningful: writing q/k un-permuted changes the logits."""
    ref, _ = llama_ref
    from lserve.model import gguf_loader

    path = write_llama_gguf(ref, tmp_path / "tiny.gguf")
    original = gguf_loader._unpermute
    try:
        gguf_loader._unpermute = lambda w, n: w
        wrong = load_lserve(path)
    finally:
        gguf_loader._unpermute = original
    assert not torch.allclose(lserve_logits(wrong, ids), hf_logits(ref, ids), atol=1e-2)


def test_gguf_tied_and_vocab_size_key(tmp_path, ids) -> None:
    ref = hf_model(hf_config("llama", tie_word_embeddings=True), seed=8)
    path = write_llama_gguf(ref, tmp_path / "tied.gguf", with_vocab_list=False)
    model = load_lserve(path)
    assert model.config.tie_word_embeddings and model.lm_head is None
    assert model.config.vocab_size == 300
    assert_logits_match(lserve_logits(model, ids), hf_logits(ref, ids))


def test_gguf_mha_no_gqa(tmp_path, ids) -> None:
    ref = hf_model(hf_config("llama", num_key_value_heads=4), seed=9)
    model = load_lserve(write_llama_gguf(ref, tmp_path / "mha.gguf"))
    assert model.config.num_kv_heads == 4
    assert_logits_match(lserve_logits(model, ids), hf_logits(ref, ids))


def test_gguf_qwen2_biases_unpermuted(tmp_path, ids) -> None:
    """arch 'qwen2' GGUFs are not permuted by llama.cpp and carry q/k/v biases."""
    ref = hf_model(hf_config("qwen2", tie_word_embeddings=True), seed=13)
    path = write_llama_gguf(ref, tmp_path / "qwen2.gguf", arch="qwen2")
    model = load_lserve(path)
    assert model.config.architecture == "Qwen2ForCausalLM"
    assert model.config.attention_bias and model.config.tie_word_embeddings
    assert_logits_match(lserve_logits(model, ids), hf_logits(ref, ids))


def test_gguf_qwen3_qk_norms(tmp_path, ids) -> None:
    """arch 'qwen3' GGUFs carry per-head q/k norms (attn_q_norm / attn_k_norm), unpermuted."""
    ref = hf_model(hf_config("qwen3", head_dim=24), seed=14)
    path = write_llama_gguf(ref, tmp_path / "qwen3.gguf", arch="qwen3")
    model = load_lserve(path)
    assert model.config.architecture == "Qwen3ForCausalLM" and model.config.head_dim == 24
    assert_logits_match(lserve_logits(model, ids), hf_logits(ref, ids))


def test_gguf_llama3_rope_freqs_tensor(tmp_path) -> None:
    """Llama 3.1 GGUFs carry scaling as rope_freqs.weight divisors; logits must match HF's llama3 rope."""
    config = hf_config("llama", rope_parameters={**LLAMA3_ROPE, "rope_theta": 10000.0})
    ref = hf_model(config, seed=10)
    factors = llamacpp_llama3_rope_factors(16, 10000.0, LLAMA3_ROPE)
    path = write_llama_gguf(ref, tmp_path / "l31.gguf", rope_factors=factors)
    source = resolve_source(str(path), "gguf")
    arch, got = read_arch_config(source)
    assert got is not None and np.allclose(got.numpy(), factors)
    model = load_model(source, arch, got, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(model.rotary.inv_freq, ref.model.rotary_emb.inv_freq.float(), atol=0, rtol=1e-5)
    ids = random_ids(150, seed=12)
    assert_logits_match(lserve_logits(model, ids), hf_logits(ref, ids))


@pytest.mark.parametrize("qtype", ["Q8_0", "F16"])
def test_gguf_quantised_close_to_f32(tmp_path, llama_ref, ids, qtype: str) -> None:
    ref, _ = llama_ref
    q = getattr(gguf.GGMLQuantizationType, qtype)
    f32 = load_lserve(write_llama_gguf(ref, tmp_path / "f32.gguf"))
    path = write_llama_gguf(ref, tmp_path / f"{qtype}.gguf", quant=q)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == q and types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    quant = load_lserve(path)
    for p in quant.parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
    a, b = lserve_logits(quant, ids), lserve_logits(f32, ids)
    rel = (a - b).abs().max() / b.abs().max()
    assert rel < 0.03, rel
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    # Dequantised q/k still un-permuted correctly: per-weight error is quantisation-sized.
    wq = quant.layers[0].self_attn.qkv_proj.weight
    wf = f32.layers[0].self_attn.qkv_proj.weight
    assert (wq - wf).abs().max() < 0.02 * wf.abs().max()


# --- dummy weights ----------------------------------------------------------------------------------


@pytest.fixture()
def config_dir(tmp_path) -> Path:
    hf_config("qwen2").save_pretrained(str(tmp_path))
    assert not list(tmp_path.glob("*.safetensors"))
    return tmp_path


def test_dummy_weights(config_dir, ids) -> None:
    a = load_lserve(config_dir, "dummy", seed=0)
    b = load_lserve(config_dir / "config.json", "dummy", seed=0)
    c = load_lserve(config_dir, "dummy", seed=1)
    assert a.config.architecture == "Qwen2ForCausalLM"
    params_a, params_b, params_c = dict(a.named_parameters()), dict(b.named_parameters()), dict(c.named_parameters())
    assert params_a.keys() == params_b.keys() == params_c.keys()
    for name, p in params_a.items():
        assert p.dtype == torch.float32 and p.device.type == "cpu"
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, params_b[name]), name
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert not torch.equal(p, params_c[name]), name
            assert 0.005 < p.float().std() < 0.05, name
    logits = lserve_logits(a, ids)
    assert logits.shape == (SEQ, 300) and torch.isfinite(logits).all()


def test_dummy_bfloat16(config_dir, ids) -> None:
    prev = torch.get_default_dtype()
    model = load_lserve(config_dir, "dummy", dtype=torch.bfloat16, seed=0)
    assert torch.get_default_dtype() == prev  # restored
    ref32 = load_lserve(config_dir, "dummy", dtype=torch.float32, seed=0)
    for (name, p), p32 in zip(model.named_parameters(), ref32.parameters(), strict=True):
        assert p.dtype == torch.bfloat16, name
        assert torch.isfinite(p.float()).all(), name
        assert torch.equal(p, p32.to(torch.bfloat16)), name  # same draws, just rounded
    assert model.rotary.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.rotary.inv_freq, ref32.rotary.inv_freq, atol=0, rtol=0)
    logits = lserve_logits(model, ids)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


# --- errors -----------------------------------------------------------------------------------------


def _load_error(path, load_format: str = "auto") -> str:
    with pytest.raises(ModelLoadError) as info:
        load_lserve(path, load_format)
    msg = str(info.value)
    assert msg and "\n" not in msg, msg  # one line, printed by the CLI without a traceback
    return msg


def test_error_nonexistent_path(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    msg = _load_error(missing)
    assert "does not exist" in msg and str(missing) in msg


def test_error_folder_without_config(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    msg = _load_error(tmp_path / "empty")
    assert "config.json" in msg


def test_error_folder_without_safetensors(config_dir) -> None:
    (config_dir / "pytorch_model.bin").write_bytes(b"\0" * 16)
    msg = _load_error(config_dir, "hf")
    assert ".safetensors" in msg


def test_error_gguf_format_on_folder(config_dir) -> None:
    assert "GGUF" in _load_error(config_dir, "gguf")


def test_error_corrupt_gguf(tmp_path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    msg = _load_error(path)
    assert "GGUF" in msg and "broken.gguf" in msg


def test_error_truncated_gguf(tmp_path, llama_ref) -> None:
    good = write_llama_gguf(llama_ref[0], tmp_path / "good.gguf").read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(good[: len(good) // 2])
    msg = _load_error(path)
    assert "truncated.gguf" in msg


def test_error_gguf_missing_metadata(tmp_path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "meta.gguf"), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    msg = _load_error(tmp_path / "meta.gguf")
    assert "metadata" in msg


def test_error_gguf_missing_tensor(tmp_path, llama_ref) -> None:
    path = write_llama_gguf(llama_ref[0], tmp_path / "gap.gguf", skip=("blk.1.attn_k.weight",))
    msg = _load_error(path)
    assert "missing" in msg and "layers.1" in msg


def test_error_unsupported_architecture_real_gpt2_config(tmp_path) -> None:
    import transformers

    transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=300, architectures=["GPT2LMHeadModel"]
    ).save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"]
    msg = _load_error(tmp_path, "dummy")
    assert "unsupported architecture" in msg and "GPT2LMHeadModel" in msg
    assert "LlamaForCausalLM" in msg  # says what is supported


def test_error_unsupported_architecture_llama_shaped_config(tmp_path, llama_ref) -> None:
    cfg = json.loads((llama_ref[1] / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    msg = _load_error(tmp_path, "dummy")
    assert "unsupported architecture" in msg and "GPT2LMHeadModel" in msg


def test_error_bad_config_json(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    assert "config.json" in _load_error(tmp_path, "dummy")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}))
    assert "num_attention_heads" in _load_error(tmp_path, "dummy")


def _rewrite_weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_error_missing_weight(tmp_path, llama_ref) -> None:
    folder = _copy_folder(llama_ref[1], tmp_path / "m")
    _rewrite_weights(folder, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    msg = _load_error(folder)
    assert "missing" in msg and "layers.1.self_attn" in msg


def test_error_missing_lm_head(tmp_path, llama_ref) -> None:
    folder = _copy_folder(llama_ref[1], tmp_path / "m")
    _rewrite_weights(folder, lambda t: t.pop("lm_head.weight"))
    msg = _load_error(folder)
    assert "missing" in msg and "lm_head" in msg


def test_error_unexpected_weight(tmp_path, llama_ref) -> None:
    folder = _copy_folder(llama_ref[1], tmp_path / "u")
    _rewrite_weights(folder, lambda t: t.__setitem__("model.layers.0.self_attn.q_norm.weight", torch.ones(16)))
    msg = _load_error(folder)
    assert "q_norm" in msg


def test_error_shape_mismatch_config(tmp_path, llama_ref) -> None:
    folder = _copy_folder(llama_ref[1], tmp_path / "s")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(cfg))
    msg = _load_error(folder)
    assert "shape" in msg and "mlp" in msg and "96" in msg and "128" in msg


def test_error_shape_mismatch_tensor(tmp_path, llama_ref) -> None:
    folder = _copy_folder(llama_ref[1], tmp_path / "s")
    _rewrite_weights(folder, lambda t: t.__setitem__("model.layers.0.self_attn.v_proj.weight", torch.zeros(16, 64)))
    msg = _load_error(folder)
    assert "v_proj" in msg and "(16, 64)" in msg and "(32, 64)" in msg


def test_error_shard_index_names_missing_file(tmp_path, llama_ref) -> None:
    folder = save_hf(llama_ref[0], tmp_path / "sh", max_shard_size="50KB")
    victim = sorted(folder.glob("model-*.safetensors"))[-1]
    victim.unlink()
    msg = _load_error(folder)
    assert victim.name in msg


def test_error_corrupt_safetensors(tmp_path, llama_ref) -> None:
    folder = _copy_folder(llama_ref[1], tmp_path / "c")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    msg = _load_error(folder)
    assert "safetensors" in msg


def test_plain_view_reader_reads_what_gguf_reads(tmp_path) -> None:
    """lserve's reader (GGUFReader over a plain view of the map) gives the same fields and tensor bytes."""
    from lserve.model.gguf_loader import reader_class

    path = write_llama_gguf(hf_model(hf_config("llama"), seed=3), tmp_path / "tiny.gguf")
    ours, theirs = reader_class()(str(path)), gguf.GGUFReader(str(path))
    assert type(ours.data) is np.ndarray and isinstance(theirs.data, np.memmap)
    assert list(ours.fields) == list(theirs.fields)
    for key, field in theirs.fields.items():
        assert ours.fields[key].contents() == field.contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data), a.name
