"""Zero-shot task accuracy with lm-evaluation-harness: dense, pruned and μ-MoE models, each request routed on its
context.

This file owns the command for the other half of how pruned language models are judged:

    python eval_tasks.py --model opt-125m --rho 0.5

runs the seven zero-shot tasks of Wanda's paper (BoolQ, RTE, HellaSwag, WinoGrande, ARC-easy, ARC-challenge,
OpenBookQA) through EleutherAI's lm-evaluation-harness (`lm_eval.simple_evaluate`) for the dense model, magnitude,
Wanda and SparseGPT (pruned once, offline, on eval_ppl.py's calibration windows: C4 by default, as Wanda's
zero-shot runs) and μ-MoE, and prints one table per rho: a row per method, a column per task and their mean.

Each task's column is the accuracy lm-eval reports for it: acc_norm (the continuation's log-likelihood divided by
its length in bytes) where the task has it (HellaSwag, ARC, OpenBookQA), acc otherwise. The JSON file (--out)
keeps every setting and, per row, lm-eval's own `results[task]` dict for every task ("acc,none",
"acc_stderr,none", "acc_norm,none", ...), exactly as simple_evaluate returns it.

μ-MoE routes each request on its own context and scores the continuation with the experts that context chose
(lm_harness.HarnessLM: `--routing-scope context`, strictly causal, once per distinct context, so the four
choices of a question share one routing); `--routing-scope full` routes on context + continuation instead, as a
perplexity window is routed on its own tokens. `--mumoe-routing block linear` and `--nm N:M` as in eval_ppl.py.

Under torchrun (`torchrun --nproc-per-node 8 eval_tasks.py ...`) lm-eval splits each task's documents among the
ranks (HarnessLM's rank and world_size) and gathers their metrics on rank 0, which writes the file; the calibration
statistics are summed over the ranks' shares of the windows (pruners.prune_model). `--offload` keeps the model in
CPU memory, one block at a time on the GPU (checkpoint.offloaded).
"""

import ctrl_c

if __name__ == "__main__":  # Ctrl-C while the imports below load torch (seconds): one line and exit 130, no traceback
    ctrl_c.exit_at_once("eval_tasks.py")

import thread_policy  # noqa: F401  before torch: libgomp reads how its threads wait when torch loads it

import argparse
import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import corpora
import distributed
import models
import mumoe
import pruners
from checkpoint import UsageError, hub_offline, offloaded, resolve_checkpoint
from command_line import (CALIBRATED, INTERRUPTED, MAGNITUDE_GROUP, METHODS, NAMES, SPARSEGPT_BLOCKSIZE,  # noqa: F401
                          ArgumentParser, active_ratio, add_device_options, add_mumoe_routing, add_out_and_resume,
                          add_select_and_decode, available_memory, check_calibration_memory, check_nm_fits,
                          in_plan_order, main_of, nm_active_ratio, nm_name, nm_pattern, positive_int, start_run,
                          window_length)
from corpora import DATASETS
from lm_harness import SCOPES, HarnessLM
import results_file
from results_file import write_json

# Wanda's zero-shot tasks (its paper's Table 2 and lib/eval.py), in its order
TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
METRICS = ("acc_norm,none", "acc,none")  # the table's metric for a task: the first of these lm-eval reports
DEFAULT_CALIB = "c4"  # Wanda calibrates its zero-shot models on C4
DEFAULT_MAX_SEQLEN = corpora.MAX_DEFAULT_SEQLEN


def non_negative_int(text: str) -> int:
    if int(text) < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text}")
    return int(text)


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="eval_tasks.py", description="Zero-shot accuracy of dense, pruned and μ-MoE "
                             "models on lm-evaluation-harness tasks, each request routed on its own context.")
    p.add_argument("--model", required=True, help="opt-125m ..., a hub id, or a local model directory")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), metavar="TASK",
                   help=f"lm-eval task names (default: {' '.join(TASKS)})")
    sparsity = p.add_mutually_exclusive_group()
    sparsity.add_argument("--rho", type=active_ratio, nargs="+",
                          help="active-weight ratio(s), in (0, 1] (default: 0.5)")
    sparsity.add_argument("--nm", type=nm_pattern, metavar="N:M", help="prune N of every M consecutive weights of "
                          "each row instead (μ-MoE: each context its own N of every M)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD",
                   help=f"any of {' '.join(METHODS)} (default: all)")
    p.add_argument("--limit", type=positive_int, metavar="N", help="the first N documents of each task (lm-eval's "
                   "--limit, for a quick look; the numbers are then not the task's)")
    p.add_argument("--num-fewshot", type=non_negative_int, default=0, metavar="K", help="examples in each prompt "
                   "(default: 0, zero-shot)")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="B", help="requests per forward (dense "
                   "and pruned), continuations per forward after a routed context (μ-MoE) (default: 16)")
    p.add_argument("--include-path", type=Path, metavar="DIR", help="a directory of task YAMLs of one's own, "
                   "as lm-eval's --include_path")
    add_mumoe_routing(p, "block (default): Wanda's statistics of each block's dense pass over the context; linear: "
                         "each Linear on its own input, one pass; both for both rows", many=True)
    p.add_argument("--routing-scope", nargs="+", choices=SCOPES, default=["context"], metavar="SCOPE",
                   help="context (default): route on the context only, strictly causal; full: on context + "
                        "continuation; both for both rows")
    p.add_argument("--calib", choices=DATASETS, default=DEFAULT_CALIB, help="calibration data of Wanda and "
                   f"SparseGPT (default: {DEFAULT_CALIB}, as Wanda's zero-shot runs)")
    p.add_argument("--nsamples", type=positive_int, default=128, metavar="N", help="calibration windows (default: 128)")
    p.add_argument("--seqlen", type=window_length, metavar="T", help="tokens per calibration window (default: the "
                   f"model's context, at most {DEFAULT_MAX_SEQLEN}, as eval_ppl.py)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draws (default: 0)")
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="read the calibration rows {dataset}.train.jsonl "
                   "from here (offline), as eval_ppl.py")
    add_select_and_decode(p)
    add_device_options(p, offload="the model")
    add_out_and_resume(p, Path("tasks.json"), "every result, with its settings")
    args = p.parse_args(argv)
    args.rho = [nm_active_ratio(args.nm)] if args.nm else args.rho or [0.5]
    return args


# -----------------------------------------------------------------------------
# Tasks: lm-eval's own, or YAMLs of one's own


def task_manager(tasks: list[str], include_path: Path | None):
    """lm-eval's TaskManager that knows every task asked for; a UsageError naming the first one it does not know.
    Tasks of one's own are indexed alone (a second); lm-eval's thousands of YAMLs (some 15 s) only when needed."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not include_path.is_dir():
            raise UsageError(f"--include-path {include_path} is not a directory")
        own = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(task in own.all_tasks for task in tasks):
            return own
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise UsageError(f"unknown task {unknown[0]!r}: not among lm-eval's {len(manager.all_tasks)} tasks"
                         + (f" nor in --include-path {include_path}" if include_path else "")
                         + " (python -m lm_eval ls tasks lists them)")
    return manager


def check_task_data(tasks: list[str], manager, offline: str) -> None:
    """Offline: every task's documents load from the datasets cache or a local file, or a UsageError in one line,
    before any model is found (lm-eval loads them again, from the same cache, when it evaluates)."""
    lm_eval_log = logging.getLogger("lm_eval")
    level = lm_eval_log.level
    lm_eval_log.setLevel(logging.ERROR)  # its notes on each task's defaults: the run itself prints them again
    try:
        manager.load(tasks)
    except Exception as e:  # datasets' errors for a hub dataset offline vary with its version: any is the same story
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"the data of {' '.join(tasks)} cannot be loaded: the hub is offline ({offline}) and it is "
                         f"not in the datasets cache ({reason}); offline, run tasks with local data, such as "
                         "--include-path tasks/ptb_lastword --tasks ptb_lastword_mc") from None
    finally:
        lm_eval_log.setLevel(level)


def metric(task_result: dict) -> str:
    """The key of the accuracy the table shows for a task: acc_norm where lm-eval reports it, else acc (else the
    task's first metric, e.g. a generative task's exact_match)."""
    first = next((k for k in task_result if "," in k and "_stderr," not in k), None)
    return next((m for m in METRICS if m in task_result), first)


# -----------------------------------------------------------------------------
# Rows: (method, rho, N:M, routing, scope), each pruned or routed, then evaluated


def row_key(row: dict) -> tuple:
    return row["method"], row["rho"], row["nm"], row["routing"], row["scope"]


def label(row: dict) -> str:
    name = NAMES[row["method"]] + (f" ({corpora.LABELS[row['calib']]})" if row["calib"] else "")
    name += " (one pass)" if row["routing"] == "linear" else ""
    return name + (" (routed on all)" if row["scope"] == "full" else "")


def columns(results: dict, tasks: list[str]) -> list[str]:
    """The table's tasks: those asked for (a group's aggregate, not its parts), or every task a tag stood for."""
    return [t for t in tasks if t in results] or list(results)


def table(rows: list[dict], tasks: list[str], rho: float, model_name: str, nm: str | None, num_fewshot: int) -> str:
    """A row per method, a column per task (its metric in %), and their mean; dense heads every table."""
    tasks = columns(rows[0]["results"], tasks)
    shown = [r for r in rows if r["method"] == "dense"][:1] + [r for r in rows if r["method"] != "dense"
                                                              and r["rho"] == rho and r["nm"] == nm]
    heading = f"{model_name}, " + (f"{nm} ({rho:.0%} active)" if nm else f"active weights {rho:.0%}")
    heading += f", {num_fewshot}-shot" if num_fewshot else ", zero-shot"
    metrics = {t: metric(rows[0]["results"][t]).split(",")[0] for t in tasks}
    width = max([9] + [len(t) + 2 for t in tasks])
    first = max([22] + [len(label(r)) for r in shown])
    lines = [heading + " — " + ", ".join(f"{t}: {m}" for t, m in metrics.items()),
             " " * first + "".join(f"{t:>{width}}" for t in tasks) + f"{'Mean':>{width}}"]
    for r in shown:
        values = [r["results"][t].get(metric(r["results"][t])) for t in tasks]
        cells = [fraction(v) for v in values + [r["mean"]]]
        lines.append(f"{label(r):<{first}}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def fraction(value) -> str:
    """0.4567 -> '45.67' (percent); what is not a number (a metric lm-eval could not compute) -> '—'."""
    return f"{100 * value:.2f}" if isinstance(value, (int, float)) and value == value else "—"


def mean_accuracy(results: dict, tasks: list[str]) -> float | None:
    values = [results[t].get(metric(results[t])) for t in columns(results, tasks)]
    return sum(values) / len(values) if all(isinstance(v, float) for v in values) else None


RESUME_SETTINGS = ("model", "tasks", "limit", "num_fewshot", "calib", "nsamples", "seqlen", "seed", "dtype")


def finished_rows(path: Path, settings: dict) -> dict[tuple, dict]:
    """The rows of the results file `path` by row_key, for --resume; a UsageError naming the settings that differ."""
    return results_file.finished_rows(path, settings, RESUME_SETTINGS, row_key, "eval_tasks.py")


# -----------------------------------------------------------------------------
# The run


def main(argv=None) -> int:
    # Ctrl-C: the rows finished so far are in --out, written whole
    return main_of("eval_tasks.py", argv, parse_args, run, lambda args: f"the finished rows are in {args.out}")


def run(args) -> list[dict]:
    device, dtype, decode_path = start_run(args)
    offline = hub_offline()
    if offline:  # lm-eval's datasets read their cache only, at once, instead of retrying the hub for minutes
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    import lm_eval

    manager = task_manager(args.tasks, args.include_path)  # an unknown task: now, before any model is found
    if offline:
        check_task_data(args.tasks, manager, offline)
    directory = resolve_checkpoint(args.model)
    family = models.text_family(directory)  # a LLaVA: its language model
    config = family.read_config(directory / "config.json")
    args.seqlen = args.seqlen or min(config.max_position_embeddings, DEFAULT_MAX_SEQLEN)
    if args.seqlen > config.max_position_embeddings:
        raise UsageError(f"--seqlen {args.seqlen} exceeds the model's max_position_embeddings "
                         f"{config.max_position_embeddings}")
    calibrated = any(m in CALIBRATED for m in args.methods)
    if calibrated and args.data_dir:
        corpora.load_rows(args.calib, "train", args.data_dir)  # a missing file: now, not after the first rows
    if calibrated:
        check_calibration_memory(distributed.share_size(args.nsamples), args.seqlen, config.hidden_size, dtype,
                                 available_memory(device), str(device))
    if args.nm:
        check_nm_fits(args.nm, models.empty_model(config), "sparsegpt" in args.methods)

    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    nm = settings["nm"] = nm_name(args.nm) if args.nm else None
    settings.update(calib=args.calib if calibrated else None, device=str(device),
                    dtype=str(dtype).removeprefix("torch."), torch=torch.__version__,
                    lm_eval=lm_eval.__version__, magnitude_group=MAGNITUDE_GROUP, decode_path=decode_path,
                    **thread_policy.settings())
    plan = [("dense", 1.0, None, None, None)] if "dense" in args.methods else []  # each row's row_key
    plan += [(m, rho, nm, r, s) for rho in args.rho for m in METHODS[1:] if m in args.methods
             for r in (args.mumoe_routing if m == "mumoe" else [None])
             for s in (args.routing_scope if m == "mumoe" else [None])]
    done = results_file.rows_to_keep(args.out, args.resume, args.force, lambda: finished_rows(args.out, settings))
    rows = dict(done)
    tokenizer = family.load_tokenizer(directory)
    if distributed.is_main():
        distributed.barrier()  # the input is good and the model is here: the other ranks may start
    model, pruned, calib = None, False, None
    for key in plan:
        method, rho, _, routing, scope = key
        if key in done:
            print(f"{label(done[key])}, rho {rho}: kept from {args.out}")
            continue
        if model is None or pruned:  # each pruned model starts from a fresh load of the checkpoint
            del model
            model, pruned = family.load_model(directory, "cpu" if args.offload else device, dtype), False
        start, calib_set = time.time(), args.calib if method in CALIBRATED else None
        row = dict(method=method, rho=rho, nm=nm if method != "dense" else None, calib=calib_set, routing=routing,
                   scope=scope)
        print(f"{label(row)}, rho {rho}: {' '.join(args.tasks)}", flush=True)
        if method in ("magnitude", "wanda", "sparsegpt"):
            if method in CALIBRATED and calib is None:  # one draw, shared by every method and rho
                calib = corpora.calibration_windows(args.calib, tokenizer, args.nsamples, args.seqlen, args.seed,
                                                     args.data_dir)
            # under torchrun each rank gathers the statistics of its share of the windows, then all are summed
            pruners.prune_model(model, calib if method in CALIBRATED else None, method, rho, nm=args.nm,
                                select=args.select, group=MAGNITUDE_GROUP, blocksize=SPARSEGPT_BLOCKSIZE,
                                device=device if args.offload else None)
            pruned = True
        # Under torchrun lm-eval gives each rank every world_size-th document of each task (all the requests of a
        # document, so a context is routed on one rank, once), through HarnessLM's rank and world_size, and gathers
        # the per-document metrics on rank 0, which alone gets the results (the others: None)
        with offloaded(model, device) if args.offload else nullcontext():
            moe = mumoe.MuMoE(rho, routing=routing, select=args.select,
                              nm=args.nm) if method == "mumoe" else mumoe.DENSE
            lm = HarnessLM(model, tokenizer, args.batch_size, moe, scope or "context", decode=args.decode,
                           step=args.step)
            output = lm_eval.simple_evaluate(model=lm, tasks=args.tasks, num_fewshot=args.num_fewshot,
                                             limit=args.limit, task_manager=manager, log_samples=False)
        routed = distributed.total(lm.routed) if method == "mumoe" else None  # every rank's routings
        if not distributed.is_main():
            continue
        results = output["results"]  # by task: each task asked for, or each task of a group or tag asked for
        rows[key] = dict(row, results=results, mean=mean_accuracy(results, args.tasks), seconds=time.time() - start,
                         routed=routed)
        print(f"{label(row)}, rho {rho}: mean {fraction(rows[key]['mean'])} ({rows[key]['seconds']:.0f} s)", flush=True)
        # strict JSON (a NaN, such as lm-eval's stderr of a single document, is null), written whole or not at all
        write_json(args.out, {"settings": settings, "results": in_plan_order(rows, plan)})

    results = in_plan_order(rows, plan)
    if not distributed.is_main():
        return results
    for rho in args.rho:
        print("\n" + table(results, args.tasks, rho, args.model, nm, args.num_fewshot))
    print(f"\nresults: {args.out}")
    return results


if __name__ == "__main__":
    ctrl_c.end("eval_tasks.py", main())
