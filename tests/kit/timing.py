"""One timer for the benchmarks: calls alternated round by round after a warm-up, medians with their spread, and
the forward modes of μ-MoE timed block by block against the dense pass.
"""

import statistics
import time

import torch

from mumoe import MuMoE, mumoe_logits, routed_block


def timed(fns, repeats: int, device=None, warmup: bool = True):
    """Seconds of each of `repeats` calls of fn, after a warm-up call: a list for one function, name -> list for a
    dict of them. A dict's calls alternate round by round, so that a burst of load from another process on a shared
    CPU slows every candidate alike instead of skewing one ratio. CUDA's queue is drained around each call."""
    if callable(fns):
        return timed({"fn": fns}, repeats, device, warmup)["fn"]
    cuda = torch.device(device or "cpu").type == "cuda"
    seconds = {name: [] for name in fns}
    for round_ in range(repeats + warmup):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            if round_ >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def median_and_spread(seconds: list[float]) -> dict:
    """The median of some timings and their spread (min, max), as the benchmarks report them."""
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds)}


def forward_modes(model, ids, rho: float, selects) -> dict:
    """name -> a function running one forward pass in that mode; a select None is MuMoE's default ("default": the
    compiled router where it runs)."""
    modes = {"dense": lambda: model(ids)}
    for routing in ("linear", "block"):
        modes.update({f"mumoe {routing} {s or 'default'}": (lambda r=routing, s=s: mumoe_logits(
                          model, ids, MuMoE(rho, routing=r, select=s))) for s in selects})
    return modes


@torch.no_grad()
def paired_blocks(model, ids, rho: float, select: str | None, repeats: int) -> dict[str, list[float]]:
    """Each mode's forward time / dense, estimated block by block: per-repeat ratios, one per repeat.

    The machine's speed drifts over the seconds a whole forward takes, so here each block runs in every
    mode back to back on the same input (the dense pass's hidden states), in a rotating order, and a
    repeat's forward is the embedding and head (dense in every mode) plus its block times.
    """
    modes = {"dense": lambda block, x: block(x)}
    for routing in ("linear", "block"):
        run = routed_block(MuMoE(rho, routing=routing, select=select))
        modes[f"mumoe {routing} {select or 'default'}"] = lambda block, x, run=run: run(block, x)
    x = model.embed(ids)
    outside = statistics.median(timed(lambda: model.head(x), repeats)) + statistics.median(timed(lambda: model.embed(ids), repeats))
    totals = {name: [outside] * repeats for name in modes}
    for block in model.blocks:
        for fn in modes.values():  # warm-up
            fn(block, x)
        for r in range(repeats):
            for name in list(modes)[r % len(modes):] + list(modes)[: r % len(modes)]:
                start = time.perf_counter()
                modes[name](block, x)
                totals[name][r] += time.perf_counter() - start
        x = block(x)
    return {name: [t / d for t, d in zip(ts, totals["dense"])] for name, ts in totals.items()}
