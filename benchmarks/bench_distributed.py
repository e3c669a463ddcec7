"""The overhead of torchrun's collectives: 2 ranks x 1 thread against 1 process x 2 threads, on the same cores.

On one CPU the two set-ups have the same compute, so their time ratio shows what the distributed path
adds: starting, the shares, the all-reduce of the windows' NLLs and of every Linear's statistics (target:
<= 1.05). Two tasks on an OPT-125M-shaped model with random weights (bench_mumoe's), saved once as a
checkpoint that each process loads (memory-mapped: the ranks share its pages):

    perplexity   eval_ppl.perplexity, dense, on --windows windows of --seqlen tokens
    calibration  pruners.prune_model with Wanda on --windows calibration windows (statistics all-reduced per
                 Linear; the masks themselves are computed by every rank, with one thread where the single
                 process has two: that part does not scale, and is in the figure)

1 process x 1 thread is run too: half its time is what two ranks would take with free collectives and
nothing replicated, and it shows how well the single process uses its second thread on this machine.

Each set-up is a fresh launch (`python` or `torchrun --nproc-per-node 2` of this file with --worker) that
times each task once after a warm-up; the launches alternate, --repeats each, and the medians and spreads
(min-max) are printed with their ratio.

    python benchmarks/bench_distributed.py [--windows 8] [--seqlen 512] [--repeats 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import distributed  # noqa: E402
import eval_ppl  # noqa: E402
import pruners  # noqa: E402
from models import load_model  # noqa: E402
from opt_model import OPTConfig  # noqa: E402
from testkit import random_ids, save_random_opt  # noqa: E402

TARGET = 1.05
TORCHRUN = Path(sys.executable).with_name("torchrun")


def worker(args) -> None:
    """One launch: time each task once after a warm-up; rank 0 prints the seconds as JSON, and the seconds it
    spent inside the collectives (waiting for the other rank included)."""
    distributed.start("cpu")
    inside, collective = [0.0], distributed.collective

    def timed_collective(op, tensor):
        start = time.perf_counter()
        collective(op, tensor)
        inside[0] += time.perf_counter() - start

    distributed.collective = timed_collective
    ids = random_ids(1, args.windows * args.seqlen, OPTConfig().vocab_size).view(args.windows, args.seqlen)
    model = load_model(args.checkpoint)
    seconds = {}
    for task in ("perplexity", "calibration"):
        for timed in (False, True):
            if task == "calibration":
                model = load_model(args.checkpoint)  # unpruned
            distributed.barrier()
            start, inside[0] = time.perf_counter(), 0.0
            if task == "perplexity":
                eval_ppl.perplexity(model, ids, desc="")
            else:
                pruners.prune_model(model, ids, "wanda", 0.5, progress=False)
            distributed.barrier()  # the slowest rank's time
            if timed:
                seconds[task] = time.perf_counter() - start
                seconds[task + " collectives"] = inside[0]
    if distributed.is_main():
        print(json.dumps(seconds))
    distributed.stop()


def launch(args, ranks: int, threads: int, checkpoint: Path) -> dict:
    launcher = [str(TORCHRUN), "--nproc-per-node", str(ranks)] if ranks > 1 else [sys.executable]
    command = launcher + [__file__, "--worker", "--checkpoint", str(checkpoint), "--windows", str(args.windows),
                          "--seqlen", str(args.seqlen)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    setups = {"1 process x 2 threads": (1, 2), "2 ranks x 1 thread": (2, 1), "1 process x 1 thread": (1, 1)}
    runs = {name: [] for name in setups}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "opt-125m-random"
        save_random_opt(checkpoint, OPTConfig())
        for r in range(args.repeats):
            for name in list(runs)[r % 3:] + list(runs)[:r % 3]:  # each repeat starts with another
                runs[name].append(launch(args, *setups[name], checkpoint))
                print(f"repeat {r + 1}: {name}: {runs[name][-1]}", flush=True)
    print(f"\nOPT-125M shape, {args.windows} windows of {args.seqlen} tokens, CPU; median (min-max) of {args.repeats}")
    medians = {}
    for task in ("perplexity", "calibration"):
        for name, times in runs.items():
            values = [t[task] for t in times]
            medians[name, task] = statistics.median(values)
            print(f"{task:>12} {name:>22}: {medians[name, task]:6.2f} s ({min(values):.2f}-{max(values):.2f})")
        ratio = medians["2 ranks x 1 thread", task] / medians["1 process x 2 threads", task]
        print(f"{task:>12} {'2 ranks / 1 process':>22}: {ratio:.3f} (target <= {TARGET})")
        share = [t[task + " collectives"] / t[task] for t in runs["2 ranks x 1 thread"]]
        print(f"{task:>12} {'inside the collectives':>22}: {statistics.median(share):.1%} of the 2 ranks' time "
              f"({min(share):.1%}-{max(share):.1%}), rank 0's waits for rank 1 included")


if __name__ == "__main__":
    main()
