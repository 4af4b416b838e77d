"""Calibration (`lserve.calibration`): attention branches, the gated mixture, the optimiser, the CLI.

Tiny random Llama models on the CPU in float32; the data tests use the default model's tokenizer
(cached after its first build) because lengths are measured in a real model's tokens.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from lserve.calibration.config import CalibrationConfig, spread
from lserve.calibration.data import PasskeySample, make_dataset
from lserve.calibration.gated import (
    GatedAttention,
    dense_attention,
    final_hidden,
    streaming_attention,
)
from lserve.calibration.train import Calibrator, lr_factor
from lserve.cli import main
from lserve.model.llama import LlamaForCausalLM
from lserve.ops.reference import attend_ref, visibility_mask
from lserve.sparse.patterns import load_pattern
from tests.helpers_models import (
    hf_config,
    hf_model,
    load_lserve,
    save_hf,
    sdpa_attention,
)

SINK, LOCAL = 4, 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LlamaForCausalLM:
    folder = save_hf(hf_model(hf_config(max_position_embeddings=1024)), tmp_path_factory.mktemp("tiny"))
    model = load_lserve(folder)
    model.requires_grad_(False)  # frozen, as calibration keeps it; tests that need fresh weights copy it
    return model


def _reference_attention(streaming: bool):
    """attn callable from ops.reference (float64, per head): dense causal or the Λ mask."""
    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
        t, hq, d = q.shape
        group = hq // k.shape[1]
        pos = torch.arange(t)
        mask = visibility_mask(pos, pos, streaming, SINK, LOCAL)
        heads = [attend_ref(q[:, h], k[:, h // group], v[:, h // group], mask, d**-0.5) for h in range(hq)]
        return torch.stack(heads, 1).to(q.dtype)
    return attn


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("t", "sink", "local", "chunk"), [
    (300, 8, 40, 32),  # several chunks, sink outside the window
    (257, 0, 100, 64),  # no sink; a ragged last chunk
    (90, 4, 16, 128),  # one chunk longer than the sequence
    (40, 8, 40, 16),  # shorter than sink + local: plain causal attention
])
def test_streaming_attention_matches_the_lambda_mask_reference(t: int, sink: int, local: int, chunk: int) -> None:
    gen = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(t, h, 16, generator=gen) for h in (4, 2, 2))
    out = streaming_attention(q, k, v, sink, local, chunk)
    pos = torch.arange(t)
    mask = visibility_mask(pos, pos, True, sink, local)
    ref = torch.stack([attend_ref(q[:, h], k[:, h // 2], v[:, h // 2], mask, 0.25) for h in range(4)], 1)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)
    if t > sink + local:  # the mask matters: dense attention must differ
        assert (dense_attention(q, k, v) - out).abs().max() > 1e-3


def test_gate_one_is_exactly_dense_and_gate_zero_is_streaming(tiny: LlamaForCausalLM) -> None:
    ids = _ids(80)
    cfg = tiny.config
    with torch.no_grad():
        teacher = final_hidden(tiny, ids, GatedAttention(None, SINK, LOCAL))
        ones = final_hidden(tiny, ids, GatedAttention(torch.ones(cfg.num_layers, cfg.num_kv_heads), SINK, LOCAL))
        zeros = final_hidden(tiny, ids, GatedAttention(torch.zeros(cfg.num_layers, cfg.num_kv_heads), SINK, LOCAL))
        plain = tiny(ids, torch.arange(80), sdpa_attention)  # the tests' own causal attention
        dense_ref = tiny(ids, torch.arange(80), _reference_attention(False))
        stream_ref = tiny(ids, torch.arange(80), _reference_attention(True))
    assert torch.equal(ones, teacher)  # 1 * dense + 0 * streaming, bit for bit
    torch.testing.assert_close(teacher, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(teacher, dense_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(zeros, stream_ref, atol=1e-4, rtol=1e-4)
    assert (zeros - teacher).abs().max() > 1e-2


def test_mixed_gates_mix_per_kv_head(tiny: LlamaForCausalLM) -> None:
    """A gate of 0.3 on one KV head gives 0.3 dense + 0.7 streaming on exactly its query heads."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(60, 4, 16, generator=gen), torch.randn(60, 2, 16, generator=gen), torch.randn(60, 2, 16, generator=gen)
    gates = torch.tensor([[1.0, 0.3]])
    out = GatedAttention(gates, SINK, LOCAL)(q, k, v, 0)
    dense, stream = dense_attention(q, k, v), streaming_attention(q, k, v, SINK, LOCAL)
    torch.testing.assert_close(out[:, :2], dense[:, :2], atol=0, rtol=0)
    torch.testing.assert_close(out[:, 2:], 0.3 * dense[:, 2:] + 0.7 * stream[:, 2:], atol=1e-6, rtol=1e-6)


def test_layer_checkpointing_gives_the_same_hidden_states_and_gradients(tiny: LlamaForCausalLM) -> None:
    ids = _ids(70, seed=2)
    hidden, grads = [], []
    for ckpt in (False, True):
        gates = torch.full((2, 2), 0.5, requires_grad=True)
        h = final_hidden(tiny, ids, GatedAttention(gates, SINK, LOCAL), checkpoint_layers=ckpt)
        h[-5:].square().sum().backward()
        hidden.append(h.detach())
        grads.append(gates.grad)
    torch.testing.assert_close(hidden[0], hidden[1], atol=0, rtol=0)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().min() > 0


def load_lserve_copy(model: LlamaForCausalLM) -> LlamaForCausalLM:
    clone = LlamaForCausalLM(model.config)
    clone.load_state_dict(model.state_dict())
    return clone.eval()


def _samples(n: int, length: int = 72) -> list[PasskeySample]:
    """Random token samples for the tiny model; the loss looks at the last 8 positions."""
    out = []
    for i in range(n):
        ids = _ids(length, seed=100 + i).tolist()
        out.append(PasskeySample(ids, list(range(length - 9, length - 1)), [10], [0.2], (0, length - 10), ["x"], length))
    return out


def _calibrator(model: LlamaForCausalLM, steps: int, lr: float, reg: float, n: int = 4) -> Calibrator:
    cfg = CalibrationConfig(output="unused", steps=steps, lr=lr, reg=reg, sink=SINK, local=LOCAL,
                            context_lengths=(72,) * n)
    return Calibrator(model, _samples(n), cfg)


def test_gradients_reach_the_gates_and_not_the_weights(tiny: LlamaForCausalLM) -> None:
    model = load_lserve_copy(tiny)
    assert all(p.requires_grad for p in model.parameters())
    cal = _calibrator(model, steps=2, lr=0.02, reg=0.05)
    cal.step(0)
    assert cal.gates.grad is not None and cal.gates.grad.abs().min() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert (cal.gates < 1).all() and (cal.gates >= 0).all()  # moved, and clamped to [0, 1]


def test_optimisation_lowers_the_distillation_loss(tiny: LlamaForCausalLM) -> None:
    """From all-streaming gates and no regulariser, a few steps bring the gated model closer to dense."""
    cal = _calibrator(tiny, steps=12, lr=0.1, reg=0.0, n=2)
    with torch.no_grad():
        cal.gates.zero_()
    def distill() -> float:
        total = 0.0
        with torch.no_grad():
            for i in range(2):
                ids, labels = cal._inputs(i)
                total += float((final_hidden(tiny, ids, cal.student_attn)[labels] - cal.teacher(i)).pow(2).mean())
        return total
    before = distill()
    rows = [cal.step(s) for s in range(12)]
    after = distill()
    assert after < 0.5 * before
    assert rows[-1]["mean_gate"] > 0.3


def test_regulariser_pushes_unneeded_gates_down(tiny: LlamaForCausalLM) -> None:
    """A KV head whose output is ignored (its query heads' o_proj columns are zero) only feels the
    regulariser, so its gate falls to 0 while the heads that matter stay well above it."""
    model = load_lserve_copy(tiny)
    head_dim = model.config.head_dim
    with torch.no_grad():  # layer 1, KV head 0 = query heads 0 and 1
        model.layers[1].self_attn.o_proj.weight[:, : 2 * head_dim] = 0.0
    cal = _calibrator(model, steps=40, lr=0.05, reg=0.05)
    for s in range(40):
        cal.step(s)
    gates = cal.gates.detach()
    assert gates[1, 0] < 0.05
    assert gates.flatten()[[0, 1, 3]].min() > 0.3


def test_lr_schedule_warms_up_stays_flat_and_decays() -> None:
    factors = [lr_factor(s, 100) for s in range(100)]
    assert factors[0] == pytest.approx(0.05) and factors[19] == 1.0
    assert set(factors[20:80]) == {1.0}
    assert factors[80] == 1.0 and factors[99] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[80:]))
    assert lr_factor(0, 1) == 1.0


def test_spread_context_lengths() -> None:
    assert spread(1000, 3000, 5) == (1000, 1500, 2000, 2500, 3000)
    assert spread(800, 800, 3) == (800, 800, 800)


# --- data --------------------------------------------------------------------------------------


def test_samples_have_the_requested_length_needles_and_labels(tokenizer) -> None:
    lengths = (700, 1500, 3000)
    samples = make_dataset(tokenizer, lengths, num_passkeys=4, passkey_length=6, seed=7)
    for s, n in zip(samples, lengths, strict=True):
        assert abs(s.num_tokens - n) <= 0.02 * n
        hay_start, hay_end = s.haystack_span
        needle_lens = [len(tokenizer.encode(f" Remember this sequence of words, it is the {o} passkey to the vault: "
                                            f"{p}.", add_special_tokens=False))
                       for o, p in zip(("first", "second", "third", "fourth"), s.passkeys, strict=True)]
        haystack_tokens = hay_end - hay_start - sum(needle_lens)
        assert s.needle_positions == sorted(s.needle_positions)
        for k, (pos, depth) in enumerate(zip(s.needle_positions, s.depths, strict=True)):
            before = pos - hay_start - sum(needle_lens[:k])  # haystack tokens in front of needle k
            assert abs(before - depth * haystack_tokens) <= 25  # within one filler sentence
            assert s.passkeys[k] in tokenizer.decode(s.input_ids[pos : pos + needle_lens[k]])
        answer = tokenizer.decode([s.input_ids[p + 1] for p in s.label_positions])
        assert answer.split() == " ".join(s.passkeys).split()  # the loss positions predict exactly the passkeys
        assert 0.05 <= min(s.depths) and max(s.depths) <= 0.95


def test_samples_are_deterministic_and_use_a_haystack_file(tokenizer, tmp_path: Path) -> None:
    a = make_dataset(tokenizer, (600,), 2, 4, seed=1)[0]
    b = make_dataset(tokenizer, (600,), 2, 4, seed=1)[0]
    c = make_dataset(tokenizer, (600,), 2, 4, seed=2)[0]
    assert a == b and a.input_ids != c.input_ids
    text = " ".join(f"Sentence number {i} talks about zebras and lanterns." for i in range(200))
    (tmp_path / "hay.txt").write_text(text)
    s = make_dataset(tokenizer, (600,), 2, 4, seed=1, haystack_file=tmp_path / "hay.txt")[0]
    assert "zebras and lanterns" in tokenizer.decode(s.input_ids) and abs(s.num_tokens - 600) <= 12


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_writes_a_loadable_pattern(tiny_with_tokenizer: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "calib"
    rc = main(["calibrate", "--model", str(tiny_with_tokenizer), "--output", str(out), "--steps", "3",
               "--context-lengths", "300:400", "--num-samples", "2", "--num-passkeys", "2", "--passkey-length", "3",
               "--sink", str(SINK), "--local", "32", "--device", "cpu", "--dtype", "float32", "--save-every", "2"])
    assert rc == 0, capsys.readouterr().err
    pattern = load_pattern(out)  # the folder: DuoAttention's TSV
    assert pattern.shape == (2, 2) and pattern.metadata["sink_size"] == SINK and pattern.metadata["recent_size"] == 32
    ours = load_pattern(out / f"{tiny_with_tokenizer.name}.json")
    torch.testing.assert_close(ours.scores, pattern.scores, atol=1e-6, rtol=0)
    meta = ours.metadata
    assert (meta["steps"], meta["sink"], meta["local"], meta["context_lengths"]) == (3, SINK, 32, [300, 400])
    assert meta["model"] == tiny_with_tokenizer.name and meta["wall_time_s"] > 0 and meta["device"] == "cpu"
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == 0.02 and config["reg"] == 0.05 and config["seed"] == 42
    log = (out / "log.tsv").read_text().splitlines()
    assert log[0].startswith("step\tlr\tloss") and len(log) == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["gates_step00002.tsv", "gates_step00003.tsv"]
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["--steps", "0"], "steps must be an integer >= 1"),
    (["--context-lengths", "5000"], "over the model's limit of 1024 tokens"),
    (["--context-lengths", "abc"], "--context-lengths must be MIN:MAX"),
    (["--context-lengths", "900:300"], "--context-lengths must be MIN:MAX"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--local", "0"], "local must be an integer >= 1"),
    (["--num-passkeys", "30"], "num_passkeys must be at most 20"),
    (["--context-lengths", "100"], "too short for 10 passkeys"),
    (["--haystack-file", "/nonexistent/hay.txt"], "cannot read haystack file"),
    (["--output", "FILE/sub"], "cannot write to output folder"),
    (["--output", "FILE"], "exists and is not a folder"),
])
def test_cli_bad_input_is_one_line(tiny_with_tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   args: list[str], message: str) -> None:
    (tmp_path / "FILE").write_text("not a folder")
    args = [a.replace("FILE", str(tmp_path / "FILE")) for a in args]
    base = ["calibrate", "--model", str(tiny_with_tokenizer), "--device", "cpu", "--dtype", "float32", "--steps", "1",
            "--context-lengths", "900"]
    if "--output" not in args:
        base += ["--output", str(tmp_path / "out")]
    rc = main(base + args)
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("lserve calibrate: error:") and err.count("\n") == 1 and message in err, err


def test_cli_missing_model_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["calibrate", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "does not exist" in err and err.count("\n") == 1


def test_sample_order_is_reproducible() -> None:
    """The sample order comes from the seed alone (two calibrators with one seed agree)."""
    model = LlamaForCausalLM(hf_config_arch())
    cfg = CalibrationConfig(output="unused", steps=9, context_lengths=(72,) * 4, sink=SINK, local=LOCAL)
    assert Calibrator(model, _samples(4), cfg)._order == Calibrator(model, _samples(4), cfg)._order
    assert sorted(Calibrator(model, _samples(4), cfg)._order[:4]) == [0, 1, 2, 3]  # each pass covers every sample


def hf_config_arch():
    from lserve.model.config import ArchConfig

    return ArchConfig.from_hf_dict(hf_config().to_dict())
