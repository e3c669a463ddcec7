"""The paper's Figure 3: how long Wanda's per-row selection takes with each exact kernel.

μ-MoE runs Wanda's selection for every Linear of every prompt, so its speed decides whether test-time
pruning is cheap in wall time. This times `pruners.prune_lowest(S, k, select)` -- the exact-k selection
of each row of the scores S = |W| * ||X||_2, ties included, that `wanda_mask` runs -- for

    square matrices   d x d,  d in 768 ... 8192
    OPT shapes        fc1 (4d x d) and fc2 (d x 4d) for OPT hidden sizes d (125m: 768, 1.3b: 2048, ...)

at rho = 0.25, 0.5, 0.75, with select = sort (Wanda's reference), topk and kthvalue (the paper's faster
choices) and partition (numpy's introselect; on CUDA pruners falls back to kthvalue, so it is skipped).
Every select gives the identical mask (tested in test_pruners); only the time differs. The score itself
(`wanda_score`, the same for every select) is timed once per matrix and shown beside them.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pruners import SELECTS, prune_count, prune_lowest, wanda_score  # noqa: E402

RHOS = (0.25, 0.5, 0.75)
SQUARE_SIZES = (768, 1024, 2048, 4096, 8192)
OPT_HIDDEN_SIZES = (768, 2048)  # 125m and 1.3b; 4096 (6.7b) adds two 67M-weight shapes: pass --opt-hidden
FFN_RATIO = 4  # every OPT has ffn_dim = 4 * hidden_size
MIN_SECONDS = 0.3  # repeat a measurement until this much time is spent ...
MAX_REPEATS = 5    # ... but at most this often; the median is reported


def shapes(square_sizes, opt_hidden_sizes) -> list[tuple[str, int, int]]:
    """(label, d_out, d_in) of every matrix to time."""
    out = [(f"square {d}", d, d) for d in square_sizes]
    for d in opt_hidden_sizes:
        out += [(f"fc1 {FFN_RATIO * d}x{d}", FFN_RATIO * d, d), (f"fc2 {d}x{FFN_RATIO * d}", d, FFN_RATIO * d)]
    return out


def median_seconds(fn, device) -> float:
    """Median wall time of fn(), after one warm-up call (allocator, kernels, numpy)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    fn()
    times = []
    while len(times) < MAX_REPEATS and sum(times) < MIN_SECONDS:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
                for kind, marker, style in (("square", "o", "-"), ("opt", "s", ":")):
                    points = sorted((r["d_out"] * r["d_in"], r["seconds"]) for r in results
                                    if (r["device"], r["rho"], r["select"]) == (device, rho, select)
                                    and r["label"].startswith("square") == (kind == "square"))
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
    header = f"{'device':6} {'matrix':>18} {'score':>8} {'rho':>5} " + " ".join(f"{s:>9}" for s in SELECTS)
    print(header + f" {'sort/best':>9}")
    for device in args.devices:
        generator = torch.Generator(device).manual_seed(0)
        for label, d_out, d_in in shapes(square, opt_hidden):
            W = torch.randn(d_out, d_in, device=device, generator=generator)
            x_sqnorm = torch.rand(d_in, device=device, generator=generator) * 100  # sum over T tokens of X_tj^2
            score_seconds = median_seconds(lambda: wanda_score(W, x_sqnorm), device)
            S = wanda_score(W, x_sqnorm)
            for rho in RHOS:
                row, k = {}, prune_count(d_in, rho)
                for select in SELECTS:
                    if select == "partition" and device != "cpu":
                        continue  # pruners runs kthvalue for it off the CPU
                    row[select] = median_seconds(lambda: prune_lowest(S, k, select), device)
                    results.append(dict(device=device, label=label, d_out=d_out, d_in=d_in, rho=rho, select=select,
                                        seconds=row[select], score_seconds=score_seconds))
                cells = " ".join(f"{1e3 * row[s]:9.2f}" if s in row else f"{'-':>9}" for s in SELECTS)
                print(f"{device:6} {label:>18} {1e3 * score_seconds:8.2f} {rho:5.2f} {cells} "
                      f"{row['sort'] / min(row.values()):9.1f}x", flush=True)
            del W, S

    Path(args.out).write_text(json.dumps(dict(torch=torch.__version__, threads=torch.get_num_threads(),
                                              results=results), indent=1))
    print(f"numbers saved to {args.out}")
    plot(results, args.plot)


if __name__ == "__main__":
    main()
