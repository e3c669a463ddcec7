"""The commands' threads: how torch's OpenMP threads wait, set before torch loads, and `--threads`.

torch runs its CPU work on OpenMP threads (libgomp). A thread that has done its share of a parallel region waits
for the others by spinning, 300,000 turns by default, before it sleeps. On a quiet machine that saves a wake-up.
When another process holds one of the cores, the spinning thread takes the time slice its partner needs to finish,
and every parallel region waits for the scheduler: a decode step of SmolLM2's packed experts, ~200 parallel regions,
turned 7x slower than on the quiet machine beside one busy process. Waiting threads that spin only briefly, then
sleep, keep the quiet machine's speed and give the cores back when they are shared
(benchmarks/bench_threads.py measures each candidate, quiet and busy: docs/speed.md).

So a command imports this module before torch (libgomp reads its environment once, when torch loads it):

    GOMP_SPINCOUNT = SPIN_COUNT     unless the user has set any of USER_VARIABLES: then theirs, as they are

`use_threads(n)` applies `--threads N` (torch's own count otherwise: the machine's cores) and returns the line a
command prints; `settings()` is what a results file records. Standard library only, until `use_threads`.
"""

import os

SPIN_COUNT = 1_000  # turns a waiting thread spins before it sleeps (~1 µs); libgomp's default is 300,000. Chosen by
                   # benchmarks/bench_threads.py: 10,000 left a packed decode step 2.7x slower beside a busy process,
                   # 0 (OMP_WAIT_POLICY=PASSIVE) cost it 8-11% on the quiet machine; 1,000 keeps both (docs/speed.md)
# Any of these set by the user means the user chose how threads wait or how many there are: we leave it all alone
USER_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_DYNAMIC", "MKL_NUM_THREADS")

USERS = {name: os.environ[name] for name in USER_VARIABLES if name in os.environ}
if not USERS:
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)


def policy() -> dict[str, str]:
    """The variables in force and whose they are: {"GOMP_SPINCOUNT": "1000", "by": "mumoe"} or the user's own."""
    return {**USERS, "by": "user"} if USERS else {"GOMP_SPINCOUNT": str(SPIN_COUNT), "by": "mumoe"}


def use_threads(threads: int | None) -> str:
    """torch's intra-op threads: `threads` if given (--threads), else torch's own choice. Returns the line that
    says what runs, e.g. "threads: 2 (GOMP_SPINCOUNT=1000: mumoe's policy)"."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    variables = ", ".join(f"{k}={v}" for k, v in policy().items() if k != "by")
    whose = "yours" if USERS else "mumoe's policy"
    return f"threads: {torch.get_num_threads()} ({variables}: {whose})"


def settings() -> dict:
    """For a results file: the thread count and the policy in force."""
    import torch

    return {"threads": torch.get_num_threads(), "thread_policy": policy()}
