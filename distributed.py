"""Many processes, one run: torch.distributed as `torchrun` starts it, and nothing at all without it.

    torchrun --nproc-per-node 8 eval_ppl.py --model opt-13b

starts eight copies of the command, each with RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous address in its
environment. The paper's work splits exactly across them:

    perplexity   exp of the mean of per-window NLLs: each rank evaluates its share of the windows, and the
                 NLLs are all-reduced into one vector in which every entry comes from one rank (a sum with
                 zeros: exact), so the perplexity is the single process's to the last bit
    calibration  Wanda's sum ||X_j||^2 and SparseGPT's sum X^T X are sums over the windows: each rank sums its
                 share and the sums are all-reduced before any mask or update is computed, so every rank
                 prunes identically (the all-reduce returns the same bits on every rank); the sums add in
                 another order than one process's, which can move a near-tie (pruners.gather_statistics)

What this file owns: starting from the environment (each rank's device: cuda:LOCAL_RANK, or the CPU with
gloo), the shares, the collectives (each a no-op in a single process), rank 0 alone speaking, and ending a
run one rank of which failed with that rank's one line and its exit code on every rank, not a hang.
Without WORLD_SIZE > 1 in the environment every function here returns at once: one process, as before.
"""

import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from checkpoint import UsageError, check_device

# Collectives wait this long for the slowest rank. Rank 0 downloads the model and the data (OPT-66B: 132 GB)
# while the others wait at a barrier, which the defaults (10 min with NCCL, 30 with gloo) would cut short;
# a rank that fails does not make the others wait: torchrun ends them, and gloo notices the closed socket.
COLLECTIVE_TIMEOUT = timedelta(hours=6)
# Keys in the rendezvous store: how many ranks failed, and the exit code of the first
FAILURES_KEY, EXIT_CODE_KEY = "mumoe/failures", "mumoe/exit_code"

speaker = sys.stderr  # where this rank's one line goes: the real stderr even when the rank is silenced


def launched() -> bool:
    """True in a process that torchrun (or the like) started as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one that prints, shows progress, and writes files."""
    return rank() == 0


def silence_other_ranks() -> None:
    """On every rank but 0, print and progress bars go nowhere; uncaught tracebacks and `fail` still speak.
    Called first thing, before the command line is read, so that a typo is one line, not one per rank."""
    global speaker
    if os.environ.get("RANK", "0") == "0" or not launched():
        return
    speaker = sys.stderr
    sys.stdout = sys.stderr = open(os.devnull, "w")
    sys.excepthook = lambda *exc: traceback.print_exception(*exc, file=speaker)  # a bug still shows its traceback


def start(device: str | None) -> torch.device:
    """Join the other ranks (under torchrun) and return this rank's device; alone, the device asked for.

    Default device: CUDA when present, else the CPU. Under torchrun CUDA means cuda:LOCAL_RANK, one GPU per
    rank, so a node needs as many GPUs as ranks; with --device cpu the ranks share the CPU (gloo), which
    works on a node with GPUs too. Every rank checks the same things, so a refusal is the same on all."""
    device = check_device(device)
    if not launched():
        return device
    if not dist.is_initialized():
        # CPU tensors (the windows' NLLs, statistics on a CPU run) go through gloo, CUDA tensors through NCCL
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    if device.type == "cuda":
        if device.index is not None:
            raise UsageError(f"--device {device}: under torchrun each rank takes cuda:LOCAL_RANK; give --device cuda")
        local_rank, local_ranks = int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if local_ranks > torch.cuda.device_count():
            raise UsageError(f"torchrun started {local_ranks} ranks on this node, which has "
                             f"{torch.cuda.device_count()} GPUs: give --nproc-per-node at most "
                             f"{torch.cuda.device_count()}, or --device cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UsageError(f"--device {device}: under torchrun the ranks run on cuda or on the cpu")
    return device


def launcher() -> str:
    """How this run was started, for the line that says how to go on: `torchrun --nproc-per-node N`, or `python`."""
    return f"torchrun --nproc-per-node {os.environ.get('LOCAL_WORLD_SIZE', '?')}" if launched() else "python"


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Shares and collectives


class RanksLost(Exception):
    """A collective broke: another rank ended (it failed, or was interrupted) or cannot be reached."""


def collective(op, *args):
    """op(*args), a torch.distributed collective; a broken one is RanksLost."""
    try:
        return op(*args)
    except RuntimeError as e:  # torch's DistError is one; gloo raises a bare one ("Connection closed by peer")
        raise RanksLost(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def shard(n: int) -> slice:
    """This rank's contiguous share of n items (windows): rank r of R gets [r*n//R, (r+1)*n//R), so the
    shares differ by one item at most, and a rank beyond n items gets none."""
    r, R = rank(), world_size()
    return slice(r * n // R, (r + 1) * n // R)


def share_size(n: int) -> int:
    return len(range(n)[shard(n)])


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Each tensor, in place, becomes the sum of its copies on every rank (the same bits on every rank)."""
    if dist.is_initialized():
        for tensor in tensors:
            collective(dist.all_reduce, tensor)


def total(n: int) -> int:
    """The sum of n over the ranks: a count of windows shared among them."""
    if not dist.is_initialized():
        return n
    count = torch.tensor([n], dtype=torch.int64)
    collective(dist.all_reduce, count)
    return int(count.item())


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor, in rank order, concatenated along dim 0 (a 0-d tensor is one element): the same on
    every rank. Alone: the tensor itself (as a 1-d tensor if it was 0-d). The tensors must have one shape."""
    tensor = tensor.reshape(1) if tensor.ndim == 0 else tensor
    if not dist.is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    collective(dist.all_gather, parts, tensor)
    return torch.cat(parts)


def gather_objects(value) -> list | None:
    """Rank 0: [rank 0's value, rank 1's, ...], any picklable values (predictions, lm-eval's metrics); the other
    ranks: None. Alone: [value]. Objects travel through the CPU (gloo) whatever the device."""
    if not dist.is_initialized():
        return [value]
    gathered = [None] * world_size() if is_main() else None
    collective(dist.gather_object, value, gathered, 0)
    return gathered


def barrier() -> None:
    """Wait for every rank: a one-element all-reduce, which, unlike dist.barrier, needs no device of NCCL's."""
    total(0)


# -----------------------------------------------------------------------------
# Ending a run: one line, the same exit code on every rank


def store():
    """The rendezvous key-value store all ranks reach (torchrun's agent hosts it); None alone."""
    return dist.distributed_c10d._get_default_store() if dist.is_initialized() else None


def fail(line: str, code: int) -> int:
    """This rank ends the run: say `line` (alone, always; under torchrun, if no other rank failed first,
    so that an error every rank meets is said once) and return `code` for the process to exit with."""
    first = True
    if store() is not None:
        try:
            first = store().add(FAILURES_KEY, 1) == 1
            if first:
                store().set(EXIT_CODE_KEY, str(code))
        except RuntimeError:  # the store is gone (its host exited): speak, to be sure
            pass
    if first:
        print(line, file=speaker if launched() else sys.stderr, flush=True)
    return code


def failed_elsewhere(error: RanksLost, prog: str) -> int:
    """A collective broke because another rank left: that rank said why, so exit quietly with its code.
    A collective that broke with no rank having said anything is said here, in one line."""
    try:
        if store().check([EXIT_CODE_KEY]):
            return int(store().get(EXIT_CODE_KEY))
    except RuntimeError:
        pass
    return fail(f"{prog}: error: rank {rank()} lost the other ranks ({error})", 1)
