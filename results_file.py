"""The results file of a run of hours: refused before any work if it cannot be written, then rewritten as strict
JSON, atomically, as the rows finish.

The commands (eval_ppl.py, eval_tasks.py, eval_vqa.py) write every number with its settings into one JSON file,
which `--resume` reads back (`finished_rows`, the one reader of the three). Two things keep that file usable: JSON
has no NaN or Infinity (Python writes a bare `NaN` that jq, JavaScript and strict parsers reject, so a number that
is not finite is written null), and a run killed while writing must not leave half a file (it is written beside,
then renamed over the old one).

Under torchrun only rank 0 writes the file; --resume reads it on every rank. Nothing in the file depends on the
number of ranks that wrote it (rows are whole, and eval_vqa's predictions are matched to questions by id), so a
run on 8 GPUs goes on from a file of a run on 1 and the other way round.
"""

import json
import math
import os
from pathlib import Path
from typing import Callable

from checkpoint import UsageError


def check_writable(path: Path, option: str) -> None:
    """Fail now, not after hours of work, when `path` cannot be written; an existing file is left as it is, and a
    missing directory is not made (a typo in it would otherwise leave the results where nobody looks)."""
    existed = path.exists()
    if not path.parent.is_dir():
        why = "is not a directory" if path.parent.exists() else "does not exist: make it first"
        raise UsageError(f"{option} {path} cannot be written ({path.parent} {why})")
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise UsageError(f"{option} {path} cannot be written ({e.strerror}: {e.filename})") from None
    if not existed:
        path.unlink()


def strict_json(value):
    """value with every float that is not finite replaced by None (JSON's null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json(path: Path, report: dict, indent: int = 2) -> None:
    """`report` as strict JSON, into a file beside `path` first, then renamed over it (os.replace is atomic):
    a reader, or a run killed while writing, sees the previous file whole or the new one."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as f:
        f.write(json.dumps(strict_json(report), indent=indent, ensure_ascii=False, allow_nan=False))
        f.flush()
        os.fsync(f.fileno())  # on the disk before the rename: after a crash the name never holds an empty file
    os.replace(partial, path)


def rows_to_keep(path: Path, resume: bool, force: bool, read: Callable[[], dict]) -> dict[tuple, dict]:
    """The rows a run starts from: with --resume the finished rows `read()` gives (its refusals included); else
    none. An existing file that `read()` refuses -- another command's results, or rows of other settings -- is not
    overwritten without --force: the hours it holds are not lost to a typo in --out."""
    if resume:
        return read()
    if force or not path.is_file():
        return {}
    try:
        read()
    except UsageError as e:
        raise UsageError(f"--out would overwrite {str(e).removeprefix('--resume: ')}; --force overwrites it") from None
    return {}


def finished_rows(path: Path, settings: dict, compared: tuple[str, ...], row_key: Callable[[dict], tuple],
                  command: str, differences: Callable[[dict, dict], list[str]] = lambda old, new: [],
                  read_row: Callable[[dict], dict] = lambda row: row, held: str = "rows") -> dict[tuple, dict]:
    """For --resume: the rows of the results file `path` by row_key; no file yet: none, and a line that says so.

    The file's settings must equal this run's in every key of `compared` (and `differences(old, new)` must name
    nothing), or the table would mix numbers that do not compare: a UsageError names every setting that differs.
    A file that is not one of `command`'s results files is a UsageError too. `read_row` turns a stored row back
    into what the command keeps (e.g. a null back into NaN); `held` is what the refusal says the file holds."""
    if not path.is_file():
        print(f"--resume: no {path} yet, every row is run")
        return {}
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        old = report["settings"]
        differ = [f"{k} {old.get(k)} there, {settings[k]} here" for k in compared if old.get(k) != settings[k]]
        differ += differences(old, settings)
        rows = {row_key(row): read_row(row) for row in report["results"]}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"--resume: {path} is not a results file of {command} ({type(e).__name__}: {e}); "
                         "give another --out") from None
    if differ:
        raise UsageError(f"--resume: {path} holds {held} with other settings ({'; '.join(differ)}); run with its "
                         "settings, or give another --out")
    return rows
