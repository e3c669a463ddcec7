"""μ-MoE's router alone: a prompt's selection for every decoder Linear of SmolLM2-135M, compiled against numpy.

Routing a prompt goes from each Linear's W and the prompt's input norms ||X_j||² to its experts. What that costs
up front decides after how many new tokens μ-MoE is ahead of dense (docs/packed_decode.md), and how much a routed
forward costs beyond a dense one (docs/speed.md). Here the four ways, each over all 210 decoder Linears in turn
(106M weights, from memory: the model is larger than the caches), with the norms of a real prompt (the first
--tokens tokens of WikiText-2's test text, from a dense forward):

    route_and_pack           the packed decode's: W -> the packed experts (packed_experts.route_and_pack), each
                             Linear's values in a new tensor
    route_and_pack, arena    the same, writing W ⊙ M beside for the prompt's own gated product, every Linear's
                             values in one block of memory that the next round takes again (route_prompt's)
    route_and_pack + W ⊙ M   the same with a new tensor for each Linear's values (as route_prompt packed before)
    route_and_gate           the masked path's: W -> W ⊙ M (packed_experts.route_and_gate, MuMoE's default select)
    wanda_gated_weight       pruners' numpy pass, select partition (the default before; where no compiler is found)

All give the same masks (tests/test_route_and_pack.py). Reported: ms for the 210 Linears, ns a weight, each over
route_and_gate's time, medians of alternating rounds (kit.timing) with their spread. A new tensor for each Linear's
values is memory the allocator has just had from the system: its pages are faulted in as the kernel writes them.

    flock /work/bench.lock python benchmarks/bench_route.py [--smollm2 /tmp/smollm2-135m] [--rho 0.5]
        [--tokens 32] [--data-dir ../shared/data/rows] [--repeats 7] [--threads 2] [--out results_route.json]
        [--avx2]   (the AVX2 path on a CPU with AVX-512: kit.isa)
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the library, its thread policy first
import thread_policy  # noqa: E402  how torch's OpenMP threads wait: set before torch loads it
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the helpers the tests share
import models  # noqa: E402
from checkpoint import UsageError  # noqa: E402
from corpora import load_rows  # noqa: E402
from mumoe import input_sqnorms  # noqa: E402
from packed_experts import arena_for, kernel_problem, route_and_gate, route_and_pack, values_room  # noqa: E402
from pruners import wanda_gated_weight  # noqa: E402
from results_file import write_json  # noqa: E402
from kit import isa  # noqa: E402
from kit.timing import median_and_spread, timed  # noqa: E402


@torch.no_grad()
def prompt_norms(model, tokenizer, tokens: int, text: str) -> dict:
    """Each decoder Linear -> ||X_j||² of its input over `text`'s first `tokens` tokens (a dense forward)."""
    ids = torch.tensor([tokenizer.encode(text)[:tokens]])
    norms, hooks = {}, []
    for block in model.blocks:
        for layer in block.linears().values():
            hooks.append(layer.register_forward_hook(
                lambda layer, inputs, output: norms.__setitem__(layer, input_sqnorms(inputs[0])[0])))
    model(ids)
    for hook in hooks:
        hook.remove()
    return norms


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", type=Path, default=Path("/tmp/smollm2-135m"), help="SmolLM2-135M's directory")
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--tokens", type=int, default=32, help="the prompt's tokens (default 32)")
    parser.add_argument("--data-dir", type=Path,
                        help="the rows of the datasets (../shared/data/rows; default: the hub)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results_route.json"))
    parser.add_argument("--avx2", action="store_true", help=isa.HELP)
    args = parser.parse_args()
    instruction_set = isa.hold_to_avx2()
    problem = kernel_problem()
    if problem is not None or not (args.smollm2 / "config.json").is_file():
        print(f"bench_route.py: error: {problem or f'no SmolLM2-135M at {args.smollm2} (see --smollm2)'}",
              file=sys.stderr)
        return 2
    try:  # WikiText-2's test text, the prompt: one line if it cannot be read, before any long work
        text = "\n".join(load_rows("wikitext2", "test", args.data_dir)[:200])
    except UsageError as e:
        print(f"bench_route.py: error: {e}", file=sys.stderr)
        return 2
    print(thread_policy.use_threads(args.threads))
    model, tokenizer = models.load_model(args.smollm2), models.load_tokenizer(args.smollm2)
    norms = prompt_norms(model, tokenizer, args.tokens, text)
    scratch = {layer.weight.shape: torch.empty_like(layer.weight) for layer in norms}
    weights = sum(layer.weight.numel() for layer in norms)

    def each(fn):
        return lambda: [fn(layer.weight, s, scratch[layer.weight.shape]) for layer, s in norms.items()]

    room = sum(values_room(layer.weight, args.rho) for layer in norms)

    def in_one_arena():  # as route_prompt packs: every Linear's values in one block, the last prompt's again
        arena, kept = arena_for(room), []
        for layer, s in norms.items():
            kept.append(route_and_pack(layer.weight, s, args.rho, out=scratch[layer.weight.shape], arena=arena))
        return kept

    candidates = {
        "route_and_pack": each(lambda W, s, out: route_and_pack(W, s, args.rho)),
        "route_and_pack, arena": in_one_arena,
        "route_and_pack + W ⊙ M": each(lambda W, s, out: route_and_pack(W, s, args.rho, out=out)),
        "route_and_gate": each(lambda W, s, out: route_and_gate(W, s, args.rho, out=out)),
        "wanda_gated_weight": each(lambda W, s, out: wanda_gated_weight(W, s, args.rho, "partition", out=out)),
    }
    seconds = timed(candidates, args.repeats)
    base = statistics.median(seconds["route_and_gate"])
    print(f"SmolLM2-135M's {len(norms)} decoder Linears ({weights / 1e6:.1f}M weights), rho {args.rho}, the norms of "
          f"a {args.tokens}-token prompt, {args.threads} threads, instructions: {instruction_set}, medians of "
          f"{args.repeats} alternating rounds:")
    rows = []
    for name, s in seconds.items():
        median = statistics.median(s)
        rows.append(dict(candidate=name, seconds=median_and_spread(s), ns_per_weight=median / weights * 1e9,
                         over_route_and_gate=median / base))
        print(f"{name:>24} {1e3 * median:7.1f} ms [{1e3 * min(s):.1f}-{1e3 * max(s):.1f}] "
              f"{median / weights * 1e9:5.2f} ns a weight, {median / base:5.2f}x route_and_gate")
    write_json(args.out, {**thread_policy.settings(), "instruction_set": instruction_set, "rho": args.rho,
                          "tokens": args.tokens, "weights": weights, "rows": rows})
    print(f"results: {args.out}")


if __name__ == "__main__":
    sys.exit(main())
