"""The paper's Figure 3: how long Wanda's per-row selection takes with each exact kernel.

μ-MoE runs Wanda's selection for every Linear of every prompt, so its speed decides whether test-time
pruning is cheap in wall time. This times `pruners.prune_lowest(S, k, select)` -- the exact-k selection
of each row of the scores S = |W| * ||X||_2, ties included, that `wanda_mask` runs -- for

    square matrices   d x d,  d in 768 ... 8192
    OPT shapes        fc1 (4d x d) and fc2 (d x 4d) for OPT hidden sizes d (125m: 768, 1.3b: 2048, ...)
    ties              fc2 again, with 80% dead inputs: fc2 reads a ReLU, and an input that never fires on a
                      prompt scores 0 in every row. 80% is more than any rho here prunes, so every row ties at
                      the threshold 0 and the exact-k tie step runs (checked); random scores alone never tie.

at rho = 0.25, 0.5, 0.75, with select = sort (Wanda's reference), topk and kthvalue (the paper's faster
choices) and partition (numpy's introselect; on CUDA pruners falls back to kthvalue, so it is skipped).
Every select gives the identical mask (tested in test_pruners); only the time differs. The score itself
(`wanda_score`, the same for every select) is timed once per matrix and shown beside them. The selects of
one matrix and rho take turns call by call (after a warm-up call each), so that a burst of load from another
process slows them alike instead of skewing one ratio.
Prints a table, saves the numbers as JSON and, if matplotlib is installed, a log-log plot as PNG.

    python benchmarks/bench_selection.py                      # about 2-3 minutes on a 2-core CPU
    python benchmarks/bench_selection.py --quick              # seconds: 768 and 2048 only
    python benchmarks/bench_selection.py --square 1024 4096 --opt-hidden 5120 --devices cpu cuda
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the library, its thread policy first
import thread_policy  # noqa: E402,F401  how torch's OpenMP threads wait: set before torch loads it
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the helpers the tests share
from pruners import SELECTS, prune_count, prune_lowest, wanda_score  # noqa: E402
from kit.references import tied_rows  # noqa: E402

RHOS = (0.25, 0.5, 0.75)
SQUARE_SIZES = (768, 1024, 2048, 4096, 8192)
OPT_HIDDEN_SIZES = (768, 2048)  # 125m and 1.3b; 4096 (6.7b) adds two 67M-weight shapes: pass --opt-hidden
FFN_RATIO = 4  # every OPT has ffn_dim = 4 * hidden_size
MIN_SECONDS = 0.3  # repeat the rounds until every kernel has spent this much time ...
MAX_REPEATS = 5    # ... but at most this often; the median is reported
DEAD_FRACTION = 0.8  # of the tie case's inputs: above the largest pruned fraction, 1 - min(RHOS) = 0.75


def shapes(square_sizes, opt_hidden_sizes) -> list[tuple[str, int, int, float]]:
    """(label, d_out, d_in, fraction of dead inputs) of every matrix to time."""
    out = [(f"square {d}", d, d, 0.0) for d in square_sizes]
    for d in opt_hidden_sizes:
        f = FFN_RATIO * d
        out += [(f"fc1 {f}x{d}", f, d, 0.0), (f"fc2 {d}x{f}", d, f, 0.0),
                (f"fc2 {d}x{f} {DEAD_FRACTION:.0%} dead", d, f, DEAD_FRACTION)]
    return out


def median_seconds(fns: dict, device) -> dict[str, float]:
    """Median wall time of each fn in fns, after one warm-up call each (allocator, kernels, numpy). The fns take
    turns, one call each per round, the order rotated every round; rounds go on until every fn has spent
    MIN_SECONDS, or MAX_REPEATS rounds."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for fn in fns.values():
        fn()
    names, times = list(fns), {name: [] for name in fns}
    for round_ in range(MAX_REPEATS):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
        if min(sum(t) for t in times.values()) >= MIN_SECONDS:
            break
    return {name: statistics.median(t) for name, t in times.items()}


def kind_of(result) -> str:
    return "ties" if result["dead_inputs"] else "square" if result["label"].startswith("square") else "opt"


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    devices = sorted({r["device"] for r in results})
    fig, axes = plt.subplots(len(devices), len(RHOS), figsize=(5 * len(RHOS), 4 * len(devices)), squeeze=False)
    for row, device in zip(axes, devices):
        for ax, rho in zip(row, RHOS):
            for select in SELECTS:
                for kind, marker, style in (("square", "o", "-"), ("opt", "s", ":"), ("ties", "^", "--")):
                    points = sorted((r["d_out"] * r["d_in"], r["seconds"]) for r in results
                                    if (r["device"], r["rho"], r["select"]) == (device, rho, select)
                                    and kind_of(r) == kind)
                    if points:
                        x, y = zip(*points)
                        ax.plot(x, [1e3 * t for t in y], marker=marker, linestyle=style,
                                color=f"C{SELECTS.index(select)}", label=f"{select} ({kind})")
            ax.set(xscale="log", yscale="log", xlabel="weights in the matrix", ylabel="ms",
                   title=f"{device}, rho = {rho}")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Wanda selection time per matrix (μ-MoE pays it per Linear and prompt)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot saved to {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--square", type=int, nargs="*", default=SQUARE_SIZES, help="square sizes d")
    parser.add_argument("--opt-hidden", type=int, nargs="*", default=OPT_HIDDEN_SIZES,
                        help="hidden sizes d of the OPT fc1/fc2 shapes")
    parser.add_argument("--quick", action="store_true", help="768 and 2048 only")
    parser.add_argument("--devices", nargs="*", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--out", default="results_selection.json")
    parser.add_argument("--plot", default="results_selection.png")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice); "
                        "1 gives steadier ratios on a machine that other jobs share")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    square, opt_hidden = ((768, 2048), (768,)) if args.quick else (args.square, args.opt_hidden)

    results = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; times in ms, median of up to {MAX_REPEATS}")
    header = f"{'device':6} {'matrix':>22} {'score':>8} {'rho':>5} " + " ".join(f"{s:>9}" for s in SELECTS)
    print(header + f" {'sort/best':>9}")
    for device in args.devices:
        generator = torch.Generator(device).manual_seed(0)
        for label, d_out, d_in, dead in shapes(square, opt_hidden):
            W = torch.randn(d_out, d_in, device=device, generator=generator)
            x_sqnorm = torch.rand(d_in, device=device, generator=generator) * 100  # sum over T tokens of X_tj^2
            if dead:
                x_sqnorm[torch.randperm(d_in, device=device, generator=generator)[:int(dead * d_in)]] = 0
            score_seconds = median_seconds({"score": lambda: wanda_score(W, x_sqnorm)}, device)["score"]
            S = wanda_score(W, x_sqnorm)
            for rho in RHOS:
                k = prune_count(d_in, rho)
                if dead and tied_rows(S, k) < d_out:
                    raise SystemExit(f"FAILED: {label}, rho {rho}: only {tied_rows(S, k)} of {d_out} rows tie at "
                                     "the threshold, so the tie step is not what is timed")
                selects = [s for s in SELECTS if s != "partition" or device == "cpu"]  # off the CPU: kthvalue
                row = median_seconds({s: lambda s=s: prune_lowest(S, k, s) for s in selects}, device)
                results += [dict(device=device, label=label, d_out=d_out, d_in=d_in, dead_inputs=dead, rho=rho,
                                 select=s, seconds=row[s], score_seconds=score_seconds) for s in selects]
                cells = " ".join(f"{1e3 * row[s]:9.2f}" if s in row else f"{'-':>9}" for s in SELECTS)
                print(f"{device:6} {label:>22} {1e3 * score_seconds:8.2f} {rho:5.2f} {cells} "
                      f"{row['sort'] / min(row.values()):9.1f}x", flush=True)
            del W, S

    Path(args.out).write_text(json.dumps(dict(torch=torch.__version__, threads=torch.get_num_threads(),
                                              results=results), indent=1))
    print(f"numbers saved to {args.out}")
    plot(results, args.plot)


if __name__ == "__main__":
    main()
