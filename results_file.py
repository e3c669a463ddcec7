"""The results file of a run of hours: refused before any work if it cannot be written, then rewritten as strict
JSON, atomically, as the rows finish.

The commands (eval_ppl.py, eval_vqa.py) write every number with its settings into one JSON file, which
`--resume` reads back. Two things keep that file usable: JSON has no NaN or Infinity (Python writes a bare
`NaN` that jq, JavaScript and strict parsers reject, so a number that is not finite is written null), and a
run killed while writing must not leave half a file (it is written beside, then renamed over the old one).
"""

import json
import math
import os
from pathlib import Path

from checkpoint import UsageError


def check_writable(path: Path, option: str) -> None:
    """Fail now, not after hours of work, when `path` cannot be written; an existing file is left as it is."""
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
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
