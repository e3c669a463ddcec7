"""How long the offline pruners take on one OPT-125M-shaped decoder block, and which Wanda selection is fastest.

    python benchmarks/bench_pruners.py [--device cpu|cuda] [--windows 16] [--seqlen 2048]

1. The reference protocol for one block (random weights, random token ids through random embeddings):
   gather the statistics of `windows` x `seqlen` tokens, prune the six Linears, re-run the pruned block.
   This is `prune_model` on a one-block model, exactly what a real run does per block, after an untimed
   warm-up run on one window (first-call costs). The reference calibrates on 128 windows; to finish in a
   minute or two we run 16 by default and scale the part that grows with the windows (gather and re-run:
   the run's time less the time spent inside the pruners, both from the same run) to 128.
   `--windows 128` measures it outright (~4 min on a 2-core CPU).
2. The pruning step alone (statistics given): SparseGPT and Wanda on all six Linears.
3. Wanda's selection (`pruners.prune_lowest` on Wanda scores, the exact-k path with its tie step) for each
   `select`, as a ratio to the reference `sort`, measured in the same run: the basis of FASTEST_SELECT.
   The last case has more dead inputs than rho prunes, so every row ties at the threshold 0 and the tie
   step runs on every row (the benchmark checks that it does).

Times are medians of --repeats runs after a warm-up, interleaved (the protocol: one run each). On a shared
CPU expect noise.
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the library, its thread policy first
import thread_policy  # noqa: E402,F401  how torch's OpenMP threads wait: set before torch loads it
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the helpers the tests share
from opt_model import OPTConfig, OPTForCausalLM  # noqa: E402
from pruners import SELECTS, prune_lowest, prune_model, sparsegpt_prune, wanda_mask, wanda_score  # noqa: E402

from kit.references import tied_rows  # noqa: E402
from kit.timing import timed  # noqa: E402

RHO = 0.5  # the paper's headline active ratio
REFERENCE_WINDOWS = 128  # calibration windows of 2048 tokens in SparseGPT and Wanda
STAT_TOKENS = 4096  # tokens behind the statistics of the prune-only timings; their content does not change the work
SHAPES = {"q/k/v/out_proj 768x768": (768, 768), "fc1 3072x768": (3072, 768), "fc2 768x3072": (768, 3072)}
# fc2 inputs come out of a ReLU: an input that never fired scores 0 in every row. With more of them than the
# 1 - RHO pruned, the k-th smallest score is 0 in every row and its ties decide: the exact-k tie step runs.
DEAD_FRACTION = 0.6


def bench_protocol(model, calib_ids, device):
    """One prune_model run per method, after a warm-up on one window; the part beyond the pruners (gather and
    re-run) is scaled to the reference's windows. The pruners' share is timed inside the same run."""
    import pruners

    windows = len(calib_ids)
    print(f"  {'method':<10}{f'{windows} windows':>14}{'of it pruning':>15}{f'~{REFERENCE_WINDOWS} windows':>16}")
    for method in ("wanda", "sparsegpt"):
        prune_model(copy.deepcopy(model), calib_ids[:1], method, RHO, device=device, progress=False)  # warm-up
        name = "wanda_mask" if method == "wanda" else "sparsegpt_prune"
        pruner, inside = getattr(pruners, name), []

        def timed_pruner(*args, **kwargs):
            start = time.perf_counter()
            out = pruner(*args, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            inside.append(time.perf_counter() - start)
            return out

        setattr(pruners, name, timed_pruner)  # prune_model looks its pruners up at each call
        try:
            trial = copy.deepcopy(model)
            start = time.perf_counter()
            prune_model(trial, calib_ids, method, RHO, device=device, progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        finally:
            setattr(pruners, name, pruner)
        pruning = sum(inside)
        scaled = pruning + (seconds - pruning) * REFERENCE_WINDOWS / windows
        print(f"  {method:<10}{seconds:>12.2f} s{pruning:>13.2f} s{scaled:>14.1f} s")


def bench_prune_only(block, device, repeats):
    """Median time to prune all six Linears of `block`, statistics given; returns it per method."""
    g = torch.Generator(device=device).manual_seed(0)
    linears = block.linears()
    stats = {}
    for name, layer in linears.items():
        X = torch.randn(STAT_TOKENS, layer.in_features, device=device, generator=g)  # (tokens, d_in)
        stats[name] = ((X ** 2).sum(dim=0), 2 * X.T @ X)

    def all_six(method):
        for name, layer in linears.items():
            x_sqnorm, H = stats[name]
            if method == "wanda":
                wanda_mask(layer.weight, x_sqnorm, RHO)
            else:
                sparsegpt_prune(layer.weight, H, RHO)

    methods = ("wanda", "sparsegpt")
    times = {name: statistics.median(t) for name, t in
             timed({method: lambda method=method: all_six(method) for method in methods}, repeats, device).items()}
    for method, seconds in times.items():
        print(f"  {method:<10}{seconds:>12.3f} s")


def bench_selection(device, repeats):
    g = torch.Generator(device=device).manual_seed(0)
    cases = {label: (shape, False) for label, shape in SHAPES.items()}
    cases[f"fc2 768x3072, {DEAD_FRACTION:.0%} dead inputs"] = (SHAPES["fc2 768x3072"], True)
    print(f"  {'matrix':<32}{'sort ms':>9}" + "".join(f"{s + '/sort':>16}" for s in SELECTS[1:]) + f"{'tied rows':>11}")
    for label, ((d_out, d_in), dead) in cases.items():
        W = torch.randn(d_out, d_in, device=device, generator=g)
        x_sqnorm = torch.rand(d_in, device=device, generator=g)
        if dead:
            x_sqnorm[torch.randperm(d_in, device=device, generator=g)[:int(DEAD_FRACTION * d_in)]] = 0
        S, k = wanda_score(W, x_sqnorm), int(d_in * (1 - RHO))
        tied = tied_rows(S, k)
        if dead and tied < d_out:
            raise SystemExit(f"FAILED: {label}: only {tied} of {d_out} rows tie at the threshold, "
                             "so the tie step is not what is timed")
        times = {name: statistics.median(t) for name, t in
                 timed({s: lambda s=s: prune_lowest(S, k, s) for s in SELECTS}, repeats, device).items()}
        print(f"  {label:<32}{1e3 * times['sort']:>9.2f}"
              + "".join(f"{times[s] / times['sort']:>16.3f}" for s in SELECTS[1:]) + f"{tied:>11}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--windows", type=int, default=16, help="calibration windows (the reference: 128)")
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per window (the reference: 2048)")
    parser.add_argument("--repeats", type=int, default=5)
    cli = parser.parse_args()
    device = torch.device(cli.device)
    torch.manual_seed(0)

    config = OPTConfig(num_hidden_layers=1)  # OPT-125M's shapes: hidden 768, ffn 3072, 12 heads
    model = OPTForCausalLM(config).requires_grad_(False).to(device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, rho {RHO}\n")

    print(f"one block, pruning step alone (statistics of {STAT_TOKENS} random tokens given), "
          f"median of {cli.repeats}")
    bench_prune_only(model.decoder.layers[0], device, cli.repeats)

    calib_ids = torch.randint(0, config.vocab_size, (cli.windows, cli.seqlen))
    print(f"\none block, whole protocol: gather {cli.windows} x {cli.seqlen} tokens, prune six Linears, re-run")
    bench_protocol(model, calib_ids, device)

    print(f"\nWanda selection, exact k = int(d_in * (1 - rho)) per row, median of {cli.repeats}")
    bench_selection(device, cli.repeats)


if __name__ == "__main__":
    main()
