"""Tensor-parallel ranks 1..N-1 as worker processes; rank 0 is the engine's own process.

Every rank builds the same engine core from the same config (its shard of the model, its own KV
pools for its heads, its own page selection and sampler); only rank 0's scheduler runs. Each
step's `StepData` (plain data: the step boundary) goes to every worker through a pipe before
rank 0 launches it, so the ranks run the same steps in the same order and meet in the model's
collectives. The logits are gathered on every rank and every sampler draws alike, so every rank
holds the same tokens (the workers' in-flight inputs come from their own last launch); rank 0's
are the engine's.

Processes are spawned (CUDA cannot fork), daemonic (they end with the engine's process), and
each stops when told, when its pipe closes, or when its parent is gone. A worker that fails
sends one line back, which the engine raises; a step that fails on any rank leaves the ranks out
of step, so the engine then closes the group and refuses further steps (the collectives also
have a timeout rather than hang). One tensor-parallel engine per process.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from typing import Any

import torch

from lserve.config import EngineConfig
from lserve.errors import LServeError
from lserve.model.parallel import TensorParallel

logger = logging.getLogger(__name__)

TIMEOUT = datetime.timedelta(seconds=300)
"""How long a collective waits for the other ranks before it fails (instead of hanging)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_devices(size: int, device: torch.device) -> None:
    """One GPU per rank on a GPU machine (ranks on CPUs share the machine)."""
    if device.type == "cuda" and size > torch.cuda.device_count():
        raise LServeError(f"tensor_parallel_size={size} needs {size} GPUs; this machine has "
                          f"{torch.cuda.device_count()}")


def check_no_group() -> None:
    """One tensor-parallel engine per process: its process group is the default one."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise LServeError("a tensor-parallel engine is already running in this process; delete it (its workers "
                          "stop) before building another")


def init_distributed(tp: TensorParallel, init_method: str, device: torch.device) -> None:
    """Join this process to the group: NCCL on GPUs (rank r on device r), gloo on CPUs."""
    import torch.distributed as dist

    check_devices(tp.size, device)
    if device.type == "cuda":
        torch.cuda.set_device(tp.rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method, rank=tp.rank,
                            world_size=tp.size, timeout=TIMEOUT)


def agree_min(value: int, device: torch.device) -> int:
    """The smallest of every rank's `value`."""
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def leave_distributed() -> None:
    """Leave the process group (a later engine in this process can then form its own)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class WorkerGroup:
    """Ranks 1..size-1 of a tensor-parallel engine, each a spawned process with its engine core."""

    def __init__(self, config: EngineConfig, size: int, init_method: str) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        self.owns_group = False
        """Set once this engine's process group is formed: closing the workers then leaves it."""
        self.failed: str | None = None
        """Why the ranks are no longer in step (a step failed on some rank); None: they are."""
        for rank in range(1, size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(config, rank, size, init_method, child, os.getpid()),
                               name=f"lserve-tp{rank}", daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def wait_ready(self) -> None:
        for rank, conn in enumerate(self.conns, start=1):
            self._check(rank, conn.recv())

    def send(self, kind: str, step: Any) -> None:
        """Hand every worker the step (`launch`) or the state update (`update`)."""
        for rank, conn in enumerate(self.conns, start=1):
            if conn.poll():  # a worker reports only failures once ready
                self._check(rank, conn.recv())
            try:
                conn.send((kind, step))
            except (EOFError, OSError) as exc:  # (BrokenPipeError is an OSError)
                raise LServeError(f"tensor-parallel rank {rank} is gone ({type(exc).__name__})") from None

    def error_lines(self) -> str:
        """What failed workers reported, without waiting ("" if none did)."""
        lines = []
        for rank, conn in enumerate(self.conns, start=1):
            try:
                while conn.poll():
                    kind, text = conn.recv()
                    if kind == "error":
                        lines.append(f"rank {rank}: {text}")
            except (EOFError, OSError):
                lines.append(f"rank {rank}: gone")
        return "; ".join(lines)

    def _check(self, rank: int, message: tuple[str, str]) -> None:
        kind, text = message
        if kind == "error":
            self.close()
            raise LServeError(f"tensor-parallel rank {rank} failed: {text}")

    def close(self, timeout: float = 10.0) -> None:
        """Stop every worker (those that do not stop in time are terminated), then leave the group."""
        for conn in self.conns:
            try:
                conn.send(("stop", None))
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout)
        for conn in self.conns:
            conn.close()
        self.conns, self.procs = [], []
        if self.owns_group:
            self.owns_group = False
            leave_distributed()


def _worker_main(config: EngineConfig, rank: int, size: int, init_method: str, conn: Any, parent: int) -> None:
    import signal

    from lserve.engine.core import EngineCore

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the engine's to handle: it stops us
    try:
        core = EngineCore(config, tp=TensorParallel(rank, size), init_method=init_method)
        conn.send(("ready", ""))
        runner = core.runner
        while True:
            if not conn.poll(1.0):
                if os.getppid() != parent:  # the engine's process is gone
                    break
                continue
            kind, step = conn.recv()
            if kind == "stop":
                break
            if kind == "launch":
                runner.launch(step)
            else:
                runner.update_states(step)
    except EOFError:  # the engine's end of the pipe closed
        pass
    except BaseException as exc:  # one line back to the engine, which raises it
        try:
            text = str(exc).strip().splitlines()
            conn.send(("error", f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__))
        except (BrokenPipeError, OSError):
            pass
    finally:
        leave_distributed()
