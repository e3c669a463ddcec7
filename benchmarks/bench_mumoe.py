"""μ-MoE forward time / dense forward time on an OPT-125M-shaped model, at T = 128, 512 and 2048 tokens.

The paper's complexity model says routing costs about (3/T + 1/d') of a dense pass in MACs, so a one-pass
("linear") μ-MoE forward should take little more than a dense one: target <= 1.05x at T = 2048 (bar 1.12)
and <= 1.4x at T = 512, in fp32 on CPU, lm_head included in both. Block routing gathers each block's
statistics in a dense pass first (fc2's product skipped): target <= 2.0x at T = 2048. In wall time the
routing costs O(d·d') whatever T while the matmuls cost O(d·d'·T), so short prompts pay relatively more.

Random weights (normal, std 0.02, as OPT was initialised) in opt_model's default OPTConfig (= 125m),
no download. Every mode runs in the same process, interleaved repeat by repeat and in a rotating order,
so that noise from the rest of the machine hits all of them; the median and the spread are reported.
A whole forward takes seconds, over which a shared machine's speed drifts (per-repeat ratios of
0.9-1.4 at T = 2048 have been seen), so the ratios are estimated a second way too: block by block,
each block run in every mode back to back on the same input, and a repeat's forward summed from its
blocks. The verdict is that paired estimate, for the default select (None: the compiled router,
packed_experts.route_and_gate, where it runs; numpy's partition is timed beside it). Modes:

    dense                   model(ids)
    mumoe linear <select>   one pass: each Linear routes on its own input (norms, scores, selection, gate)
    mumoe block <select>    per block: a dense statistics pass, then the gated pass

Then a per-step profile of one block at the largest T (linear routing, ms per Linear): the matmul, the input
norms, and the router-and-experts step W -> W ⊙ M, unfused (W * wanda_mask), fused in numpy (wanda_gated_weight)
and compiled (packed_experts.route_and_gate).

Peak memory (Linux, --memory): for each mode a fresh process builds the model, resets its peak resident
size (/proc/self/clear_refs) and runs one forward; VmHWM minus VmRSS before is what the forward needs.

    python benchmarks/bench_mumoe.py [--tokens 128 512 2048] [--rho 0.5] [--repeats 5] [--selects default partition]
"""

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the library, its thread policy first
import thread_policy  # noqa: E402,F401  how torch's OpenMP threads wait: set before torch loads it
import torch  # noqa: E402
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the helpers the tests share
from mumoe import input_sqnorms  # noqa: E402
from opt_model import OPTConfig  # noqa: E402
from kit.data import random_ids  # noqa: E402
from kit.timing import forward_modes, paired_blocks, timed  # noqa: E402
from kit.tiny_models import random_opt  # noqa: E402
from packed_experts import kernel_problem, route_and_gate  # noqa: E402
from pruners import SELECTS, wanda_gated_weight, wanda_mask  # noqa: E402

TARGETS = {("linear", 2048): 1.05, ("linear", 512): 1.4, ("block", 2048): 2.0}


def peak_extra_mb(args, tokens: int, mode: str) -> float:
    """Peak resident memory of one forward in `mode` above what was resident before it, measured in a
    fresh process: in this one, memory freed by earlier runs stays in the heap and would hide the peak."""
    command = [sys.executable, __file__, "--tokens", str(tokens), "--rho", str(args.rho), "--memory-of", mode]
    command += ["--threads", str(args.threads)] if args.threads else []
    return float(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])


def status_kb(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc/self/status (Linux)."""
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1])


def measure_memory(args) -> None:
    """Child process: print the peak RSS growth (MB) of one forward in mode args.memory_of."""
    model, ids = random_opt(OPTConfig()), random_ids(1, args.tokens[0], OPTConfig().vocab_size)
    fn = forward_modes(model, ids, args.rho, [args.memory_of.split()[-1]])[args.memory_of]
    with torch.no_grad():
        ctypes.CDLL(None).malloc_trim(0)  # hand freed heap memory back to the OS (glibc)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM, the peak resident size
        before = status_kb("VmRSS")
        fn()
    print((status_kb("VmHWM") - before) / 1024)


@torch.no_grad()
def profile_block(model, tokens: int, rho: float, repeats: int) -> list[dict]:
    """ms per Linear of block 0 at `tokens` tokens: matmul, input norms, W -> W ⊙ M unfused and fused."""
    block = model.blocks[0]
    x = torch.randn(1, tokens, model.config.hidden_size)
    inputs = {"self_attn.q_proj": x, "self_attn.k_proj": x, "self_attn.v_proj": x, "self_attn.out_proj": x,
              "fc1": x, "fc2": torch.relu(torch.randn(1, tokens, model.config.ffn_dim))}
    rows = []
    for name, layer in block.linears().items():
        X, W = inputs[name], layer.weight
        s = input_sqnorms(X)[0]
        rows.append(dict(linear=name, shape=tuple(W.shape),
                         matmul=statistics.median(timed(lambda: F.linear(X, W, layer.bias), repeats)) * 1e3,
                         norms=statistics.median(timed(lambda: input_sqnorms(X), repeats)) * 1e3,
                         unfused=statistics.median(timed(lambda: W * wanda_mask(W, s, rho), repeats)) * 1e3,
                         fused=statistics.median(timed(lambda: wanda_gated_weight(W, s, rho), repeats)) * 1e3,
                         compiled=statistics.median(timed(lambda: route_and_gate(W, s, rho), repeats)) * 1e3
                         if kernel_problem() is None else None))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--selects", nargs="*", choices=["default", *SELECTS], default=["default", "partition"],
                        help="selection kernels to time (default: MuMoE's default, the compiled router where it "
                             "runs, and numpy's partition, pruners' fastest)")
    parser.add_argument("--memory", action="store_true", help="measure each mode's peak memory in subprocesses")
    parser.add_argument("--out", default="results_mumoe_forward.json")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: the child process of peak_extra_mb
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        return measure_memory(args)

    model, rows = random_opt(OPTConfig()), []
    args.selects = [None if s == "default" else s for s in args.selects]
    default = None
    for tokens in args.tokens:
        ids = random_ids(1, tokens, OPTConfig().vocab_size)
        modes = forward_modes(model, ids, args.rho, args.selects)
        times = {name: [] for name in modes}
        with torch.no_grad():
            for fn in modes.values():  # warm-up
                fn()
            for r in range(args.repeats):
                names = list(modes)[r % len(modes):] + list(modes)[: r % len(modes)]  # rotate who goes first
                for name in names:
                    start = time.perf_counter()
                    modes[name]()
                    times[name].append(time.perf_counter() - start)
        dense = statistics.median(times["dense"])
        print(f"\nOPT-125M shape, T = {tokens}, rho = {args.rho}, fp32, {torch.get_num_threads()} threads, "
              f"median of {args.repeats} (spread: min-max of the per-repeat ratios to that repeat's dense)")
        print(f"{'mode':>24} {'seconds':>8} {'/ dense':>8} {'spread':>12}")
        for name, ts in times.items():
            seconds, ratios = statistics.median(ts), [t / d for t, d in zip(ts, times["dense"])]
            memory = peak_extra_mb(args, tokens, name) if args.memory else None
            print(f"{name:>24} {seconds:8.3f} {seconds / dense:8.3f} {min(ratios):5.2f}-{max(ratios):<5.2f}"
                  + (f" {memory:8.0f} MB peak extra" if memory is not None else ""))
            rows.append(dict(tokens=tokens, mode=name, estimate="whole forwards", seconds=seconds,
                             ratio=seconds / dense, ratios=ratios, peak_extra_mb=memory, all_seconds=ts))
        paired = paired_blocks(model, ids, args.rho, default, args.repeats)
        print(f"the same, block by block (the default select; each block in every mode back to back, median of "
              f"{args.repeats}):")
        for name, ratios in paired.items():
            print(f"{name:>24} {'':>8} {statistics.median(ratios):8.3f} {min(ratios):5.2f}-{max(ratios):<5.2f}")
            rows.append(dict(tokens=tokens, mode=name, estimate="block by block", ratio=statistics.median(ratios),
                             ratios=ratios))
        for (routing, T), target in TARGETS.items():
            mode = f"mumoe {routing} default"
            ratios = [r["ratio"] for r in rows if r["tokens"] == tokens == T and r["mode"] == mode]
            if ratios:  # (whole forwards: only if --selects has the default), block by block
                ratio = ratios[-1]
                print(f"verdict: {routing} routing (the default select) at T = {T}: {ratio:.3f}x dense block by block"
                      + (f" ({ratios[0]:.3f}x in whole forwards)" if len(ratios) == 2 else "")
                      + f", {'meets' if ratio <= target else 'misses'} the {target}x target")

    T = max(args.tokens)
    profile = profile_block(model, T, args.rho, args.repeats)
    print(f"\nblock 0 at T = {T}, ms per Linear (median of {args.repeats}):")
    print(f"{'linear':>18} {'shape':>12} {'matmul':>8} {'norms':>8} {'unfused':>8} {'fused':>8} {'compiled':>8}")
    for p in profile:
        print(f"{p['linear']:>18} {str(p['shape']):>12} {p['matmul']:8.2f} {p['norms']:8.2f} "
              f"{p['unfused']:8.2f} {p['fused']:8.2f} " + (f"{p['compiled']:8.2f}" if p["compiled"] else "-"))
    matmul = sum(p["matmul"] for p in profile)
    norms = sum(p["norms"] for p in profile[3:]) + profile[0]["norms"]  # q, k and v share one input's norms
    for step in ("unfused", "fused", "compiled")[: 3 if profile[0]["compiled"] else 2]:
        routing = norms + sum(p[step] for p in profile)
        print(f"routing, {step}: {routing:.1f} ms per block = {routing / matmul:.3f} of the block's matmuls")
    Path(args.out).write_text(json.dumps(dict(rho=args.rho, threads=torch.get_num_threads(), torch=torch.__version__,
                                              rows=rows, profile=profile), indent=1))
    print(f"numbers saved to {args.out}")


if __name__ == "__main__":
    main()
