"""What the commands share: the methods they run, their option types, and the checks made before hours of work.

eval_ppl.py, eval_tasks.py and eval_vqa.py each run a plan of rows (a method at an active-weight ratio or an
N:M pattern, pruned offline or routed per prompt) for hours; these are the pieces they have in common, so
that a method is named, an option is read and a run is refused the same way everywhere. The results file
itself (strict JSON, atomic writes) is results_file.py's.
"""

import argparse
from pathlib import Path

import torch

import pruners
from checkpoint import UsageError
from ctrl_c import INTERRUPTED  # noqa: F401 (the commands' exit status after Ctrl-C, 128 + SIGINT)

METHODS = ("dense", "magnitude", "wanda", "sparsegpt", "mumoe")
CALIBRATED = ("wanda", "sparsegpt")
NAMES = {"dense": "Dense", "magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT", "mumoe": "μ-MoE"}
MAGNITUDE_GROUP = "matrix"  # one threshold per weight matrix, as SparseGPT's and Wanda's magnitude baselines
SPARSEGPT_BLOCKSIZE = 128  # the reference's column block; an N:M group must not straddle two blocks


# -----------------------------------------------------------------------------
# Option types: one line and exit code 2 through argparse when a value is wrong


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr and exit code 2, like every other user error here."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


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


# -----------------------------------------------------------------------------
# Checks before any work

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


def check_offload(device: torch.device) -> None:
    """--offload needs a device other than the CPU memory where it keeps the model."""
    if device.type == "cpu":
        raise UsageError("--offload keeps the model in CPU memory and brings each block to the device for its turn; "
                         "the device here is the cpu, so there is nothing to offload to: give --device cuda, or "
                         "leave out --offload")


def in_plan_order(rows: dict, plan: list[tuple]) -> list[dict]:
    """The rows of the plan in its order (the table's), then the other rows of a resumed file: a finished row
    is never dropped."""
    return [rows[key] for key in plan if key in rows] + [row for key, row in rows.items() if key not in plan]


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
