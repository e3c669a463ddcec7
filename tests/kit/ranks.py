"""Ranks started as torchrun starts them: real processes on the CPU with gloo, a TCP store as their rendezvous,
and their ends collected with a time limit (a rank past it is a hang).
"""

import os
import subprocess
import sys
from pathlib import Path

import torch.distributed as dist

from kit.data import REPO


RANK_TIMEOUT = 180  # seconds a rank may take here before the test calls it a hang (a run takes ~5 s)


def launch(script: str, argv: list[str], ranks: int, log: Path, **env) -> tuple[dist.TCPStore, list]:
    """Start `ranks` processes of `python -c script argv` as torchrun would; the store is returned with them
    and must be kept alive until they end (it is their rendezvous)."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    common = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), WORLD_SIZE=str(ranks),
                  LOCAL_WORLD_SIZE=str(ranks), TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0",
                  OMP_NUM_THREADS="1", WRITES_LOG=str(log), **env)
    procs = [subprocess.Popen([sys.executable, "-c", script, *argv], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=dict(common, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(ranks)]
    return store, procs


def finish(procs) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each rank; a rank that does not end in time is a hang."""
    results = []
    for rank, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=RANK_TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"rank {rank} hangs")
        results.append((proc.returncode, out, err))
    return results
