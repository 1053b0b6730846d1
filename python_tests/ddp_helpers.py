"""Two-process DDP for the tests: workers in a gloo group of CPU processes (``mp.spawn``), and
the ``labelkit`` CLI under ``torchrun``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp

from labelkit_ext.engine import init_distributed, shutdown_distributed

REPO = Path(__file__).resolve().parents[1]
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker: Callable[..., None], *args: object) -> None:
    """``worker(rank, *args)`` (a module-level function) in WORLD processes joined in a gloo
    group, one thread each; raises if any of them fails."""
    mp.spawn(_in_group, args=(free_port(), worker, args), nprocs=WORLD, join=True)


def _in_group(rank: int, port: int, worker: Callable[..., None], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    init_distributed("cpu")
    try:
        worker(rank, *args)
    finally:
        shutdown_distributed()


def torchrun_labelkit(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=WORLD -m labelkit_ext *args``, output captured."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
               f"--nproc_per_node={WORLD}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "labelkit_ext", *args]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
