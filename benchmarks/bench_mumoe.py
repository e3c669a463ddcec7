"""μ-MoE forward time / dense forward time, for an OPT-125M-shaped model at T = 2048 tokens.

The paper's complexity model says routing costs about (3/T + 1/d') of a dense pass in MACs, so a μ-MoE
forward should take little more than a dense one (target here: <= 1.2x in fp32 on CPU, lm_head
included in both). In wall time the per-row selection is what costs; this measures it per select.

Random weights (normal, std 0.02, as OPT was initialised) in opt_model's default OPTConfig (= 125m),
no download. Every mode runs in the same process, interleaved repeat by repeat so that noise from the
rest of the machine hits all of them; the median is reported. Modes:

    dense           model(ids)
    gate only       μ-MoE with the masks already chosen (W ⊙ M built and multiplied, no routing)
    mumoe <select>  the full μ-MoE forward: norms, scores, selection, gate, for every Linear

Peak memory (Linux): for each mode a fresh process builds the model, resets its peak resident size
(/proc/self/clear_refs) and runs one forward; VmHWM minus VmRSS before is what the forward needs.

    python benchmarks/bench_mumoe.py [--tokens 2048] [--rho 0.5] [--repeats 5] [--selects partition kthvalue]
"""

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mumoe import micro_experts  # noqa: E402
from opt_model import OPTConfig, OPTForCausalLM  # noqa: E402
from pruners import SELECTS  # noqa: E402

OPT_INIT_STD = 0.02  # OPT's init_std
TARGET_RATIO = 1.2


def peak_extra_mb(args, mode: str) -> float:
    """Peak resident memory of one forward in `mode` above what was resident before it, measured in a
    fresh process: in this one, memory freed by earlier runs stays in the heap and would hide the peak."""
    command = [sys.executable, __file__, "--tokens", str(args.tokens), "--rho", str(args.rho), "--memory-of", mode]
    command += ["--threads", str(args.threads)] if args.threads else []
    return float(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])


def status_kb(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc/self/status (Linux)."""
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1])


def measure_memory(args) -> None:
    """Child process: print the peak RSS growth (MB) of one forward in mode args.memory_of."""
    model, ids = random_opt(OPTConfig()), random_ids(args.tokens)
    selects = [args.memory_of.removeprefix("mumoe ")] if args.memory_of.startswith("mumoe") else []
    fn = forward_modes(model, ids, args.rho, selects)[args.memory_of]
    with torch.no_grad():
        if args.memory_of == "gate only":
            fn()  # the first call chooses the masks, which then stay resident like the weights
        ctypes.CDLL(None).malloc_trim(0)  # hand freed heap memory back to the OS (glibc)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM, the peak resident size
        before = status_kb("VmRSS")
        fn()
    print((status_kb("VmHWM") - before) / 1024)


def random_opt(config: OPTConfig) -> OPTForCausalLM:
    torch.manual_seed(0)
    model = OPTForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" not in name:  # LayerNorms keep weight 1, bias 0
                p.normal_(0, OPT_INIT_STD)
    return model.requires_grad_(False).eval()


def random_ids(tokens: int) -> torch.Tensor:
    return torch.randint(0, OPTConfig().vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))


def forward_modes(model, ids, rho: float, selects) -> dict:
    """name -> a function running one forward pass in that mode."""
    fixed_masks = {}  # filled by the first "gate only" call (the warm-up), reused by every later one
    modes = {"dense": lambda: model(ids),
             "gate only": lambda: model(ids, micro_experts(rho, masks=fixed_masks))}
    modes.update({f"mumoe {s}": (lambda s=s: model(ids, micro_experts(rho, s))) for s in selects})
    return modes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--selects", nargs="*", choices=SELECTS, default=list(SELECTS))
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", default="results_mumoe_forward.json")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: the child process of peak_extra_mb
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice); "
                        "1 gives steadier ratios on a machine that other jobs share")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        return measure_memory(args)

    model, ids = random_opt(OPTConfig()), random_ids(args.tokens)
    modes = forward_modes(model, ids, args.rho, args.selects)
    times = {name: [] for name in modes}
    with torch.no_grad():
        for fn in modes.values():  # warm-up
            fn()
        for r in range(args.repeats):
            for name, fn in modes.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()),
                  flush=True)
    del model, modes
    memory = {name: float("nan") if args.no_memory else peak_extra_mb(args, name) for name in times}

    dense = statistics.median(times["dense"])
    print(f"\nOPT-125M shape, T = {args.tokens}, rho = {args.rho}, fp32, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"{'mode':>16} {'seconds':>8} {'/ dense':>8} {'peak extra MB':>14}")
    rows = []
    for name in times:
        seconds = statistics.median(times[name])
        print(f"{name:>16} {seconds:8.2f} {seconds / dense:8.2f} {memory[name]:14.0f}")
        rows.append(dict(mode=name, seconds=seconds, ratio=seconds / dense, peak_extra_mb=memory[name],
                         all_seconds=times[name]))
    best = min((r for r in rows if r["mode"].startswith("mumoe")), key=lambda r: r["ratio"])
    print(f"fastest μ-MoE: {best['mode']} at {best['ratio']:.2f}x dense "
          f"({'meets' if best['ratio'] <= TARGET_RATIO else 'misses'} the {TARGET_RATIO}x target)")
    Path(args.out).write_text(json.dumps(dict(tokens=args.tokens, rho=args.rho, threads=torch.get_num_threads(),
                                              torch=torch.__version__, rows=rows), indent=1))
    print(f"numbers saved to {args.out}")


if __name__ == "__main__":
    main()
