"""`lserve calibrate`: DuoAttention-style optimisation of one gate per (layer, KV head).

Every attention head output becomes gate * dense + (1 - gate) * streaming (Λ mask with the given
sink and local window); the model's weights stay frozen and only the gates learn. The loss is
the mean squared difference of the final hidden states (before the LM head) between the
all-dense model (the teacher, computed once per sample and cached) and the gated model, at the
positions that predict the passkey words, plus `reg * mean|gate|`: heads whose streaming output
already reproduces the dense answer drift to 0, heads that retrieve stay near 1. Gates start at
1, are clamped to [0, 1] after every AdamW step, and the learning rate warms up over the first
20% of steps, stays flat, and decays over the last 20% (to 10%).

Outputs in the output folder: `<model>.json` (lserve pattern with metadata, loadable by
`attn_pattern=` and shippable in `lserve/patterns/`), `full_attention_heads.tsv` (DuoAttention
format), `config.json` (the settings, with DuoAttention's key names where they exist),
`log.tsv` (one row per step) and `checkpoints/gates_step*.tsv`.
"""

from __future__ import annotations

import json
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lserve.calibration.config import CalibrationConfig
from lserve.calibration.data import PasskeySample, make_dataset
from lserve.calibration.gated import GatedAttention, final_hidden
from lserve.errors import LServeError
from lserve.model.llama import LlamaForCausalLM
from lserve.sparse.patterns import DUO_FILE, HeadPattern, save_pattern


@dataclass(frozen=True)
class CalibrationResult:
    pattern_path: Path
    tsv_path: Path
    gates: torch.Tensor
    final_loss: float
    wall_time_s: float
    calibrated: torch.Tensor
    """The gates of full-attention layers, flattened (those of sliding-window layers stay 1)."""


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """'auto' device: CUDA when present. 'auto' dtype: bfloat16 (DuoAttention's), float32 on a CPU without bf16 units."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LServeError("--device cuda was requested but no CUDA GPU is available")
    dev = torch.device(device)
    if dtype != "auto":
        return dev, getattr(torch, dtype)
    fast_bf16 = dev.type == "cuda" or bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dev, torch.bfloat16 if fast_bf16 else torch.float32


def prepare_output(folder: str | Path) -> Path:
    """Create the output folder and make sure files can be written there (fail before the slow part)."""
    out = Path(folder).expanduser()
    if out.exists() and not out.is_dir():
        raise LServeError(f"output {str(folder)!r} exists and is not a folder")
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise LServeError(f"cannot write to output folder {str(folder)!r}: {exc.strerror or exc}") from exc
    return out


def lr_factor(step: int, total: int) -> float:
    """Linear warm-up over the first 20% of steps, flat, linear decay over the last 20% (floor 0.1)."""
    warm = max(1, round(0.2 * total))
    decay = max(1, round(0.2 * total))
    if step < warm:
        return (step + 1) / warm
    if step >= total - decay:
        return max(0.1, (total - step) / decay)
    return 1.0


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over label positions of the mean squared hidden-state difference (float32)."""
    return (student.float() - teacher.float()).pow(2).mean()


def _write_tsv(gates: torch.Tensor, path: Path) -> None:
    rows = ["\t".join(f"{float(x):.6f}" for x in row) for row in gates.tolist()]
    path.write_text("\n".join(rows) + "\n")


def gate_summary(gates: torch.Tensor) -> dict[str, float]:
    """Distribution of the gates for config.json and the docs (DuoAttention reports > 0.95 and < 0.05)."""
    g = gates.detach().float().flatten()
    return {"mean": round(float(g.mean()), 4), "median": round(float(g.median()), 4),
            "frac_above_0.95": round(float((g > 0.95).float().mean()), 4),
            "frac_below_0.05": round(float((g < 0.05).float().mean()), 4),
            "min": round(float(g.min()), 4), "max": round(float(g.max()), 4)}


class Calibrator:
    """Owns the frozen model, the samples, the gates and the optimiser of one run."""

    def __init__(self, model: LlamaForCausalLM, samples: list[PasskeySample], cfg: CalibrationConfig) -> None:
        self.model, self.samples, self.cfg = model, samples, cfg
        for p in model.parameters():
            p.requires_grad_(False)
        arch = model.config
        device = model.embed_tokens.weight.device
        self.device = device
        self.gates = torch.nn.Parameter(torch.ones(arch.num_layers, arch.num_kv_heads, device=device))
        # sliding-window layers keep their window: their gates stay 1 and are not regularised
        self.full_layers = torch.tensor([w is None for w in arch.layer_windows], device=device)
        if not bool(self.full_layers.any()):
            raise ValueError("every layer of this model slides: there are no full-attention heads to calibrate")
        self.optimizer = torch.optim.AdamW([self.gates], lr=cfg.lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg.steps))
        attn_kw = dict(scale=arch.attention_scale, layer_windows=arch.layer_windows)
        self.teacher_attn = GatedAttention(None, cfg.sink, cfg.local, **attn_kw)
        self.student_attn = GatedAttention(self.gates, cfg.sink, cfg.local, **attn_kw)
        self._teacher: dict[int, torch.Tensor] = {}
        rng = random.Random(cfg.seed)
        self._order: list[int] = []
        while len(self._order) < cfg.steps:  # each pass over the samples in a fresh seeded order
            perm = list(range(len(samples)))
            rng.shuffle(perm)
            self._order.extend(perm)

    def _inputs(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.samples[idx]
        ids = torch.tensor(s.input_ids, dtype=torch.long, device=self.device)
        return ids, torch.tensor(s.label_positions, dtype=torch.long, device=self.device)

    def teacher(self, idx: int) -> torch.Tensor:
        """All-dense hidden states at the label positions; computed once per sample (weights are frozen)."""
        if idx not in self._teacher:
            ids, labels = self._inputs(idx)
            with torch.no_grad():
                self._teacher[idx] = final_hidden(self.model, ids, self.teacher_attn)[labels].float()
        return self._teacher[idx]

    def step(self, step: int) -> dict[str, float]:
        """One optimisation step on the step's sample; returns the numbers for the log."""
        idx = self._order[step]
        target = self.teacher(idx)
        ids, labels = self._inputs(idx)
        hidden = final_hidden(self.model, ids, self.student_attn, self.cfg.checkpoint_layers)[labels]
        distill = distill_loss(hidden, target)
        reg = self.gates[self.full_layers].abs().mean()
        loss = distill + self.cfg.reg * reg
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            self.gates.clamp_(0.0, 1.0)
            self.gates[~self.full_layers] = 1.0
        return {"loss": loss.item(), "distill": distill.item(), "reg": reg.item(), "lr": lr,
                "mean_gate": self.gates.detach().mean().item(), "tokens": len(self.samples[idx].input_ids)}


def calibrate(cfg: CalibrationConfig, show_progress: bool = True) -> CalibrationResult:
    """Run a whole calibration: load, make data, optimise, write the output folder."""
    from lserve.engine.tokenizer import load_tokenizer
    from lserve.model.loader import load_model, read_arch_config, resolve_source

    started = time.time()
    source = resolve_source(cfg.model, cfg.load_format)
    arch, rope_factors = read_arch_config(source)
    limit = arch.max_position_embeddings
    if max(cfg.context_lengths) > limit:
        raise LServeError(f"context length {max(cfg.context_lengths)} is over the model's limit of {limit} tokens")
    out = prepare_output(cfg.output)
    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype)
    tokenizer = load_tokenizer(source)
    if tokenizer is None:
        raise LServeError(f"{source.name} has no tokenizer: calibration needs one to make its passkey samples")
    samples = make_dataset(tokenizer, cfg.context_lengths, cfg.num_passkeys, cfg.passkey_length, cfg.seed,
                           cfg.haystack_file, cfg.chat_template)
    settings = _settings(cfg, source.name, str(source.path), device, dtype)
    (out / "config.json").write_text(json.dumps(settings, indent=1) + "\n")
    model = load_model(source, arch, rope_factors, dtype, device, seed=cfg.seed)
    cal = Calibrator(model, samples, cfg)

    log_path = out / "log.tsv"
    columns = ["step", "lr", "loss", "distill", "reg", "mean_gate", "tokens", "seconds"]
    log_lines = ["\t".join(columns)]
    bar = tqdm(range(cfg.steps), desc="calibrating", disable=not show_progress, dynamic_ncols=True)
    train_start = time.time()
    row: dict[str, float] = {}
    for step in bar:
        t0 = time.time()
        row = cal.step(step)
        row["seconds"] = time.time() - t0
        log_lines.append("\t".join([str(step + 1)] + [f"{row[c]:.6g}" for c in columns[1:]]))
        bar.set_postfix(loss=f"{row['loss']:.4f}", distill=f"{row['distill']:.4f}", gate=f"{row['mean_gate']:.3f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            _write_tsv(cal.gates.detach().cpu(), out / "checkpoints" / f"gates_step{step + 1:05d}.tsv")
            log_path.write_text("\n".join(log_lines) + "\n")
    wall = time.time() - started
    gates = cal.gates.detach().float().cpu()
    results = {"wall_time_s": round(wall, 1), "train_time_s": round(time.time() - train_start, 1),
               "final_loss": row["loss"], "final_distill": row["distill"],
               "gates": gate_summary(gates[cal.full_layers.cpu()])}
    settings.update(results)
    (out / "config.json").write_text(json.dumps(settings, indent=1) + "\n")
    metadata = {**settings, "model": source.name,
                "method": "lserve calibrate (DuoAttention-style gate optimisation)"}
    pattern_path = save_pattern(HeadPattern(gates, metadata), out / f"{source.name}.json")
    return CalibrationResult(pattern_path, out / DUO_FILE, gates, row["loss"], wall,
                             gates[cal.full_layers.cpu()].flatten())


def _settings(cfg: CalibrationConfig, name: str, path: str, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The run's settings for config.json, with DuoAttention's names for the shared ones."""
    from lserve import __version__

    settings = asdict(cfg)
    del settings["output"]  # a local path says nothing about the pattern
    settings["context_lengths"] = list(cfg.context_lengths)
    settings.update({
        "model_name": name, "model_file": Path(path).name, "sink_size": cfg.sink, "recent_size": cfg.local,
        "context_length_min": min(cfg.context_lengths), "context_length_max": max(cfg.context_lengths),
        "num_samples": len(cfg.context_lengths), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch."),
        "lserve_version": __version__, "torch_version": torch.__version__,
        "loss": "mean squared difference of final hidden states at passkey label positions + reg * mean|gate|",
        "lr_schedule": "AdamW (weight decay 0); linear warm-up 20%, flat, linear decay over the last 20% to 0.1x",
    })
    return settings
