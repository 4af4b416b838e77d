"""A real `lserve serve` process on localhost for the server tests, and small HTTP helpers."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

import lserve

API_KEY = "test-key-123"
MODEL_NAME = "lserve-test"
MODEL_ALIAS = "SmolLM2-135M-Instruct"
# float32 on the CPU, a short context and a small KV pool: quick to start, and the load test
# fills the pool so requests queue.
DEFAULT_ARGS = (
    "--dtype", "float32", "--device", "cpu", "--max-model-len", "2048", "--num-kv-pages", "64",
    "--served-model-name", MODEL_NAME, MODEL_ALIAS, "--api-key", API_KEY,
)
START_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RemoteServer:
    """`python -m lserve.cli serve ...` in a subprocess, running this checkout's lserve."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="lserve-server-", suffix=".log")[1])
        env = dict(os.environ)
        src = str(Path(lserve.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
        env.pop("LSERVE_API_KEY", None)
        cmd = [sys.executable, "-m", "lserve.cli", "serve", "--port", str(self.port), *args]
        with open(self.log_path, "w") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the server did not start in {START_TIMEOUT_S} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics without labels other than model_name: {'vllm:num_requests_running': 0.0, ...}."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r'^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$', line)
            if m is None:
                continue
            name, labels, value = m.groups()
            if labels and "finished_reason" in labels:
                name += "{" + re.search(r'finished_reason="(\w+)"', labels).group(1) + "}"  # type: ignore[union-attr]
            elif labels and "le=" in labels:
                continue
            out[name] = float(value)
        return out

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        """Poll /metrics until no request runs or waits and every KV page is free; the last sample."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
                    and m["lserve:kv_cache_pages_used"] == 0 and m["vllm:kv_cache_usage_perc"] == 0)
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)
