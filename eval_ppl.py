"""Perplexity on WikiText-2, PTB and C4 by the SparseGPT/Wanda protocol, and the command for the paper's table.

This file owns the evaluation protocol of the paper's tables and the one command that runs them:

    python eval_ppl.py --model opt-125m --rho 0.5

loads OPT, evaluates the dense model, prunes it with magnitude, Wanda (calibrated on each of WikiText-2,
PTB and C4) and SparseGPT (C4), evaluates each, evaluates μ-MoE (each window routed on itself), and prints
one table per rho: a row per method, WT2 / PTB / C4 / Avg columns. A LLaMA-family model (Llama 1/2/3,
Mistral, Qwen2: `--model meta-llama/Llama-2-7b-hf`) runs Wanda's LLaMA protocol instead: WikiText-2 only,
every calibrated method on C4 (PTB and C4 evaluation are one `--datasets` away).

The data protocol (the evaluation streams and calibration windows of IST-DASLab/sparsegpt and locuslab/wanda,
each family's defaults) is corpora.py's; this file owns the perplexity of SparseGPT's `opt_eval` and Wanda's
`eval_ppl`, exp(mean over windows of the window's mean next-token NLL), and the command around it.

With `--mumoe-prefix P` (μ-MoE routes on the first P tokens of each window) every row of the run is scored
strictly causally instead: on the targets after the prefix only, tokens P..seqlen-1, which no router saw.
With `--nm N:M` every method prunes N of every M consecutive weights of each row instead of a ratio (μ-MoE:
each window its own N of every M). Under torchrun the windows and the calibration are shared among the ranks
(distributed.py).
"""

import ctrl_c

if __name__ == "__main__":  # Ctrl-C while the imports below load torch (seconds): one line and exit 130, no traceback
    ctrl_c.exit_at_once("eval_ppl.py")

import thread_policy  # noqa: F401  before torch: libgomp reads how its threads wait when torch loads it

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import distributed
import models
import mumoe
import pruners
from checkpoint import BlockFn, UsageError, dense_block, resolve_checkpoint
from command_line import (CALIBRATED, MAGNITUDE_GROUP, METHODS, NAMES, SPARSEGPT_BLOCKSIZE,
                          ArgumentParser, active_ratio, add_device_options, add_mumoe_prefix, add_mumoe_routing,
                          add_out_and_resume, add_select_and_decode, available_memory, check_calibration_memory,
                          check_nm_fits, in_plan_order, main_of, nm_active_ratio, nm_name,
                          nm_pattern, positive_int, start_run, window_length)
from corpora import (DATASETS, DEFAULT_CALIB, DEFAULT_DATASETS, EVAL_SPLIT, LABELS, MAX_DEFAULT_SEQLEN,
                     calibration_windows, evaluation_ids, load_rows, save_rows, windows)
import results_file
from results_file import check_writable, write_json

# -----------------------------------------------------------------------------
# Perplexity

MAX_EXP = math.log(sys.float_info.max)  # ≈ 709.8: math.exp of more overflows a float


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, device=None, run_block: BlockFn = dense_block,
               offload: bool = False, desc: str = "perplexity", first_target: int = 1) -> float:
    """exp(mean over windows of the window's mean next-token NLL) of token windows ids (N, seqlen).

    The targets of a window are its tokens first_target..seqlen-1, each predicted from the logits of the
    token before it. The protocol scores 1..seqlen-1; a μ-MoE run routed on a prefix of P tokens is scored
    on P..seqlen-1 (`first_target=P`), the tokens the router did not see.

    The loop runs block by block, as SparseGPT's `opt_eval`: all windows are embedded, then every window goes
    through block 0, then through block 1, ... so only one block needs to be on `device` at a time. The
    hidden states of all windows, (N, seqlen, hidden), live on `device`, as in the reference; with
    `offload` the model stays in CPU memory, each block visits `device` for its turn, and the hidden
    states wait in CPU memory too (one window is on the device at a time).
    `run_block` is how a block runs: dense, or with each window routed on itself (`mumoe.routed_block`).
    `device` defaults to where the model is. Under torchrun each rank runs its share of the windows
    (`distributed.shard`) and the per-window NLLs are all-reduced: every rank returns the same perplexity.
    """
    N, T = ids.shape
    if not 1 <= first_target < T:
        raise ValueError(f"first_target {first_target} leaves no target in a window of {T} tokens")
    mine = distributed.shard(N)  # under torchrun, this rank's windows; alone, all of them
    window_nll = torch.zeros(N, dtype=torch.float64)
    ids = ids[mine]
    weight = next(model.parameters())
    device = torch.device(device) if device is not None else weight.device
    store = torch.device("cpu") if offload else device  # where the hidden states of all windows wait
    for module in model.outer_modules():
        module.to(device)
    x = torch.empty(len(ids), T, model.config.hidden_size, dtype=weight.dtype, device=store)
    for i in range(len(ids)):
        x[i] = model.embed(ids[i : i + 1].to(device))[0]
    for block in tqdm(model.blocks, desc=desc, leave=False):
        block.to(device)
        for i in range(len(ids)):
            x[i] = run_block(block, x[i : i + 1].to(device))[0]
        if offload:
            block.to("cpu")
    for i in range(len(ids)):
        logits = model.head(x[i : i + 1].to(device))[0].float()  # (T, vocab), the loss in float32 whatever the dtype
        # The reference computes loss * seqlen per window, sums, and divides by N * seqlen: the mean of the
        # windows' mean NLL, written here plainly. Each window predicts its own T - first_target next tokens.
        nll = F.cross_entropy(logits[first_target - 1 : -1], ids[i, first_target:].to(device))
        window_nll[mine.start + i] = nll.item()
    if offload:
        for module in model.outer_modules():
            module.to("cpu")
    distributed.all_reduce_sum(window_nll)  # every entry from the one rank that has the window: exact
    mean_nll = math.fsum(window_nll.tolist()) / N
    return math.exp(mean_nll) if mean_nll < MAX_EXP else math.inf  # a broken model's perplexity, not an OverflowError


# -----------------------------------------------------------------------------
# The command line: one table per rho, as the paper lays it out



def calib_token(text: str) -> tuple[str | None, tuple[str, ...]]:
    """'ptb,c4' (for every calibrated method) or 'wanda=ptb,c4' (for one) -> (method or None, datasets)."""
    method, _, names = text.rpartition("=")
    if method and method not in CALIBRATED:
        raise argparse.ArgumentTypeError(f"{method!r} takes no calibration data; calibrated: {', '.join(CALIBRATED)}")
    for dataset in names.split(","):
        if dataset not in DATASETS:
            raise argparse.ArgumentTypeError(f"unknown dataset {dataset!r} (choose from {', '.join(DATASETS)})")
    return method or None, tuple(names.split(","))


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="eval_ppl.py", description="Perplexity of dense, pruned and μ-MoE models (OPT, the "
                       "LLaMA family, Gemma 3, a LLaVA's language model) on WikiText-2, PTB and C4, by the "
                       "SparseGPT/Wanda protocol.")
    p.add_argument("--model", required=True, help="opt-125m ... opt-66b, a hub id, a local model directory or a "
                   ".gguf file")
    sparsity = p.add_mutually_exclusive_group()
    sparsity.add_argument("--rho", type=active_ratio, nargs="+", help="active-weight ratio(s), in (0, 1] (default: 0.5)")
    sparsity.add_argument("--nm", type=nm_pattern, metavar="N:M", help="prune N of every M consecutive weights of "
                          "each row instead (e.g. 2:4, the pattern sparse GPU kernels accelerate); for μ-MoE each "
                          "window picks its own N of every M")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD",
                   help=f"any of {' '.join(METHODS)} (default: all)")
    p.add_argument("--calib", nargs="+", type=calib_token, default=[], metavar="[METHOD=]DATASET[,...]",
                   help="calibration sets: 'ptb' for every calibrated method, or per method; default for OPT "
                        "'wanda=wikitext2,ptb,c4 sparsegpt=c4', as the paper's table; for LLaMA 'c4', as Wanda")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, metavar="DATASET",
                   help=f"any of {' '.join(DATASETS)} (default: all for OPT, wikitext2 for LLaMA, as Wanda)")
    p.add_argument("--nsamples", type=positive_int, metavar="N", default=128, help="calibration windows (default: 128)")
    p.add_argument("--seqlen", type=window_length, metavar="T", help="tokens per window (default: the model's "
                   f"max_position_embeddings up to {MAX_DEFAULT_SEQLEN}: OPT 2048, LLaMA-1 2048, Llama-2 4096, "
                   f"Llama 3, Mistral and Qwen2 {MAX_DEFAULT_SEQLEN}, as the references use the model's context)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draws (default: 0)")
    add_device_options(p, offload="the model")
    p.add_argument("--max-windows", type=positive_int, metavar="N", help="evaluate the first N windows only (quick runs)")
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="read {dataset}.{split}.jsonl rows from here (offline)")
    p.add_argument("--save-data", type=Path, metavar="DIR", help="write the rows this run needs into DIR in "
                   "the --data-dir layout (downloading them, or from --data-dir), then read them from there")
    add_mumoe_prefix(p, "μ-MoE routes on the first P tokens of each window only, and every row of the run is scored "
                        "on tokens P..seqlen-1 (strictly causal)")
    add_mumoe_routing(p, "block: each block's Linears route on the statistics of its dense pass over the window, "
                         "Wanda's procedure per window (default, row 'μ-MoE'); linear: each Linear routes on its "
                         "own input in a single pass (row 'μ-MoE (one pass)'); give both for both rows", many=True)
    add_select_and_decode(p, decode=False)
    add_out_and_resume(p, Path("results.json"), "every number, with its settings")
    p.add_argument("--plot", type=Path, nargs="?", const=Path("ppl_vs_rho.png"), metavar="PNG",
                   help="perplexity against active weights for each rho, as the paper's Figure 4 (default: ppl_vs_rho.png)")
    args = p.parse_args(argv)
    args.rho = [nm_active_ratio(args.nm)] if args.nm else args.rho or [0.5]
    return args


def resolve_defaults(args, family: str, max_positions: int) -> None:
    """Fill in what depends on the model family: datasets, calibration sets (--calib as given, per method or
    for all, else the family's protocol) and seqlen."""
    args.datasets = args.datasets or list(DEFAULT_DATASETS[family])
    everyone = [d for method, datasets in args.calib if method is None for d in datasets]
    calib = {m: tuple(everyone) or DEFAULT_CALIB[family][m] for m in CALIBRATED}
    calib.update({method: datasets for method, datasets in args.calib if method})
    args.calib = {m: calib[m] for m in CALIBRATED if m in args.methods}
    args.seqlen = args.seqlen or min(max_positions, MAX_DEFAULT_SEQLEN)


def row_key(result: dict) -> tuple:
    """What a row computed: method, rho, N:M pattern, calibration set, μ-MoE routing."""
    return result["method"], result["rho"], result.get("nm"), result["calib"], result.get("routing")


def progress(result: dict) -> str:
    """One line per finished row while the run goes on."""
    sparsity = result.get("nm") or f"rho {result['rho']}"
    return f"{label(result)}, {sparsity}: " + ", ".join(f"{LABELS[d]} {p:.2f}" for d, p in result["ppl"].items())


def label(result: dict) -> str:
    name = NAMES[result["method"]] + (f" ({LABELS[result['calib']]})" if result["calib"] else "")
    name += " (one pass)" if result.get("routing") == "linear" else ""
    return name + (f" (prefix {result['prefix']})" if result["prefix"] else "")


def table(results: list[dict], rho: float, model_name: str, nm: str | None = None, scored_on: str | None = None) -> str:
    """The paper's layout: one row per method, WT2 / PTB / C4 / Avg, the dense perplexity in the heading.
    The rows pruned to `rho`, or with the N:M pattern `nm` (e.g. "2:4", whose rho is 0.5); `scored_on`
    ("tokens 512..2047") heads a strictly causal run."""
    datasets = list(results[0]["ppl"])
    heading = f"{model_name}, " + (f"{nm} ({rho:.0%} active)" if nm else f"active weights {rho:.0%}")
    heading += f", scored on {scored_on}" if scored_on else ""
    for r in [r for r in results if r["method"] == "dense"][:1]:
        heading += " — dense " + ", ".join(f"{LABELS[d]} {r['ppl'][d]:.2f}" for d in datasets)
    rows = [r for r in results if r["method"] != "dense" and r["rho"] == rho and r.get("nm") == nm]
    cells = [[f"{r['ppl'][d]:.2f}" for d in datasets] + [f"{r['avg']:.2f}"] for r in rows]
    width = 2 + max([8] + [len(cell) for row in cells for cell in row])  # a pruned model's ppl can reach 1e5
    first = max([20] + [len(label(r)) for r in rows])
    lines = [heading, " " * first + "".join(f"{h:>{width}}" for h in [LABELS[d] for d in datasets] + ["Avg"])]
    lines += [f"{label(r):<{first}}" + "".join(f"{cell:>{width}}" for cell in row) for r, row in zip(rows, cells)]
    return "\n".join(lines)


def plot(results: list[dict], path: Path):
    """The paper's Figure 4: perplexity against the active-weight ratio, a panel per dataset and, beside them, one
    for their average (the paper's panel); dense is a dashed line. Returns the (closed) figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(results[0]["ppl"])
    panels = datasets + ["avg"] if len(datasets) > 1 else datasets  # one dataset is its own average
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    curves = {}
    for r in sorted(results, key=lambda r: r["rho"]):
        curves.setdefault(label(r) + (f" {r['nm']}" if r.get("nm") else ""), []).append(r)
    for ax, panel in zip(axes[0], panels):
        ppl = (lambda r: r["avg"]) if panel == "avg" else (lambda r: r["ppl"][panel])
        for name, points in curves.items():
            if points[0]["method"] == "dense":
                ax.axhline(ppl(points[0]), color="black", linestyle="--", label=name)
            else:
                ax.plot([100 * r["rho"] for r in points], [ppl(r) for r in points], marker="o", label=name)
        title = "average of " + ", ".join(LABELS[d] for d in datasets) if panel == "avg" else LABELS[panel]
        ax.set(title=title, xlabel="active weights (%)", ylabel="perplexity", yscale="log")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return fig


# -----------------------------------------------------------------------------
# Guarding a run of hours: bad input refused before any work, every row saved as it finishes, --resume


def write_results(path: Path, settings: dict, results: list[dict]) -> None:
    """Every number with its settings; a perplexity that is not finite (a model broken by pruning) is null."""
    write_json(path, {"settings": settings, "results": results})


RESUME_SETTINGS = ("model", "seqlen", "windows", "nsamples", "seed", "dtype", "mumoe_prefix")


def finished_rows(path: Path, settings: dict) -> dict[tuple, dict]:
    """The rows of the results file `path` by row_key, for --resume; a UsageError naming the settings that differ.

    A row is reused when this run plans the same row_key: method, rho, N:M pattern, calibration set and
    routing. The settings every row depends on must match the file's, or the table would mix numbers
    that do not compare: model, seqlen, windows (per dataset), nsamples and seed (the calibration
    windows), dtype, and the μ-MoE prefix (which also sets the tokens scored)."""
    return results_file.finished_rows(path, settings, RESUME_SETTINGS, row_key, "eval_ppl.py", read_row=not_finite)


def not_finite(row: dict) -> dict:
    """A stored row with its null perplexities (not finite: a model broken by pruning) back as NaN."""
    row["ppl"] = {d: math.nan if p is None else p for d, p in row["ppl"].items()}
    row["avg"] = math.nan if row["avg"] is None else row["avg"]
    return row


# -----------------------------------------------------------------------------
# The run: the plan of rows (method, rho, calibration, routing), each pruned or routed, then evaluated


def main(argv=None) -> int:
    return main_of("eval_ppl.py", argv, parse_args, run, rows_saved)


def rows_saved(args) -> str:
    """What Ctrl-C's line says is kept: how many rows the --out file holds."""
    try:
        saved = len(json.loads(args.out.read_text(encoding="utf-8"))["results"])
    except (OSError, ValueError, KeyError, TypeError):
        saved = 0
    return f"{saved} rows saved in {args.out}"


def run(args) -> list[dict]:
    device, dtype, _ = start_run(args)  # rank 0 checks the input and downloads the model and data first
    if args.plot and distributed.is_main():
        check_writable(args.plot, "--plot")
    directory = resolve_checkpoint(args.model)
    family = models.text_family(directory)  # a LLaVA: its language model
    config = family.read_config(directory / "config.json")
    resolve_defaults(args, family.FAMILY, config.max_position_embeddings)
    if args.seqlen > config.max_position_embeddings:
        raise UsageError(f"--seqlen {args.seqlen} exceeds the model's max_position_embeddings "
                         f"{config.max_position_embeddings}")
    if args.mumoe_prefix and args.mumoe_prefix >= args.seqlen:
        raise UsageError(f"--mumoe-prefix {args.mumoe_prefix} leaves no token to score in a window of --seqlen "
                         f"{args.seqlen}: the rows are scored on the tokens after the prefix")
    needed = [(d, EVAL_SPLIT[d]) for d in args.datasets]
    needed += [(d, "train") for d in DATASETS if any(d in datasets for datasets in args.calib.values())]
    if args.save_data and distributed.is_main():
        for dataset, split in needed:
            save_rows(load_rows(dataset, split, args.data_dir), args.save_data, dataset, split)
    if args.save_data:
        args.data_dir = args.save_data
    for dataset, split in needed if args.data_dir else []:
        load_rows(dataset, split, args.data_dir)  # a missing file or a malformed line: now, not after an hour of pruning
    if args.nm:
        check_nm_fits(args.nm, models.empty_model(config), "sparsegpt" in args.methods)
    if args.calib:  # a calibrated method will run
        check_calibration_memory(distributed.share_size(args.nsamples), args.seqlen, config.hidden_size, dtype,
                                 available_memory(device), str(device))

    tokenizer = family.load_tokenizer(directory)
    test = {d: windows(evaluation_ids(d, tokenizer, args.seqlen, args.data_dir), args.seqlen)[: args.max_windows]
            for d in args.datasets}
    print(f"windows of {args.seqlen} tokens: " + ", ".join(f"{LABELS[d]} {len(w)}" for d, w in test.items()))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    nm = settings["nm"] = nm_name(args.nm) if args.nm else None
    first_target = args.mumoe_prefix or 1  # strictly causal with a prefix: no row is scored on what a router saw
    settings["scored_on"] = f"tokens {first_target}..{args.seqlen - 1}"
    settings.update(device=str(device), dtype=str(dtype).removeprefix("torch."), torch=torch.__version__,
                    magnitude_group=MAGNITUDE_GROUP, windows={d: len(w) for d, w in test.items()},
                    **thread_policy.settings())
    plan = [("dense", 1.0, None, None, None)] if "dense" in args.methods else []  # each row's row_key
    plan += [(m, rho, nm, c, r) for rho in args.rho for m in METHODS[1:] if m in args.methods
             for c in (args.calib[m] if m in CALIBRATED else [None])
             for r in (args.mumoe_routing if m == "mumoe" else [None])]

    done = results_file.rows_to_keep(args.out, args.resume, args.force, lambda: finished_rows(args.out, settings))
    rows = dict(done)  # row_key -> row: the file's finished rows, then this run's
    if distributed.is_main():
        distributed.barrier()  # the input is good and everything is downloaded: the other ranks may start

    # Each pruned model starts from a fresh load of the checkpoint: a read of the (page-cached) safetensors,
    # seconds next to minutes of pruning, and no second copy of the weights in memory.
    model, pruned, calib = None, False, {}
    for key in plan:
        method, rho, _, calib_set, routing = key
        if key in done:
            print(f"{progress(done[key])} (kept from {args.out})")
            continue
        if model is None or pruned:
            del model
            model, pruned = family.load_model(directory, "cpu" if args.offload else device, dtype), False
        start, run_block = time.time(), dense_block
        if method == "mumoe":
            run_block = mumoe.routed_block(mumoe.MuMoE(rho, routing=routing, select=args.select,
                                                        prefix=args.mumoe_prefix, nm=args.nm))
        elif method != "dense":
            if calib_set and calib_set not in calib:  # one draw per dataset, shared by every method and rho
                calib[calib_set] = calibration_windows(calib_set, tokenizer, args.nsamples, args.seqlen,
                                                       args.seed, args.data_dir)
            pruners.prune_model(model, calib.get(calib_set), method, rho, nm=args.nm, select=args.select,
                                group=MAGNITUDE_GROUP, blocksize=SPARSEGPT_BLOCKSIZE,
                                device=device if args.offload else None)
            pruned = True
        ppl = {d: perplexity(model, w, device, run_block, args.offload, f"{method} rho={rho} {d}", first_target)
               for d, w in test.items()}
        rows[key] = dict(method=method, rho=rho, nm=nm if method != "dense" else None, calib=calib_set, ppl=ppl,
                         avg=sum(ppl.values()) / len(ppl), prefix=args.mumoe_prefix if method == "mumoe" else None,
                         seconds=time.time() - start, **({"routing": routing} if method == "mumoe" else {}))
        print(f"{progress(rows[key])} ({rows[key]['seconds']:.0f} s)", flush=True)
        if distributed.is_main():
            write_results(args.out, settings, in_plan_order(rows, plan))

    results = in_plan_order(rows, plan)
    for rho in args.rho:
        print("\n" + table(results, rho, args.model, nm, settings["scored_on"] if args.mumoe_prefix else None))
    print(f"\nresults: {args.out}")
    if args.plot and distributed.is_main():
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    return results


if __name__ == "__main__":
    ctrl_c.end("eval_ppl.py", main())
