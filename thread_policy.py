"""The commands' threads: how torch's OpenMP threads wait, set before torch loads, and `--threads`.

torch runs its CPU work on OpenMP threads (libgomp). A thread that has done its share of a parallel region waits
for the others by spinning, 300,000 turns by default, before it sleeps. On a quiet machine that saves a wake-up.
When another process holds one of the cores, the spinning thread takes the time slice its partner needs to finish,
and every parallel region waits for the scheduler: a decode step of SmolLM2's packed experts, ~200 parallel regions,
turned 7x slower than on the quiet machine beside one busy process. Waiting threads that spin only briefly, then
sleep, give the cores back when they are shared; but a sleeping thread costs a wake-up at the next region, and
where that is dear (a virtual machine) the quiet machine loses up to 1.6x. So the spin follows the cores: how busy
other processes keep them is read from /proc/stat over WINDOW seconds when this module is imported
(benchmarks/bench_threads.py measures each candidate, quiet and busy: docs/speed.md).

So a command imports this module before torch (libgomp reads its environment once, when torch loads it):

    GOMP_SPINCOUNT = SPIN_SHARED    if other processes keep >= SHARED_AT of this process's cores busy
                     SPIN_QUIET     otherwise (or where /proc/stat cannot tell)
                     unless the user has set any of USER_VARIABLES: then theirs, as they are

`use_threads(n)` applies `--threads N` (torch's own count otherwise: the machine's cores) and returns the line a
command prints; `settings()` is what a results file records. Standard library only, until `use_threads`.
"""

import os
import time

SPIN_QUIET = 30_000  # turns a waiting thread spins before it sleeps when the cores are free at the start
SPIN_SHARED = 1_000  # ... when another process already keeps one busy; libgomp's own default is 300,000
SHARED_AT = 0.5      # cores kept busy by others (over WINDOW, /proc/stat) from which the cores count as shared
WINDOW = 0.05        # seconds of /proc/stat watched at import
# Chosen by benchmarks/bench_threads.py (docs/speed.md), on an AMD EPYC (AVX2) and an Intel Xeon (AVX-512), 2 cores:
# no one count keeps both machines' speed quiet and busy. Waking a sleeping thread is cheap on the EPYC and dear on
# the Xeon (a virtual machine): 1,000 turns cost the Xeon's quiet decode step 1.7-1.8x (10,000: 1.2x; 30,000: 1.0x),
# while beside a busy process 1,000 keeps every workload within 2x and 30,000 lets it reach 4.6x (torch's default:
# 13x). So the count follows what the cores do when the command starts; load that comes later meets 30,000.
# Any of these set by the user means the user chose how threads wait or how many there are: we leave it all alone
USER_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_DYNAMIC", "MKL_NUM_THREADS")


def busy_elsewhere(window: float = WINDOW) -> float | None:
    """How many of this process's CPUs other processes kept busy over `window` seconds (this one sleeps meanwhile),
    from /proc/stat's per-CPU times; None where there is no /proc/stat (not Linux)."""
    def times() -> dict[int, tuple[int, int]]:  # cpu -> (all jiffies, idle ones)
        sample = {}
        with open("/proc/stat") as stat:
            for line in stat:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    jiffies = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
                    sample[int(name[3:])] = (sum(jiffies), jiffies[3] + jiffies[4])
        return sample

    try:
        cpus = os.sched_getaffinity(0)
        before = times()
        time.sleep(window)
        after = times()
    except (OSError, ValueError, AttributeError):
        return None
    busy = 0.0
    for cpu, (total, idle) in after.items():
        elapsed = total - before.get(cpu, (total, idle))[0]
        if elapsed > 0:
            busy += 1 - (idle - before[cpu][1]) / elapsed
    return busy


def spin_count(busy: float | None) -> int:
    """The turns a waiting thread spins, given how many cores other processes keep busy (None: unknown)."""
    return SPIN_SHARED if busy is not None and busy >= SHARED_AT else SPIN_QUIET


MARK = "MUMOE_GOMP_SPINCOUNT"  # what this module set, so that a process started from a command (a test's command,
                              # a benchmark's child) reads it as ours, not the user's, and looks at the cores itself
if "GOMP_SPINCOUNT" in os.environ and os.environ.get("GOMP_SPINCOUNT") == os.environ.get(MARK):
    del os.environ["GOMP_SPINCOUNT"]
USERS = {name: os.environ[name] for name in USER_VARIABLES if name in os.environ}
BUSY = None if USERS else busy_elsewhere()
SPIN_COUNT = spin_count(BUSY)
if not USERS:
    os.environ["GOMP_SPINCOUNT"] = os.environ[MARK] = str(SPIN_COUNT)


def policy() -> dict[str, str]:
    """The variables in force and whose they are: {"GOMP_SPINCOUNT": "30000", "by": "mumoe", "busy_elsewhere": 0.0}
    (the cores other processes kept busy at the start) or the user's own."""
    if USERS:
        return {**USERS, "by": "user"}
    return {"GOMP_SPINCOUNT": str(SPIN_COUNT), "by": "mumoe", "busy_elsewhere": None if BUSY is None else round(BUSY, 2)}


def use_threads(threads: int | None) -> str:
    """torch's intra-op threads: `threads` if given (--threads), else torch's own choice. Returns the line that
    says what runs, e.g. "threads: 2 (GOMP_SPINCOUNT=30000: mumoe's policy: the cores are free at the start)"."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    variables = ", ".join(f"{k}={v}" for k, v in policy().items() if k not in ("by", "busy_elsewhere"))
    whose = "yours" if USERS else ("mumoe's policy: " + ("the cores are shared" if SPIN_COUNT == SPIN_SHARED else
                                                           "the cores are free") + " at the start")
    return f"threads: {torch.get_num_threads()} ({variables}: {whose})"


def settings() -> dict:
    """For a results file: the thread count, the policy in force, and the CPU they ran on."""
    import torch

    return {"threads": torch.get_num_threads(), "thread_policy": policy(), "cpu": cpu_name()}


def cpu_name() -> str:
    """The CPU's model name (Linux), e.g. "AMD EPYC 7B13": figures and a pruned model's last digits depend on it."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                        "unknown")
    except OSError:
        return "unknown"
