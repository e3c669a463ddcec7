"""A LLaMA-shaped model on the CPU: our dense forward against transformers', and μ-MoE against our dense forward.

The shape fits this machine and has what matters of a real LLaMA: hidden 1024, 8 blocks, 16 query heads sharing
4 key/value heads (grouped-query attention), the SwiGLU MLP of 2816, a 32000-token vocabulary. Random weights
(normal, std 0.02), float32, no download. Every run interleaves the modes repeat by repeat in a rotating order, so
the noise of a shared machine hits all of them, and reports the median and the min-max spread of the per-repeat
ratios. Targets (issue 17): ours / transformers <= 1.0 at T = 2048 (OPT: 1.03); μ-MoE / dense reported at T = 512
and 2048 for both routings, also estimated block by block (kit.timing.paired_blocks) as for OPT.

    python benchmarks/bench_llama.py [--tokens 512 2048] [--repeats 5] [--rho 0.5]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the library, its thread policy first
import thread_policy  # noqa: E402,F401  how torch's OpenMP threads wait: set before torch loads it
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the helpers the tests share
sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402
from kit.timing import paired_blocks  # noqa: E402
from mumoe import MuMoE, mumoe_logits  # noqa: E402

SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, max_position_embeddings=4096)
INIT_STD = 0.02  # LLaMA's initializer_range


def interleaved(modes: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each mode, `repeats` times, after a warm-up of each; who goes first rotates every repeat."""
    times = {name: [] for name in modes}
    with torch.inference_mode():
        for fn in modes.values():
            fn()
        for r in range(repeats):
            for name in list(modes)[r % len(modes):] + list(modes)[: r % len(modes)]:
                start = time.perf_counter()
                modes[name]()
                times[name].append(time.perf_counter() - start)
    return times


def report(times: dict[str, list[float]], baseline: str, title: str) -> list[dict]:
    print(f"\n{title}, {torch.get_num_threads()} threads, median (spread: min-max of per-repeat ratios)")
    rows = []
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times[baseline])]
        print(f"{name:>24} {statistics.median(ts):8.3f} s {statistics.median(ratios):7.3f}x "
              f"{min(ratios):5.2f}-{max(ratios):<5.2f}")
        rows.append(dict(title=title, mode=name, seconds=ts, ratio=statistics.median(ratios), ratios=ratios))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--out", default="results_llama_bench.json")
    args = parser.parse_args()

    import transformers

    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, initializer_range=INIT_STD)).eval()
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        ours = models.load_model(directory)
    rows = []
    for T in args.tokens:
        ids = torch.randint(0, SHAPE["vocab_size"], (1, T), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            assert (ours(ids) - reference(ids).logits).abs().max() < 1e-3  # same weights, same answer
        modes = {"transformers": lambda: reference(ids).logits, "dense": lambda: ours(ids)}
        modes.update({f"mumoe {r}": (lambda moe=MuMoE(args.rho, routing=r): mumoe_logits(ours, ids, moe))
                      for r in ("linear", "block")})
        times = interleaved(modes, args.repeats)
        rows += report({k: times[k] for k in ("transformers", "dense")}, "transformers",
                       f"dense forward, ours / transformers, T = {T}")
        rows += report({k: v for k, v in times.items() if k != "transformers"}, "dense",
                       f"μ-MoE / our dense, rho = {args.rho}, T = {T}")
        with torch.inference_mode():
            paired = paired_blocks(ours, ids, args.rho, None, args.repeats)  # MuMoE's default select
        print("the same, block by block (each block in every mode back to back):")
        for name, ratios in paired.items():
            print(f"{name:>24} {'':>10} {statistics.median(ratios):7.3f}x {min(ratios):5.2f}-{max(ratios):<5.2f}")
            rows.append(dict(title=f"block by block, T = {T}", mode=name, ratio=statistics.median(ratios),
                             ratios=ratios))
    Path(args.out).write_text(json.dumps(dict(shape=SHAPE, rho=args.rho, torch=torch.__version__, rows=rows), indent=1))
    print(f"numbers saved to {args.out}")


if __name__ == "__main__":
    main()
