"""`lserve` as users run it: one line of error and a non-zero exit for bad input, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lserve.cli", *args], capture_output=True, text=True, input=input, timeout=300
    )


def _one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and needle in errors[0], proc.stderr


def test_help_lists_engine_flags() -> None:
    proc = run_cli("generate", "--help")
    assert proc.returncode == 0
    for flag in ("--page-size", "--num-kv-pages", "--max-num-batched-tokens", "--streaming-sparsity",
                 "--token-budget", "--attention-backend", "--load-format"):
        assert flag in proc.stdout


def test_version() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip()


def test_bad_config_value() -> None:
    _one_line_error(run_cli("generate", "--prompt", "hi", "--page-size", "33"), "page_size")


def test_missing_prompt_file(tmp_path: Path) -> None:
    _one_line_error(run_cli("generate", "--prompt-file", str(tmp_path / "nope.txt")), "nope.txt")


def test_missing_model_path(tmp_path: Path) -> None:
    _one_line_error(run_cli("generate", "--prompt", "hi", "--model", str(tmp_path / "absent")), "does not exist")


def test_corrupt_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    _one_line_error(run_cli("generate", "--prompt", "hi", "--model", str(bad)), "GGUF")


def test_unknown_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    _one_line_error(run_cli("generate", "--prompt", "hi", "--model", str(tmp_path)), "unsupported architecture")


def test_token_budget_below_two_pages() -> None:
    _one_line_error(run_cli("generate", "--prompt", "hi", "--token-budget", "100", "--page-size", "64"),
                    "token_budget")
    # page_size unset: the default model's pattern chooses 16-token pages, checked once chosen
    _one_line_error(run_cli("generate", "--prompt", "hi", "--token-budget", "20"), "at page_size 16")


def test_streaming_without_a_pattern(tmp_path: Path) -> None:
    # the default model ships a pattern (lserve/patterns/), so ask for a model that has none
    from tests.helpers_models import hf_config

    hf_config().save_pretrained(str(tmp_path / "tiny-no-pattern"))
    proc = run_cli("generate", "--prompt", "hi", "--model", str(tmp_path / "tiny-no-pattern"),
                   "--load-format", "dummy", "--streaming-sparsity", "0.5")
    _one_line_error(proc, "needs a head pattern and none ships for tiny-no-pattern")


def test_pattern_of_the_wrong_shape(tmp_path: Path) -> None:
    (tmp_path / "full_attention_heads.tsv").write_text("0.5\t0.5\n0.1\t0.9\n")
    proc = run_cli("generate", "--prompt", "hi", "--streaming-sparsity", "0.5", "--attn-pattern", str(tmp_path))
    _one_line_error(proc, "the model has 30 x 3")


@pytest.mark.slow
def test_prompt_longer_than_model(tmp_path: Path) -> None:
    long = tmp_path / "long.txt"
    long.write_text("hello " * 9000)
    _one_line_error(run_cli("generate", "--prompt-file", str(long)), "maximum model length")


@pytest.mark.slow
def test_generate_prints_completion() -> None:
    proc = run_cli("generate", "--chat", "--prompt", "What is the capital of France?", "--max-tokens", "16")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


@pytest.mark.slow
def test_chat_session() -> None:
    proc = run_cli("chat", "--max-tokens", "16", input="What is the capital of France?\n\n")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
