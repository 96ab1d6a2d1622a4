"""Launching a test script on several local processes (torch.distributed over localhost)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    script: str, args: list[str], out_dir: Path, *, world: int, timeout_s: float, label: str
) -> list[dict[str, Any]]:
    """Run ``script args`` as ranks ``0..world-1``; return each rank's ``out_dir/rank{r}.pt``.

    Fails the test (never hangs) when a rank fails or runs past ``timeout_s``; retries once when
    the port was taken meanwhile.
    """
    for attempt in range(2):
        port = free_port()
        procs, logs = [], []
        for rank in range(world):
            env = dict(
                os.environ,
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            )
            log = open(out_dir / f"rank{rank}.log", "w+")  # noqa: SIM115 (closed below)
            logs.append(log)
            cmd = [sys.executable, script, *args]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout_s
        try:
            for p in procs:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        hung = [r for r, p in enumerate(procs) if p.poll() is None]
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        texts = []
        for log in logs:
            log.seek(0)
            texts.append(log.read())
            log.close()
        if all(p.returncode == 0 for p in procs):
            return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]
        if attempt == 0 and any("address already in use" in t.lower() for t in texts):
            continue
        tails = "\n".join(f"--- rank {r} ---\n{t[-3000:]}" for r, t in enumerate(texts))
        what = f"ranks {hung} hung past {timeout_s} s" if hung else "a rank failed"
        pytest.fail(f"{label}: {what}\n{tails}")
    raise AssertionError("unreachable")


def run_avalanche_rank(
    out_dir: str, body: Callable[[int], Any], *, timeout_s: float, seed: int | None = None
) -> None:
    """One rank of a gloo job over Avalanche: ``body(rank)``'s result to ``out_dir/rank{r}.pt``.

    Avalanche 0.6 must be imported before the process group exists: importing
    ``avalanche.training`` builds an ``InteractiveLogger`` (a default argument of
    ``AETraining``), which refuses to be created on a non-main rank once torch.distributed is
    initialised. ``seed`` seeds every rank alike through ``DistributedHelper``.
    """
    import avalanche.training  # noqa: F401
    import torch.distributed as dist
    from avalanche.distributed import DistributedHelper

    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    if seed is not None:
        DistributedHelper.set_random_seeds(seed)
    try:
        result = body(rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
