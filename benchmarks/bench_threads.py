"""The thread policy, chosen by measurement: each workload quiet and beside a busy process, under each candidate.

torch runs its CPU work on OpenMP threads (libgomp). An OpenMP thread that finishes its share of a parallel region
spins while it waits for the others (300,000 turns by default) before it sleeps. On a quiet machine that saves a
wake-up; when another process holds a core, the spinning thread takes the time its partner needs to finish, and
every parallel region waits for a time slice: the packed decode, ~200 parallel regions a step, suffers most. The
candidates, each set in the environment of a fresh process (libgomp reads it once, when torch loads):

    default      torch's own: OpenMP's spinning wait, every core
    passive      OMP_WAIT_POLICY=PASSIVE: a waiting thread sleeps at once
    spin30k      GOMP_SPINCOUNT=30000
    spin10k      GOMP_SPINCOUNT=10000
    spin3k       GOMP_SPINCOUNT=3000
    spin1k       GOMP_SPINCOUNT=1000: spin ~1 µs, then sleep
    one-thread   OMP_NUM_THREADS=1: no waiting at all, one core's speed
    mumoe        whatever thread_policy.py sets when a command starts (the policy chosen from these figures)

The workloads, on SmolLM2-135M's shapes (random weights: the time does not depend on them), fp32:

    decode dense     one decode step through a 64-token cache, the dense model
    decode packed    the same step with a prompt's experts packed (rho 0.5): the packed kernel, ~200 calls
    fused dense      the dense step as generate runs it, each block one call into C (decode_step.py): one parallel
                     region a block, six barriers in it
    fused packed     the same with the packed experts
    prompt 2048      a 2048-token prompt through 4 of the blocks
    wanda block      Wanda of one block calibrated on 2 windows of 512 tokens (statistics, score, select)
    sparsegpt block  SparseGPT of the same block on the same windows (Hessian, Cholesky, the column sweep)
    mumoe routing    μ-MoE of a 512-token prompt through 4 blocks, block routing: the router's selection

Every candidate runs quiet and beside one busy process (a CPU-bound loop this script starts and ends), in rounds
that alternate the candidates; each workload's time is a median over rounds and repeats, printed as a ratio to
torch's default on the quiet machine measured in the same run. Targets: beside a busy process, every workload at
<= 2.5x its quiet time (a fair share of 2 cores is 2x); quiet, no workload more than 5% slower than the default.

    python benchmarks/bench_threads.py [--rounds 3] [--repeats 3] [--candidates ...] [--workloads ...]
        [--out docs/threads.json]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CANDIDATES = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin30k": {"GOMP_SPINCOUNT": "30000"},
    "spin10k": {"GOMP_SPINCOUNT": "10000"},
    "spin3k": {"GOMP_SPINCOUNT": "3000"},
    "spin1k": {"GOMP_SPINCOUNT": "1000"},
    "one-thread": {"OMP_NUM_THREADS": "1"},
    "mumoe": None,  # thread_policy.py's own choice, set in the child before torch loads
}
POLICY_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")
WORKLOADS = ("decode dense", "decode packed", "fused dense", "fused packed", "prompt 2048", "wanda block",
             "sparsegpt block", "mumoe routing")
BUSY_TARGET, QUIET_TARGET = 2.5, 1.05
BUSY_FIRST = 0.5  # seconds the busy process runs before a candidate starts


# -----------------------------------------------------------------------------
# The child: one candidate's process, every workload timed


def child(repeats: int, use_policy: bool, workloads: list[str]) -> dict:
    sys.path.insert(0, str(REPO))
    if use_policy:
        import thread_policy  # noqa: F401  before torch: its environment is what libgomp reads
    import torch

    from checkpoint import dense_linear
    from decode_step import FusedStep
    from llama_model import LlamaConfig, LlamaForCausalLM
    from mumoe import MuMoE, decode_experts, mumoe_logits, route_prompt
    from pruners import prune_model

    def smollm2_shaped(layers: int) -> LlamaForCausalLM:  # random weights: a step's time does not depend on them
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                             num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                             rope_theta=100000.0, tie_word_embeddings=True)
        return LlamaForCausalLM(config).requires_grad_(False).eval()

    model, four, one = smollm2_shaped(30), smollm2_shaped(4), smollm2_shaped(1)
    ids = lambda T, seed=1: torch.randint(0, 49152, (1, T), generator=torch.Generator().manual_seed(seed))

    def decode_step(moe: MuMoE, path: str, fused: bool = False):
        cache = model.new_cache(65)
        _, chosen = route_prompt(model, ids(64), cache, moe, "masked" if moe.dense else path)
        linear = dense_linear if moe.dense else decode_experts(chosen, path)
        run = FusedStep(model, cache, {layer: experts[0] for layer, experts in chosen.items()}) if fused else None
        token = ids(1, seed=2)

        def step():
            run(token) if fused else model(token, linear, cache)
            for c in cache:  # back to the prompt's 64 tokens: every step is the same step
                c.length = 64
        return step

    def blocks_pass(x):
        for block in four.blocks:
            x = block(x, dense_linear)
        return x

    windows = torch.cat([ids(512, seed=s) for s in (3, 4)])  # (2, 512); pruning again what is pruned costs the same
    with torch.no_grad():
        fns = {
            "decode dense": lambda: decode_step(MuMoE(), "dense"),
            "decode packed": lambda: decode_step(MuMoE(0.5), "packed"),
            "fused dense": lambda: decode_step(MuMoE(), "dense", fused=True),
            "fused packed": lambda: decode_step(MuMoE(0.5), "packed", fused=True),
            "prompt 2048": lambda: lambda x=four.embed(ids(2048)): blocks_pass(x),
            "wanda block": lambda: lambda: prune_model(one, windows, "wanda", 0.5, progress=False),
            "sparsegpt block": lambda: lambda: prune_model(one, windows, "sparsegpt", 0.5, progress=False),
            "mumoe routing": lambda: lambda: mumoe_logits(four, ids(512), MuMoE(0.5)),
        }
        fns = {name: fns[name]() for name in workloads}  # each workload built only if timed
        seconds = {name: [] for name in fns}
        for name, fn in fns.items():  # a warm-up of each
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - start)
    return {"threads": torch.get_num_threads(), "seconds": seconds,
            "environment": {k: os.environ[k] for k in POLICY_VARIABLES if k in os.environ}}


# -----------------------------------------------------------------------------
# The parent: every candidate, quiet and busy, in alternating rounds


def run_child(candidate: str, busy: bool, repeats: int, workloads: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in POLICY_VARIABLES}
    env.update(CANDIDATES[candidate] or {})
    argv = [sys.executable, __file__, "--child", str(repeats), "--workloads", *workloads] + (
        ["--policy"] if CANDIDATES[candidate] is None else [])
    spin = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"  # ends if this script does
    loop = subprocess.Popen([sys.executable, "-c", spin]) if busy else None
    time.sleep(BUSY_FIRST if busy else 0)  # the machine is busy when the candidate starts (thread_policy looks)
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO)
    finally:
        if loop is not None:
            loop.kill()
            loop.wait()
    if done.returncode != 0:
        raise RuntimeError(f"{candidate}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "threads.json")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--policy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.policy, args.workloads)))
        return

    workloads = args.workloads
    times = {(c, busy): {w: [] for w in workloads} for c in args.candidates for busy in (False, True)}
    environments = {}
    for r in range(args.rounds):
        for candidate in args.candidates:
            for busy in (False, True):
                got = run_child(candidate, busy, args.repeats, workloads)
                mode = f"{candidate} {'busy' if busy else 'quiet'}"  # thread_policy's choice depends on it
                environments.setdefault(mode, []).append(got["environment"] | {"threads": got["threads"]})
                for w in workloads:
                    times[candidate, busy][w] += got["seconds"][w]
                print(f"round {r + 1}/{args.rounds} {candidate} {'busy' if busy else 'quiet'}: "
                      + ", ".join(f"{w} {statistics.median(got['seconds'][w]) * 1e3:.1f} ms" for w in workloads),
                      flush=True)

    median = lambda s: statistics.median(s)
    spread = lambda s: (max(s) - min(s)) / median(s)
    base = {w: median(times["default", False][w]) for w in workloads}
    print(f"\nmedian ms, and the ratio to torch's default on the quiet machine "
          f"(busy targets <= {BUSY_TARGET}x, quiet <= {QUIET_TARGET}x)")
    print(f"{'':22s}" + "".join(f"{w:>17s}" for w in workloads))
    rows = {}
    for (candidate, busy), by_workload in times.items():
        label = f"{candidate} {'busy' if busy else 'quiet'}"
        rows[label] = {w: {"median_ms": median(s) * 1e3, "spread": spread(s), "ratio": median(s) / base[w]}
                       for w, s in by_workload.items()}
        print(f"{label:22s}" + "".join(f"{median(s) * 1e3:8.1f} ({median(s) / base[w]:4.2f}x)"
                                       for w, s in by_workload.items()))
    sys.path.insert(0, str(REPO))
    from thread_policy import cpu_name  # (its spin choice in this process's environment is no child's: run_child)

    report = {"cpu": cpu_name(), "cores": os.cpu_count(), "rounds": args.rounds, "repeats": args.repeats,
              "environments": environments, "rows": rows}
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
