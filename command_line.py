"""What the commands share: the methods they run, their option types, and the checks made before hours of work.

eval_ppl.py, eval_tasks.py and eval_vqa.py each run a plan of rows (a method at an active-weight ratio or an
N:M pattern, pruned offline or routed per prompt) for hours; these are the pieces they have in common, so
that a method is named, an option is read and a run is refused the same way everywhere: one spelling for the
options every command has (generate.py's too), one default dtype, one start (device, --offload, --out, --decode) and
one main (Ctrl-C, one-line errors, lost ranks). The results file itself (strict JSON, atomic writes) is
results_file.py's.
"""

import argparse
import shlex
import sys
from pathlib import Path

import torch

import ctrl_c
import decode_step
import distributed
import mumoe
import pruners
import thread_policy
from checkpoint import DTYPES, UsageError
from ctrl_c import INTERRUPTED  # the commands' exit status after Ctrl-C, 128 + SIGINT
from results_file import check_writable

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


def add_device_options(p: argparse.ArgumentParser, offload: str | None = None) -> None:
    """--device and --dtype (default_dtype's rule), --threads, and --offload (`offload`: what it keeps in CPU
    memory)."""
    p.add_argument("--device", help="default: cuda when present, else cpu")
    p.add_argument("--dtype", choices=DTYPES, help="default: float16 on CUDA, float32 elsewhere")
    add_threads(p)
    if offload:
        p.add_argument("--offload", action="store_true", help=f"keep {offload} in CPU memory, one block at a time on "
                                                              "the device")


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: torch's, one a core); how they wait "
                   "is thread_policy.py's, unless you set OMP_* or GOMP_* variables yourself")


def add_select_and_decode(p: argparse.ArgumentParser, decode: bool = True) -> None:
    """--select, the top-k kernel of Wanda and μ-MoE; --decode, the product later tokens run through, and --step,
    how their steps run."""
    p.add_argument("--select", choices=pruners.SELECTS, help="top-k selection of Wanda and μ-MoE (identical masks; "
                                                             "default: μ-MoE's compiled router on the CPU where it "
                                                             "runs, else the fastest on the device)")
    if decode:
        p.add_argument("--decode", choices=mumoe.DECODES, default="auto",
                       help="μ-MoE: the tokens after a routed prompt read its packed experts (packed) or the dense "
                            "W ⊙ M (masked); auto: packed where its kernel runs (float32 on a CPU with AVX2 and a C "
                            "compiler); the same tokens either way")
        p.add_argument("--step", choices=decode_step.STEPS, default="auto",
                       help="a decode step of generated tokens: each block one call into C (fused), or the model's "
                            "own PyTorch forward (eager); auto: fused wherever it runs (the dense and packed decodes "
                            "on the CPU); the same tokens either way")


def add_out_and_resume(p: argparse.ArgumentParser, default: Path | None, what: str) -> None:
    """--out, the results file (`what` it holds); --resume, which keeps its finished rows; --force, which may
    overwrite another command's file or one of other settings."""
    shown = f" (default: {default})" if default else ""
    p.add_argument("--out", type=Path, default=default, metavar="JSON", help=what + shown)
    p.add_argument("--resume", action="store_true", help="keep the finished rows of the --out file (its settings "
                   "must be this run's) and run only the missing ones")
    p.add_argument("--force", action="store_true", help="overwrite an --out file of another command or of other "
                   "settings (without it, such a file is refused)")


def add_mumoe_routing(p: argparse.ArgumentParser, help: str, many: bool) -> None:
    """--mumoe-routing, every command's spelling (`many`: one or more routings, each a row); --routing, generate.py's
    old spelling, is a quiet alias."""
    kw = dict(nargs="+", default=["block"]) if many else dict(default="block")
    p.add_argument("--mumoe-routing", choices=mumoe.ROUTINGS, metavar="ROUTING", help=help, **kw)
    p.add_argument("--routing", dest="mumoe_routing", choices=mumoe.ROUTINGS, nargs=kw.get("nargs"),
                   help=argparse.SUPPRESS)


def add_mumoe_prefix(p: argparse.ArgumentParser, help: str) -> None:
    """--mumoe-prefix, every command's spelling; --prefix, generate.py's old one, is a quiet alias."""
    p.add_argument("--mumoe-prefix", type=positive_int, metavar="P", help=help)
    p.add_argument("--prefix", dest="mumoe_prefix", type=positive_int, help=argparse.SUPPRESS)


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


# -----------------------------------------------------------------------------
# The commands' run: one default dtype, one start, one main


def default_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """--dtype, else every command's default: float16 on CUDA, float32 elsewhere."""
    return DTYPES[name] if name else torch.float16 if device.type == "cuda" else torch.float32


def start_run(args) -> tuple[torch.device, torch.dtype, str | None]:
    """An evaluation command's first checks, on every rank: its device (joining the other ranks under torchrun),
    --offload, --out writable (by rank 0, the one that writes and that goes first), and --decode where it cannot
    run: before any model is found. Returns (device, dtype, the decode path: None for a command without one)."""
    device = distributed.start(args.device)
    print(thread_policy.use_threads(args.threads))
    if args.offload:
        check_offload(device)
    if not distributed.is_main():
        distributed.barrier()  # rank 0 checks the input and downloads the model first; then the others
    dtype = default_dtype(args.dtype, device)
    if distributed.is_main():  # the one rank that writes
        check_writable(args.out, "--out")
    return device, dtype, mumoe.decode_path(args.decode, device, dtype) if "decode" in vars(args) else None


def main_of(prog: str, argv, parse_args, run, saved) -> int:
    """An evaluation command's main: `run(parse_args(argv))`, during which Ctrl-C raises KeyboardInterrupt
    (ctrl_c.raises). A UsageError ends in one line and exit code 2, a lost rank as distributed.failed_elsewhere
    says, Ctrl-C (or any error after a press: a native call may turn the interrupt into one of its own) in one line
    -- `saved(args)` (what --out holds) and the command line that goes on from it with
    --resume -- and exit code 130. The ranks stop whatever happens."""
    distributed.silence_other_ranks()
    args = parse_args(argv)
    try:
        with ctrl_c.raises():
            run(args)
    except UsageError as e:
        return distributed.fail(f"{prog}: error: {e}", 2)
    except distributed.RanksLost as e:  # another rank failed or was interrupted, and said so
        return distributed.failed_elsewhere(e, prog)
    except BaseException as e:  # Ctrl-C: a KeyboardInterrupt, or the error a native call made of it
        if not (isinstance(e, KeyboardInterrupt) or ctrl_c.PRESSED.is_set()):
            raise
        again = (sys.argv[1:] if argv is None else argv) + ([] if args.resume else ["--resume"])
        return distributed.fail(f"\ninterrupted: {saved(args)}; to go on: {distributed.launcher()} {prog} "
                                f"{shlex.join(again)}", INTERRUPTED)
    finally:
        distributed.stop()
    return 0
