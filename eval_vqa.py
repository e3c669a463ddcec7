"""ScienceQA and TextVQA accuracy of LLaVA-1.5: dense, magnitude, SparseGPT, Wanda and μ-MoE, the paper's LLaVA tables.

This file owns the command of the paper's second experiment:

    python eval_vqa.py --model llava-1.5-7b --task scienceqa --rho 0.6 0.5 0.4
    python eval_vqa.py --model llava-1.5-7b --task textvqa --rho 0.6 0.5 0.4

loads LLaVA and the task's questions (vqa_tasks.py: prompts, metrics, data), and for each active-weight
ratio rho prunes the language model's decoder Linears with magnitude, SparseGPT and Wanda, calibrated on
128 prompts of the *other* task with their images (the paper's setting: a domain shift), and runs
μ-MoE, which routes each prompt on itself and needs no calibration. Every row answers every question by
greedy decoding (LLaVA's evaluation: temperature 0) and is scored by the task's metric; the table has a
row per method and a column per rho, with the paper's figures beside ours for LLaVA-1.5-7B.

    generation   the vicuna_v1 prompt with the image's 576 features in place of <image>; greedy, until
                 EOS or at most 16 new tokens (ScienceQA, whose answer is a letter: lmms-eval's limit) or
                 128 (TextVQA: LLaVA's model_vqa_loader default); the text decoded and stripped
    calibration  --nsamples prompts drawn (seeded) among the --calib task's questions that have an image,
                 embedded once with the dense vision tower and projector; the pruners see only the
                 language model and those embedded prompts (pruners.prune_model)
    μ-MoE        each prompt, image features and text, routed on itself in every decoder Linear
                 (mumoe.generate), the new tokens decoded with the prompt's experts
    scores       ScienceQA: percent right over all questions, and over the questions with an image (the
                 "IMG" figure of LLaVA's papers); TextVQA: mean VQA accuracy in percent

The vision tower, the projector, the embeddings and lm_head stay dense in every row. Every setting and every
question's prediction and score go into strict JSON (--out), written atomically as the run goes on, so a
reader can re-score the predictions and `--resume` continues where a run stopped.

Under torchrun (`torchrun --nproc-per-node 8 eval_vqa.py ...`) each rank answers its share of each row's questions
(each question is routed on itself, so the split is exact), the calibration statistics are summed over the ranks'
shares of the prompts before any mask (pruners.prune_model), and rank 0 gathers the answers, shows the progress and
writes the file (distributed.py). `--offload` keeps the language model in CPU memory, one block at a time on the GPU.
"""

import ctrl_c

if __name__ == "__main__":  # Ctrl-C while the imports below load torch (seconds): one line and exit 130, no traceback
    ctrl_c.exit_at_once("eval_vqa.py")

import thread_policy  # noqa: F401  before torch: libgomp reads how its threads wait when torch loads it

import argparse
import json
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

import distributed
import llava_model
import models
import mumoe
import pruners
import results_file
import vqa_tasks
from checkpoint import UsageError, hub_repo_id, offloaded, read_config_json, resolve_checkpoint
from command_line import (CALIBRATED, MAGNITUDE_GROUP, METHODS, NAMES, SPARSEGPT_BLOCKSIZE, ArgumentParser,
                          add_device_options, add_mumoe_routing, add_out_and_resume, add_select_and_decode, main_of,
                          positive_int, start_run)
from results_file import write_json
from vqa_tasks import TASKS, Question

# the rows in the order of the paper's LLaVA table, SparseGPT before Wanda (its perplexity table, command_line.METHODS,
# puts Wanda first)
ROW_ORDER = ("dense", "magnitude", "sparsegpt", "wanda", "mumoe")
TASK_NAMES = {"scienceqa": "ScienceQA", "textvqa": "TextVQA"}
OTHER_TASK = {"scienceqa": "textvqa", "textvqa": "scienceqa"}
MAX_NEW_TOKENS = {"scienceqa": 16, "textvqa": 128}  # see the docstring
SAVE_EVERY_SECONDS = 60  # how often a row in progress is written to --out (and always when it ends)
# Under torchrun, the answers of each rank that rank 0 gathers at a time: one collective per GATHER_EVERY questions
# a rank answers, and the ranks wait for the slowest of them only then
GATHER_EVERY = 8

# The paper's LLaVA-7B table (accuracy in percent); the dense row is rho = 1. Which LLaVA and which ScienceQA
# subset it used is not stated: see the README. Shown beside the rows of the paper's settings only.
PAPER = {
    "scienceqa": {("dense", 1.0): 70.03,
                  ("magnitude", 0.6): 62.70, ("magnitude", 0.5): 41.57, ("magnitude", 0.4): 0.21,
                  ("sparsegpt", 0.6): 63.83, ("sparsegpt", 0.5): 53.20, ("sparsegpt", 0.4): 39.05,
                  ("wanda", 0.6): 65.17, ("wanda", 0.5): 57.96, ("wanda", 0.4): 32.45,
                  ("mumoe", 0.6): 67.15, ("mumoe", 0.5): 59.84, ("mumoe", 0.4): 41.12},
    "textvqa": {("dense", 1.0): 61.32,
                ("magnitude", 0.6): 54.12, ("magnitude", 0.5): 45.56, ("magnitude", 0.4): 24.62,
                ("sparsegpt", 0.6): 53.37, ("sparsegpt", 0.5): 47.42, ("sparsegpt", 0.4): 28.27,
                ("wanda", 0.6): 55.80, ("wanda", 0.5): 52.36, ("wanda", 0.4): 39.27,
                ("mumoe", 0.6): 57.16, ("mumoe", 0.5): 54.65, ("mumoe", 0.4): 46.97},
}
PAPER_MODEL = "llava-hf/llava-1.5-7b-hf"


# -----------------------------------------------------------------------------
# Prompts as the model reads them


def prompt_ids(question: Question, tokenizer, image_token_index: int) -> list[int]:
    """The question's vicuna_v1 prompt as token ids, one image_token_index where the image goes."""
    prompt = llava_model.conversation_prompt(question.message, question.image is not None)
    return llava_model.prompt_ids(tokenizer, prompt, image_token_index)


def embed(model, question: Question, ids: list[int], device, dtype) -> torch.Tensor:
    """The prompt the language model runs on (1, T, hidden): the text embedded, the image's features in place."""
    pixels = None
    if question.image is not None:
        with vqa_tasks.open_image(question) as image:
            size = model.config.vision_config.image_size
            pixels = llava_model.preprocess(image, size)[None].to(device, dtype)  # (1, 3, 336, 336)
    return model.embed_prompt(torch.tensor([ids], device=device), pixels)


@torch.no_grad()
def answer(model, tokenizer, question: Question, ids: list[int], max_new_tokens: int, rho: float = 1.0,
           routing: str = "block", select: str | None = None, device=None, dtype=None, decode: str = "auto",
           timings: dict | None = None, step: str = "auto") -> str:
    """The model's answer to one question: greedy, decoded without special tokens, stripped (as LLaVA's
    scripts do). rho < 1: μ-MoE, the prompt routed on itself, its answer decoded with its experts as `decode` says
    (mumoe.decode_path), its steps as `step` says (mumoe.generate). `timings`: mumoe.generate's, the bytes the
    prompt's experts held among them."""
    x = embed(model, question, ids, device, dtype)
    lm = model.language_model
    new = mumoe.generate(lm, x, max_new_tokens, mumoe.MuMoE(rho, routing=routing, select=select),
                         eos_id=lm.config.eos_token_id, decode=decode, timings=timings, step=step)
    return tokenizer.decode(new).strip()


def check_lengths(questions: list[Question], ids: dict[tuple, list[int]], config, max_new_tokens: int) -> None:
    """Every prompt, its image's features and the longest answer must fit the language model's positions."""
    limit = config.text_config.max_position_embeddings
    for q in questions:
        length = len(ids[q.task, q.id]) + (config.image_tokens - 1 if q.image is not None else 0) + max_new_tokens
        if length > limit:
            raise UsageError(f"{q.task} question {q.id} ({q.where}): its prompt and {max_new_tokens} new tokens "
                             f"take {length} positions, more than the model's {limit}")


def calibration_questions(questions: list[Question], nsamples: int, seed: int,
                          skip_bad_rows: bool) -> tuple[list[Question], list[dict]]:
    """nsamples of the questions with an image, the first ones of a shuffle by Random(seed) whose image
    decodes (a bad one is named, or skipped and reported with --skip-bad-rows)."""
    candidates = [q for q in questions if q.image is not None]
    random.Random(seed).shuffle(candidates)
    chosen, skipped = [], []
    for q in candidates:
        if len(chosen) == nsamples:
            break
        kept, bad = vqa_tasks.check_images([q], skip_bad_rows)
        chosen += kept
        skipped += bad
    if len(chosen) < nsamples:
        raise UsageError(f"--nsamples {nsamples}: the {questions[0].task} questions hold only {len(chosen)} with an "
                         f"image that decodes; give --nsamples {len(chosen)} or less")
    return chosen, skipped


# -----------------------------------------------------------------------------
# Scores, the table


def summary(predictions: list[dict], questions: dict[str, Question]) -> dict:
    """Accuracy in percent over the questions answered so far, and over those with an image; the most memory a
    routed prompt's experts held beside the model (mumoe.experts_bytes)."""
    scores = [p["score"] for p in predictions]
    with_image = [p["score"] for p in predictions if questions[p["id"]].image is not None]
    return {"accuracy": 100 * sum(scores) / len(scores) if scores else math.nan,
            "accuracy_image": 100 * sum(with_image) / len(with_image) if with_image else math.nan,
            "answered": len(scores), "answered_image": len(with_image),
            "experts_bytes_max": max((p.get("experts_bytes", 0) for p in predictions), default=0)}


def label(row: dict) -> str:
    name = NAMES[row["method"]] + (f" ({TASK_NAMES[row['calib']]})" if row["calib"] else "")
    return name + (" (one pass)" if row.get("routing") == "linear" else "")


def paper_figure(row: dict, settings: dict) -> float | None:
    """The paper's number for a row run in the paper's setting: LLaVA-1.5-7B, offline methods calibrated on
    the other task, μ-MoE routed block by block (Wanda's procedure per prompt)."""
    if not settings["paper_model"] or row["routing"] == "linear":
        return None
    if row["calib"] not in (None, OTHER_TASK[settings["task"]]):
        return None
    return PAPER[settings["task"]].get((row["method"], row["rho"]))


def table(rows: list[dict], settings: dict, key: str = "accuracy", with_paper: bool = True) -> str:
    """One row per method, one column per active-weight ratio (dense in its own, 100%), accuracy in percent;
    [the paper's figure] beside ours."""
    ratios = sorted({r["rho"] for r in rows}, reverse=True)  # dense's 1.0 (100%) first
    lines, names = [], []
    for method_rows in group_rows(rows):
        cells = {}
        for r in method_rows:
            value = r[key]  # None (null) in a resumed file: no question of that kind was answered
            cell = f"{value:.2f}" if value is not None and math.isfinite(value) else "-"
            cell += "" if r["complete"] else "*"
            paper = paper_figure(r, settings) if with_paper else None
            cells[r["rho"]] = cell + (f" [{paper:.2f}]" if paper is not None else "")
        names.append(label(method_rows[0]))
        lines.append(cells)
    width = 2 + max([8] + [len(c) for cells in lines for c in cells.values()])
    first = 2 + max([10] + [len(n) for n in names])
    out = [" " * first + "".join(f"{rho:>{width}.0%}" for rho in ratios)]
    for name, cells in zip(names, lines):
        out.append((f"{name:<{first}}" + "".join(f"{cells.get(rho, ''):>{width}}" for rho in ratios)).rstrip())
    return "\n".join(out)


def group_rows(rows: list[dict]) -> list[list[dict]]:
    """The rows of each table line (method, calibration, routing), in the order they first appear."""
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["calib"], r["routing"]), []).append(r)
    return list(groups.values())


def tables(rows: list[dict], settings: dict) -> str:
    n, n_image = settings["questions"], settings["questions_with_image"]
    head = f"{settings['model']} on {TASK_NAMES[settings['task']]}"
    paper = " [the paper's LLaVA-7B figure]" if settings["paper_model"] else ""
    if settings["task"] == "textvqa":
        return f"{head}, {n} questions: VQA accuracy (%){paper}\n" + table(rows, settings)
    text = f"{head}, all {n} questions: accuracy (%){paper}\n" + table(rows, settings)
    if n_image:
        text += (f"\n\n{head}, the {n_image} questions with an image (LLaVA's IMG figure): accuracy (%)\n"
                 + table(rows, settings, "accuracy_image", with_paper=False))
    if any(not r["complete"] for r in rows):
        text += "\n\n* a row still in progress: its accuracy so far"
    return text


# -----------------------------------------------------------------------------
# --resume: the results file read back


# The settings every prediction depends on; a resumed file must have the same, or its rows would not compare
RESUME_SETTINGS = ("model", "task", "calib", "nsamples", "seed", "dtype", "max_new_tokens")


def row_key(row: dict) -> tuple:
    return row["method"], row["rho"], row["calib"], row["routing"]


def finished_rows(path: Path, settings: dict) -> dict[tuple, dict]:
    """For --resume: the rows of the --out file by row key; a UsageError naming the settings that differ.
    Their predictions are matched to questions by id, so a run with another --limit reuses what it can, and a
    run on any number of ranks goes on from a file that a run on any other number wrote."""
    return results_file.finished_rows(path, settings, RESUME_SETTINGS, row_key, "eval_vqa.py", other_data,
                                      held="predictions made")


def other_data(old: dict, new: dict) -> list[str]:
    """The data files of each task both runs read (a run without calibrated rows reads one task only) that differ."""
    return [f"other {task} files (by sha256)" for task in old["data"].keys() & new["data"].keys()
            if old["data"][task] != new["data"][task]]


def question_record(q: Question) -> dict:
    """What a reader needs to re-score a question's prediction."""
    record = {"id": q.id, "where": q.where, "image": q.image is not None}
    if q.task == "scienceqa":
        return record | {"answer": q.answer, "n_choices": q.n_choices}
    return record | {"answers": q.answer}


# -----------------------------------------------------------------------------
# The command line


def active_ratio(text: str) -> float:
    rho = float(text)
    if not 0 < rho < 1:
        raise argparse.ArgumentTypeError(f"rho is the active-weight ratio of a pruned row, in (0, 1); got {text}")
    return rho


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="eval_vqa.py", description="ScienceQA / TextVQA accuracy of LLaVA-1.5: dense, "
                             "magnitude, SparseGPT, Wanda and μ-MoE, as the paper's LLaVA tables.")
    p.add_argument("--model", required=True, help="llava-1.5-7b, a hub id, or a local LLaVA model directory")
    p.add_argument("--task", required=True, choices=TASKS, help="the questions to answer")
    p.add_argument("--rho", type=active_ratio, nargs="+", default=[0.6, 0.5, 0.4],
                   help="active-weight ratio(s) of the pruned rows (default: the paper's 0.6 0.5 0.4)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD",
                   help=f"any of {' '.join(METHODS)} (default: all)")
    p.add_argument("--calib", choices=TASKS, help="the task whose prompts calibrate SparseGPT and Wanda "
                   "(default: the other task, as the paper)")
    p.add_argument("--nsamples", type=positive_int, metavar="N", default=128,
                   help="calibration prompts (default: 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default: 0)")
    add_mumoe_routing(p, "block: each block's Linears route on its dense pass over the prompt (default, row "
                         "'μ-MoE'); linear: each Linear on its own input, one pass (row 'μ-MoE (one pass)')",
                      many=True)
    add_select_and_decode(p)
    p.add_argument("--limit", type=positive_int, metavar="N", help="answer the first N questions only (quick runs)")
    p.add_argument("--max-new-tokens", type=positive_int, metavar="N",
                   help=f"longest answer (default: {MAX_NEW_TOKENS['scienceqa']} for ScienceQA, "
                        f"{MAX_NEW_TOKENS['textvqa']} for TextVQA)")
    add_device_options(p, offload="the language model")
    p.add_argument("--data-dir", type=Path, metavar="DIR",
                   help="read {task}/*.parquet from here (offline) instead of the hub")
    p.add_argument("--save-data", type=Path, metavar="DIR", help="copy the parquet files this run needs into "
                   "DIR in the --data-dir layout (downloading them, or from --data-dir), then read them there")
    p.add_argument("--skip-bad-rows", action="store_true", help="leave out questions whose image does not "
                   "decode (counted in the JSON) instead of stopping")
    add_out_and_resume(p, None, "every setting, prediction and score (default: vqa_{task}.json)")
    args = p.parse_args(argv)
    args.calib = args.calib or OTHER_TASK[args.task]
    args.max_new_tokens = args.max_new_tokens or MAX_NEW_TOKENS[args.task]
    args.out = args.out or Path(f"vqa_{args.task}.json")
    return args


def main(argv=None) -> int:
    # Ctrl-C: every answer so far is in --out (run saves the row it was in)
    return main_of("eval_vqa.py", argv, parse_args, run,
                   lambda args: f"{saved_answers(args.out)} answers saved in {args.out}")


def saved_answers(path: Path) -> int:
    try:
        return sum(len(row["predictions"]) for row in json.loads(path.read_text(encoding="utf-8"))["results"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def show(progress: tqdm, answered: int, predictions: list[dict]) -> None:
    """`answered` more questions on the progress bar, and the row's accuracy so far."""
    progress.update(answered)
    if predictions:
        progress.set_postfix_str(f"{100 * sum(p['score'] for p in predictions) / len(predictions):.2f}%")


def load_model(directory: Path, device, dtype, offload: bool):
    """LLaVA on `device`; with `offload`, its language model in CPU memory (`on_device` runs it one block at a
    time there) and the vision tower and projector on `device`."""
    if not offload:
        return llava_model.load_llava(directory, device, dtype)
    model = llava_model.load_llava(directory, "cpu", dtype)
    model.vision_tower.to(device)
    model.multi_modal_projector.to(device)
    return model


def on_device(model, device, offload: bool):
    """Where the language model runs: with `offload`, one block at a time on `device` (checkpoint.offloaded)."""
    return offloaded(model.language_model, device) if offload else nullcontext()


def load_task(task: str, args) -> tuple[list[Question], list[dict]]:
    """A task's questions and, per file, its name and sha256 (so a reader knows what was evaluated)."""
    files = vqa_tasks.task_files(task, args.data_dir)
    questions = vqa_tasks.read_questions(task, files)
    return questions, [{"file": path.name, "sha256": vqa_tasks.sha256(path)} for path in files]


def run(args) -> list[dict]:
    device, dtype, decode_path = start_run(args)
    if models.family(args.model) is not llava_model:  # other LLaVA variants and unknown families: named there
        model_type = read_config_json(resolve_checkpoint(args.model) / "config.json").get("model_type")
        raise UsageError(f"--model {args.model} is a {model_type!r} model; eval_vqa.py evaluates LLaVA-1.5 "
                         "(model_type 'llava'), e.g. llava-1.5-7b")
    directory = resolve_checkpoint(args.model)

    # The data, every question checked, before any model work
    calibrated = [m for m in args.methods if m in CALIBRATED]
    tasks = [args.task] + ([args.calib] if calibrated and args.calib != args.task else [])
    if args.save_data:
        for task in tasks if distributed.is_main() else []:
            vqa_tasks.save_files(vqa_tasks.task_files(task, args.data_dir), args.save_data, task)
        args.data_dir = args.save_data
    questions, data = load_task(args.task, args)
    if args.data_dir is None and len(questions) != vqa_tasks.HUB[args.task].questions:
        raise UsageError(f"{args.task}: the hub files hold {len(questions)} questions, expected "
                         f"{vqa_tasks.HUB[args.task].questions}")
    questions, skipped = vqa_tasks.check_images(questions[: args.limit], args.skip_bad_rows)
    data = {args.task: data}
    calib_questions = []
    if calibrated:
        pool, data[args.calib] = load_task(args.calib, args)  # all of its questions, whatever --limit says
        calib_questions, calib_skipped = calibration_questions(pool, args.nsamples, args.seed, args.skip_bad_rows)
        skipped += [s | {"task": args.calib} for s in calib_skipped]
    if not questions:
        raise UsageError(f"no {args.task} question is left to answer")

    tokenizer = llava_model.load_tokenizer(directory)
    config = llava_model.read_config(directory / "config.json")
    ids = {(q.task, q.id): prompt_ids(q, tokenizer, config.image_token_index) for q in questions + calib_questions}
    check_lengths(questions, ids, config, args.max_new_tokens)
    check_lengths(calib_questions, ids, config, 0)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings.update(device=str(device), dtype=str(dtype).removeprefix("torch."), torch=torch.__version__,
                    data=data, skipped_rows=skipped, questions=len(questions),
                    questions_with_image=sum(q.image is not None for q in questions),
                    paper_model=hub_repo_id(args.model) == PAPER_MODEL,
                    magnitude_group=MAGNITUDE_GROUP, sparsegpt_blocksize=SPARSEGPT_BLOCKSIZE, decode_path=decode_path,
                    **thread_policy.settings())
    plan = [("dense", 1.0, None, None)] if "dense" in args.methods else []
    plan += [(m, rho, args.calib if m in CALIBRATED else None, r) for rho in args.rho for m in ROW_ORDER[1:]
             if m in args.methods for r in (args.mumoe_routing if m == "mumoe" else [None])]
    done = results_file.rows_to_keep(args.out, args.resume, args.force, lambda: finished_rows(args.out, settings))
    if distributed.is_main():
        distributed.barrier()  # the input is good and the data is here: the other ranks may start
    distributed.barrier()  # every rank has read --out before rank 0 writes it
    by_id = {q.id: q for q in questions}
    report = {"settings": settings, "questions": [question_record(q) for q in questions], "results": []}
    rows = {}  # row key -> the row's record in report["results"]

    others = [row for key, row in done.items() if key not in plan]  # a resumed file's other rows stay in it
    last_save = time.time()

    def save(row: dict, force=False):
        nonlocal last_save
        if distributed.is_main() and (force or time.time() - last_save > SAVE_EVERY_SECONDS):
            row.update(summary(row["predictions"], by_id))
            report["results"] = [rows[key] for key in plan if key in rows] + others
            write_json(args.out, report, indent=1)
            last_save = time.time()
    model, pruned, calib_hidden = None, False, None
    for key in plan:
        method, rho, calib, routing = key
        kept = {p["id"]: p for p in done[key]["predictions"]} if key in done else {}
        predictions = [kept[q.id] for q in questions if q.id in kept]
        todo = [q for q in questions if q.id not in kept]
        rows[key] = row = dict(method=method, rho=rho, calib=calib, routing=routing,
                               seconds=done[key]["seconds"] if key in done else 0.0,  # this row's work, every run
                               complete=not todo, predictions=predictions, **summary(predictions, by_id))
        if not todo:
            print(f"{label(row)}, rho {rho}: {row['accuracy']:.2f} (kept from {args.out})")
            continue
        start = time.time()
        if model is None or pruned:
            del model
            model, pruned = load_model(directory, device, dtype, args.offload), False
        if method in CALIBRATED + ("magnitude",):
            if method in CALIBRATED and calib_hidden is None:  # once, shared by every calibrated row
                with on_device(model, device, args.offload):
                    calib_hidden = [embed(model, q, ids[q.task, q.id], device, dtype) for q in tqdm(
                        calib_questions, desc=f"embedding {args.calib} calibration prompts", leave=False)]
            # under torchrun each rank gathers the statistics of its share of the prompts, then all are summed
            pruners.prune_model(model.language_model, calib_hidden if method in CALIBRATED else None, method, rho,
                                select=args.select, group=MAGNITUDE_GROUP, blocksize=SPARSEGPT_BLOCKSIZE,
                                device=device if args.offload else None)
            pruned = True
        routed_rho = rho if method == "mumoe" else 1.0  # the others run their (pruned) weights densely
        progress = tqdm(total=len(todo), desc=f"{label(row)} rho={rho}", leave=False)
        # Under torchrun the questions go in rounds of GATHER_EVERY per rank, each rank answering its share of the
        # round; rank 0 gathers the others' answers at the round's end (alone: a round is answered, nothing waits)
        per_round = GATHER_EVERY * distributed.world_size()
        try:
            with on_device(model, device, args.offload):
                for first in range(0, len(todo), per_round):
                    round_questions = todo[first : first + per_round]
                    mine = []
                    for q in round_questions[distributed.shard(len(round_questions))]:
                        spent = {}
                        prediction = answer(model, tokenizer, q, ids[q.task, q.id], args.max_new_tokens, routed_rho,
                                            routing or "block", args.select, device, dtype, args.decode, spent,
                                            args.step)
                        mine.append({"id": q.id, "prediction": prediction, "score": vqa_tasks.score(q, prediction),
                                     "experts_bytes": spent["experts_bytes"]})  # beside the model: 0 when dense
                        predictions.append(mine[-1])  # on rank 0, saved with the row
                        row["seconds"] += time.time() - start
                        start = time.time()
                        save(row)
                        show(progress, 1, predictions)
                    for theirs in (distributed.gather_objects(mine) or [mine])[1:]:  # rank 0: the other ranks'
                        predictions += theirs
                        show(progress, len(theirs), predictions)
        except BaseException:  # Ctrl-C, or another rank lost: the row's answers so far are saved, for --resume
            save(row, force=True)
            raise
        progress.close()
        order = {q.id: i for i, q in enumerate(questions)}
        predictions.sort(key=lambda p: order[p["id"]])  # the kept ones of a resumed row came first
        row["complete"] = True
        save(row, force=True)
        print(f"{label(row)}, rho {rho}: {row['accuracy']:.2f} ({row['seconds']:.0f} s)", flush=True)

    report["results"] = results = [rows[key] for key in plan] + others
    if distributed.is_main():
        write_json(args.out, report, indent=1)
    print("\n" + tables(results, settings))
    print(f"\nresults: {args.out}")
    return results


if __name__ == "__main__":
    ctrl_c.end("eval_vqa.py", main())
