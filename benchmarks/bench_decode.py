"""Decoding with packed experts against dense: one step, a whole generation, a batch of four prompts.

After μ-MoE routes a prompt, each new token multiplies the prompt's W ⊙ M. A decode step reads every weight
once, so its time is bound by the bytes it reads: dense reads 4 bytes per weight (fp32), the packed experts
(packed_experts.py) rho · 4 + 1/8. Each ratio below is printed beside that physical limit: the packed step's
bytes (its packed decoder Linears plus what stays dense, lm_head) over the dense step's, and the % of the ideal
speedup reached ((1 - ratio) / (1 - limit)). The machine's real limit is measured in the same run: a plain
streaming read (torch.sum on the same threads) of as many bytes as the packed step reads; "x stream" is the packed
step's time over that read's.

    step        one decode step (the next token through every block and lm_head, a 64-token cache), packed
                and masked (the dense W ⊙ M) against dense, at rho 0.6, 0.5, 0.4 and 2:4; block routing; eager
                (the model's PyTorch forward), and fused (decode_step.py, generate's), packed against dense
    generation  whole requests, a chat turn (32-token prompt + 64 new) and a long one (512 + 128), μ-MoE / dense,
                both routings, packed: the up-front cost (routing, selection and packing beyond the dense prompt
                pass) in dense decode steps, and the new tokens after which μ-MoE is ahead
    batch 4     four prompts decoding together, each with its own experts, against dense batch 4

on (a) SmolLM2-135M, a real model (make it once: python ../shared/models/smollm2-135m/make.py /tmp/smollm2-135m),
(b) an OPT-125M-shaped random model (kit.tiny_models.random_opt), (c) one LLaMA-7B-shaped block (4096 hidden, 11008
MLP; one layer, a 256-token vocabulary: the block is what is timed). fp32, batch 1, torch's threads on both
sides (default 2, this machine's cores). Every timing alternates the candidates repeat after repeat, after a
warm-up of each (kit.timing.timed), and reports medians with their spread. GB/s = bytes read / median time.

    flock /work/bench.lock python benchmarks/bench_decode.py [--smollm2 /tmp/smollm2-135m] [--repeats 9]
        [--generation-repeats 3] [--threads 2] [--out docs/packed_decode.json] [--skip generation ...]
        [--requests 32+64 512+128] [--avx2]

--avx2 times the AVX2 path on a CPU with AVX-512 (kit.isa: torch held to AVX2, the kernel built with -mno-avx512f).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the library, its thread policy first
import thread_policy  # noqa: E402,F401  how torch's OpenMP threads wait: set before torch loads it
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the helpers the tests share
import decode_step  # noqa: E402
from checkpoint import empty_modules  # noqa: E402
import models  # noqa: E402
from llama_model import LlamaConfig, LlamaForCausalLM  # noqa: E402
from mumoe import MuMoE, decode_experts, generate, packed_experts, route_prompt  # noqa: E402
from opt_model import OPTConfig  # noqa: E402
from packed_experts import decode_linear, kernel_problem  # noqa: E402
from results_file import write_json  # noqa: E402
from kit.data import random_ids  # noqa: E402
from kit import isa  # noqa: E402
from kit.timing import median_and_spread, timed  # noqa: E402
from kit.tiny_models import random_opt  # noqa: E402

CACHED = 64  # tokens in the KV cache when a step is timed: the attention's share stays small, as early in a reply
SETTINGS = {"rho 0.6": (0.6, None), "rho 0.5": (0.5, None), "rho 0.4": (0.4, None), "2:4": (1.0, (2, 4))}
TARGETS = {("smollm2-135m", "rho 0.5"): 0.70, ("smollm2-135m", "rho 0.4"): 0.62,
           ("llama-7b block", "rho 0.5"): 0.60, ("llama-7b block", "rho 0.4"): 0.50}
# μ-MoE / dense for a whole request at rho 0.5, by (prompt, new tokens) and routing (issue 32)
GENERATION_TARGETS = {(32, 64, "block"): 0.85, (32, 64, "linear"): 0.85, (512, 128, "block"): 0.88,
                      (512, 128, "linear"): 0.80}
UPFRONT_TARGET = 3.0  # dense decode steps of up-front cost, for a 32-token prompt
OPT_125M = OPTConfig(hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=50272,
                     max_position_embeddings=2048, word_embed_proj_dim=768)
LLAMA_7B_BLOCK = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1, num_attention_heads=32,
                             num_key_value_heads=32, head_dim=128, vocab_size=256, max_position_embeddings=1024)
LLAMA_INIT_STD = 0.02


def llama_7b_block() -> LlamaForCausalLM:
    torch.manual_seed(0)
    with empty_modules():
        model = LlamaForCausalLM(LLAMA_7B_BLOCK)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.0 if "norm" in name else LLAMA_INIT_STD)
    return model.requires_grad_(False).eval()


def decoder_linears(model) -> list:
    return [layer for block in model.blocks for layer in block.linears().values()]


def step_bytes(model, experts: dict | None) -> int:
    """Bytes of weights one decode step reads: the decoder Linears (dense, or packed) and lm_head."""
    inner = (sum(P.nbytes for layer in decoder_linears(model) for P in experts[layer]) if experts is not None
             else sum(layer.weight.nbytes for layer in decoder_linears(model)))
    outer = sum(m.weight.nbytes for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and not name.startswith(model.blocks_key + "."))
    return inner + outer


def streaming_read(nbytes: int):
    """A plain read of `nbytes` of float32 from memory on torch's threads: the machine's streaming rate."""
    data = torch.ones(nbytes // 4)
    return lambda: data.sum()


def stepper(model, linear, cache, next_ids):
    """One decode step through `cache` (left as it was: the cache keeps its CACHED tokens), lm_head through
    decode_linear as mumoe.generate runs it."""
    lengths = [c.length for c in cache]

    def step():
        model(next_ids, linear, cache, decode_linear)
        for c, n in zip(cache, lengths):
            c.length = n

    return step


def fused_stepper(model, products: dict, cache, next_ids):
    """One fused decode step (decode_step.py, as mumoe.generate runs it) through `cache`, left as it was."""
    step, lengths = decode_step.FusedStep(model, cache, products), [c.length for c in cache]

    def run():
        step(next_ids)
        for c, n in zip(cache, lengths):
            c.length = n

    return run


@torch.no_grad()
def bench_steps(name: str, model, repeats: int, batch: int = 1, settings=SETTINGS) -> list[dict]:
    """Per setting: a step packed, masked and dense, timed in turn; their ratios, bytes and the packing time."""
    vocab = model.config.vocab_size
    prompts, next_ids = random_ids(batch, CACHED, vocab, seed=1), random_ids(batch, 1, vocab, seed=2)
    rows = []
    for label, (rho, nm) in settings.items():
        cache = model.new_cache(CACHED + 1, batch)
        _, chosen = route_prompt(model, prompts, cache, MuMoE(rho, routing="block", nm=nm))
        masked = decode_experts(chosen, "masked")
        del chosen
        start = time.perf_counter()
        _, experts = route_prompt(model, prompts, model.new_cache(CACHED + 1, batch), MuMoE(rho, nm=nm), "packed")
        pack_s = time.perf_counter() - start  # the whole routed prompt pass, packing included
        dense_bytes, packed_bytes = step_bytes(model, None), step_bytes(model, experts)
        candidates = {"dense": stepper(model, decode_linear, cache, next_ids),  # the eager dense step
                      "masked": stepper(model, masked, cache, next_ids),
                      "packed": stepper(model, packed_experts(experts), cache, next_ids),
                      "stream": streaming_read(packed_bytes)}
        if batch == 1:  # generate's steps: each block one call into C
            weights = {layer: layer.weight for layer in experts}
            candidates["fused dense"] = fused_stepper(model, weights, cache, next_ids)
            candidates["fused packed"] = fused_stepper(model, {layer: P[0] for layer, P in experts.items()}, cache,
                                                       next_ids)
        seconds = timed(candidates, repeats)
        med = {k: statistics.median(v) for k, v in seconds.items()}
        row = dict(model=name, setting=label, batch=batch, pack_seconds=pack_s,
                   seconds={k: median_and_spread(v) for k, v in seconds.items()},
                   packed_over_dense=med["packed"] / med["dense"], masked_over_dense=med["masked"] / med["dense"],
                   bytes_limit=packed_bytes / dense_bytes, dense_bytes=dense_bytes, packed_bytes=packed_bytes,
                   dense_gbps=dense_bytes / med["dense"] / 1e9, packed_gbps=packed_bytes / med["packed"] / 1e9,
                   stream_gbps=packed_bytes / med["stream"] / 1e9, packed_over_stream=med["packed"] / med["stream"],
                   target=TARGETS.get((name, label)) if batch == 1 else None)
        row["ideal_reached"] = (1 - row["packed_over_dense"]) / (1 - row["bytes_limit"])
        if batch == 1:
            row.update(fused_packed_over_fused_dense=med["fused packed"] / med["fused dense"],
                       fused_packed_gbps=packed_bytes / med["fused packed"] / 1e9,
                       fused_dense_gbps=dense_bytes / med["fused dense"] / 1e9,
                       fused_packed_over_stream=med["fused packed"] / med["stream"])
            row["fused_ideal_reached"] = (1 - row["fused_packed_over_fused_dense"]) / (1 - row["bytes_limit"])
        rows.append(row)
        spread, target = row["seconds"]["packed"], row["target"]
        print(f"{name:15s} {label:8s} batch {batch}: packed/dense {row['packed_over_dense']:.2f} (bytes limit "
              f"{row['bytes_limit']:.2f}, {row['ideal_reached']:.0%} of the ideal speedup"
              + (f", target {target}" if target else "") + f"), masked/dense "
              f"{row['masked_over_dense']:.2f}; dense {1e3 * med['dense']:.1f} ms {row['dense_gbps']:.1f} GB/s, "
              f"packed {1e3 * med['packed']:.1f} ms [{1e3 * spread['min']:.1f}-{1e3 * spread['max']:.1f}] "
              f"{row['packed_gbps']:.1f} GB/s, streaming read of its bytes {row['stream_gbps']:.1f} GB/s: "
              f"packed {row['packed_over_stream']:.2f}x stream; routed prompt pass with packing {pack_s:.3f} s",
              flush=True)
        if batch == 1:
            print(f"{'':15s} fused steps: packed/dense {row['fused_packed_over_fused_dense']:.2f} "
                  f"({row['fused_ideal_reached']:.0%} of the ideal speedup); dense {1e3 * med['fused dense']:.1f} ms "
                  f"{row['fused_dense_gbps']:.1f} GB/s, packed {1e3 * med['fused packed']:.1f} ms "
                  f"{row['fused_packed_gbps']:.1f} GB/s, {row['fused_packed_over_stream']:.2f}x stream", flush=True)
        del experts, masked, cache
    return rows


@torch.no_grad()
def bench_generation(name: str, model, prompt_tokens: int, new_tokens: int, repeats: int, rho: float = 0.5) -> list:
    """A whole generation, dense and μ-MoE (both routings, packed), alternating; the break-even new tokens."""
    prompt = random_ids(1, prompt_tokens, model.config.vocab_size, seed=3)[0].tolist()
    runs = {"dense": [], "block": [], "linear": []}

    def run(kind):
        timings = {}
        if kind == "dense":
            generate(model, prompt, new_tokens, timings=timings)
        else:
            generate(model, prompt, new_tokens, MuMoE(rho, routing=kind), decode="packed", timings=timings)
        runs[kind].append(timings)

    timed({kind: (lambda kind=kind: run(kind)) for kind in runs}, repeats)
    runs = {kind: runs[kind][1:] for kind in runs}  # the warm-up's timings aside
    med = {kind: {key: statistics.median(r[key] for r in rs) for key in rs[0] if key != "step"}
           for kind, rs in runs.items()}
    total = {kind: m["prompt"] + m["pack"] + m["decode"] for kind, m in med.items()}  # seconds, not its bytes
    dense_step = med["dense"]["decode"] / (new_tokens - 1)
    rows = []
    for routing in ("block", "linear"):
        step = med[routing]["decode"] / (new_tokens - 1)
        extra = med[routing]["prompt"] + med[routing]["pack"] - med["dense"]["prompt"]
        ahead = extra / (dense_step - step) if step < dense_step else None
        target = GENERATION_TARGETS.get((prompt_tokens, new_tokens, routing))
        row = dict(model=name, routing=routing, rho=rho, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                   mumoe_over_dense=total[routing] / total["dense"], seconds=med[routing], dense_seconds=med["dense"],
                   routing_seconds=med[routing]["prompt"] - med["dense"]["prompt"], pack_seconds=med[routing]["pack"],
                   step_ratio=step / dense_step, ahead_after_new_tokens=ahead, upfront_dense_steps=extra / dense_step,
                   tokens_per_s=new_tokens / total[routing], dense_tokens_per_s=new_tokens / total["dense"],
                   target=target)
        rows.append(row)
        print(f"{name} generation, {prompt_tokens}-token prompt + {new_tokens} new, rho {rho}, {routing} routing: "
              f"μ-MoE/dense {row['mumoe_over_dense']:.2f} (target {target}); up-front {extra:.2f} s = "
              f"{row['upfront_dense_steps']:.1f} dense decode steps (routing, selection and packing beyond the dense "
              f"prompt pass), steps {row['step_ratio']:.2f}x dense: ahead after "
              + (f"{ahead:.0f} new tokens" if ahead is not None else "never")
              + f"; {row['tokens_per_s']:.1f} vs {row['dense_tokens_per_s']:.1f} tokens/s overall", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", type=Path, default=Path("/tmp/smollm2-135m"), help="SmolLM2-135M's directory")
    parser.add_argument("--repeats", type=int, default=9, help="timed steps of each candidate (default 9)")
    parser.add_argument("--generation-repeats", type=int, default=3, help="whole generations of each (default 3)")
    parser.add_argument("--requests", nargs="*", default=["32+64", "512+128"],
                        help="whole requests timed, prompt+new tokens (default: a chat turn and a long one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=["smollm2", "opt", "llama", "generation", "batch"])
    parser.add_argument("--out", type=Path, default=Path("docs/packed_decode.json"))
    parser.add_argument("--avx2", action="store_true", help=isa.HELP)
    args = parser.parse_args()
    instruction_set = isa.hold_to_avx2()
    problem = kernel_problem("cpu", torch.float32)
    if problem is not None:
        sys.exit(f"bench_decode.py: {problem}")
    print(thread_policy.use_threads(args.threads))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, instructions: {instruction_set}; "
          f"medians of {args.repeats} steps alternating dense / masked / packed", flush=True)
    report = {**thread_policy.settings(), "instruction_set": instruction_set, "repeats": args.repeats,
              "cached_tokens": CACHED, "steps": [], "generation": [], "batch": []}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, report)

    smollm2 = None
    if "smollm2" not in args.skip or "generation" not in args.skip or "batch" not in args.skip:
        if (args.smollm2 / "config.json").is_file():
            smollm2 = models.load_model(args.smollm2)
        else:
            print(f"SmolLM2-135M not found at {args.smollm2}: make it with "
                  f"python ../shared/models/smollm2-135m/make.py {args.smollm2}")
    if smollm2 is not None and "smollm2" not in args.skip:
        report["steps"] += bench_steps("smollm2-135m", smollm2, args.repeats)
        save()
    if "opt" not in args.skip:
        report["steps"] += bench_steps("opt-125m shape", random_opt(OPT_125M), args.repeats)
        save()
    if "llama" not in args.skip:
        block = llama_7b_block()
        report["steps"] += bench_steps("llama-7b block", block, args.repeats)
        del block
        save()
    if smollm2 is not None and "batch" not in args.skip:
        report["batch"] += bench_steps("smollm2-135m", smollm2, args.repeats, batch=4,
                                       settings={"rho 0.5": SETTINGS["rho 0.5"]})
        save()
    if smollm2 is not None and "generation" not in args.skip:
        for request in args.requests:
            prompt_tokens, new_tokens = map(int, request.split("+"))
            report["generation"] += bench_generation("smollm2-135m", smollm2, prompt_tokens, new_tokens,
                                                     args.generation_repeats)
            save()
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
