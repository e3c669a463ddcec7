"""The generation command: greedy decoding with the dense model beside μ-MoE, each timed as a user would time it.

    python generate.py --model opt-125m --rho 0.5 --prompt "The capital of France is"
    python generate.py --model llava-1.5-7b --image cat.jpg --prompt "What is in the picture?" --rho 0.5

The prompt is routed once (mumoe.generate), then the new tokens decode with its experts, packed where the
packed kernel runs (--decode, mumoe.decode_path: packed_experts' on the CPU, triton_experts' on CUDA), and
the memory that the prompt's experts hold is printed (mumoe.experts_bytes). Timings: after one short warm-up
generation of each (one-off costs such as the allocator's first pages, the threads' start or loading the kernel
would otherwise count against whichever runs first), the dense and the μ-MoE generations alternate --repeats times and the medians are printed,
so that a burst of load from another process slows both alike. The MAC count beneath is mumoe.count_macs's.
"""

import ctrl_c

if __name__ == "__main__":  # Ctrl-C at any moment (nothing is saved here): one line and exit 130, no traceback
    ctrl_c.exit_at_once("generate.py")

import thread_policy  # noqa: F401  before torch: libgomp reads how its threads wait when torch loads it

import statistics
import sys

import torch

import llava_model
import mumoe
from checkpoint import UsageError, check_device
from command_line import (ArgumentParser, active_ratio, add_device_options, add_mumoe_prefix, add_mumoe_routing,
                          add_select_and_decode, default_dtype, positive_int)
from models import load_model, load_tokenizer, read_config
import triton_experts
from packed_experts import kernel_problem
from pruners import prune_count

REPEATS = 3  # alternating dense and μ-MoE generations, whose medians are printed
WARMUP_TOKENS = 2  # a warm-up generation's length: the prompt pass and one decode step, with each path's kernels


def main(argv=None) -> int:
    parser = ArgumentParser(prog="generate.py", description="Generate greedily with the dense model and with μ-MoE.")
    parser.add_argument("--model", required=True, help="opt-125m ... opt-66b, llava-1.5-7b, a hub id (OPT, LLaMA, "
                        "Mistral, Qwen2, LLaVA-1.5), or a local directory")
    parser.add_argument("--rho", type=active_ratio, required=True, help="active-weight ratio in (0, 1]")
    parser.add_argument("--prompt", required=True, help="the text; for LLaVA, the user's message (put in LLaVA-1.5's "
                        "conversation template, <image> in front unless it places its own)")
    parser.add_argument("--image", action="append", default=[], help="an image file (LLaVA; repeat for several, "
                        "each placed by an <image> in --prompt)")
    parser.add_argument("--route-vision", action="store_true",
                        help="LLaVA: route the vision tower's Linears on each image too (default: dense)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    add_mumoe_prefix(parser, "route on the first P prompt tokens only")
    add_mumoe_routing(parser, "block: each block routes on its dense pass over the prompt (Wanda's statistics, the "
                              "default); linear: each Linear on its own input, in one pass", many=False)
    add_select_and_decode(parser)
    parser.add_argument("--repeats", type=positive_int, default=REPEATS,
                        help=f"generations of each, alternating, whose median times are printed (default {REPEATS})")
    add_device_options(parser)
    args = parser.parse_args(argv)

    try:
        if not args.prompt.strip():
            raise UsageError("the prompt is empty")
        if args.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        device = check_device(args.device)
        print(thread_policy.use_threads(args.threads))
        dtype = default_dtype(args.dtype, device)
        decoding = mumoe.decode_path(args.decode, device, dtype)  # --decode packed where it cannot run: now
        vision = isinstance(read_config(args.model), llava_model.LlavaConfig)
        if (args.image or args.route_vision) and not vision:
            raise UsageError(f"--image and --route-vision need a vision-language model (LLaVA); {args.model} is not")
        if args.route_vision and not args.image:
            raise UsageError("--route-vision routes the vision tower on the --image it encodes: give an image")
        images = [llava_model.load_image(path) for path in args.image]  # a bad file stops us before the model loads
        text = llava_model.conversation_prompt(args.prompt, bool(images)) if vision else args.prompt
        if vision:
            llava_model.check_placeholders(text, len(images))
        model = load_model(args.model, device, dtype)
        tokenizer = load_tokenizer(args.model)
        if vision:  # each prompt's image features go into the embedded prompt; the language model runs on it
            llava, model = model, model.language_model
            ids = llava_model.prompt_ids(tokenizer, text, llava.config.image_token_index)
            pixels = (torch.stack([llava_model.preprocess(image, llava.config.vision_config.image_size)
                                   for image in images]) if images else None)
            dense_prompt = llava.embed_prompt(ids, pixels)
            vision_block = (mumoe.routed_block(mumoe.MuMoE(args.rho, routing=args.mumoe_routing, select=args.select))
                            if args.route_vision else None)
            routed_prompt = llava.embed_prompt(ids, pixels, vision_block) if args.route_vision else dense_prompt
            T = dense_prompt.shape[1]
        else:
            ids = dense_prompt = routed_prompt = tokenizer.encode(args.prompt)
            T = len(ids)
        if args.mumoe_prefix is not None and not 1 <= args.mumoe_prefix <= T:
            raise UsageError(f"--mumoe-prefix {args.mumoe_prefix} must lie in [1, {T}], the prompt's token count "
                             "(BOS included"
                             + (", each image's features too)" if vision else ")"))
        T_max = model.config.max_position_embeddings
        if T + args.max_new_tokens > T_max:  # in the user's numbers, before the warm-up's shorter generations
            raise UsageError(f"{T} prompt tokens + {args.max_new_tokens} new tokens (--max-new-tokens) exceed the "
                             f"model's max_position_embeddings={T_max}")
        eos_id = model.config.eos_token_id
        moe = mumoe.MuMoE(args.rho, routing=args.mumoe_routing, select=args.select, prefix=args.mumoe_prefix)
        routed = dict(moe=moe, eos_id=eos_id, decode=args.decode, step=args.step)
        warmup = min(WARMUP_TOKENS, args.max_new_tokens)  # fits wherever the generations themselves fit
        mumoe.generate(model, dense_prompt, warmup, step=args.step)
        mumoe.generate(model, routed_prompt, warmup, **routed)
        dense_runs, mumoe_runs = [], []  # each run's seconds on the prompt, packing, and decoding
        for _ in range(args.repeats):
            dense_runs.append({})
            dense_new = mumoe.generate(model, dense_prompt, args.max_new_tokens, eos_id=eos_id, timings=dense_runs[-1],
                                       step=args.step)
            mumoe_runs.append({})
            mumoe_new = mumoe.generate(model, routed_prompt, args.max_new_tokens, timings=mumoe_runs[-1], **routed)
    except UsageError as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 2

    dense_s, mumoe_s = medians(dense_runs), medians(mumoe_runs)
    select = mumoe.selection(moe, decoding, device, dtype)
    shown = text if vision else args.prompt
    print(f"prompt ({T} tokens" + (f", {llava.config.image_tokens} per image" if images else "") + f"): {shown!r}")
    print(f"times: the medians of {args.repeats} generations of each, alternating, after a warm-up of each")
    print(f"\n--- dense:\n{shown}{tokenizer.decode(dense_new)}\n{speed(len(dense_new), dense_s)}")
    print(f"\n--- μ-MoE, rho = {args.rho} ({args.mumoe_routing} routing, select={select}, routed on "
          f"{args.mumoe_prefix or T} prompt tokens):\n{shown}{tokenizer.decode(mumoe_new)}\n"
          f"{speed(len(mumoe_new), mumoe_s)}\n")
    decoder_linears = [layer for block in model.blocks for layer in block.linears().values()]
    total = sum(layer.weight.numel() for layer in decoder_linears)
    kept = {layer: layer.weight.shape[1] - prune_count(layer.weight.shape[1], args.rho) for layer in decoder_linears}
    active = sum(layer.weight.shape[0] * kept[layer] for layer in decoder_linears)  # int(d_in (1 - rho)) pruned a row
    routing_s = mumoe_s["prompt"] - dense_s["prompt"]
    print(f"routing on the prompt, once: {routing_s:.3f} s (the μ-MoE prompt pass minus the dense one"
          + (", the images' encoding excluded)" if images else ")"))
    if decoding in mumoe.PACKED_PATHS:
        kernel = "packed_experts' kernel" if decoding == "packed" else "triton_experts' Triton kernel"
        how = ("routed, selected and packed in one pass as the prompt ran (in the routing above)"
               if decoding == "packed" else "each Linear packed as soon as it was routed")
        print(f"decode: packed experts ({kernel}), {how}")
    else:
        problem = triton_experts.kernel_problem if device.type == "cuda" else kernel_problem
        reason = "--decode masked" if args.decode == "masked" else problem(device, dtype)
        print(f"decode: the masked W ⊙ M, as many bytes as dense ({reason})")
    if len(mumoe_new) > 1:
        print("decode step: " + ("fused, each block one call into C (decode_step.py)" if mumoe_s["step"] == "fused"
                                 else mumoe_s["step"] + ", the model's PyTorch forward"))
    problem = kernel_problem(device, dtype)
    print("decode, dense products (lm_head; the dense model's Linears): "
          + ("packed_experts' streamed kernel" if problem is None else f"F.linear ({problem})"))
    linear_bytes = sum(layer.weight.numel() * layer.weight.element_size() for layer in decoder_linears)
    held = mumoe_s["experts_bytes"]
    print(f"memory per routed prompt: its experts hold {held / 2 ** 20:.3g} MiB, {held / linear_bytes:.0%} of the "
          f"decoder Linears' {linear_bytes / 2 ** 20:.3g} MiB (beside the model)")
    if len(mumoe_new) > 1 and len(dense_new) > 1:
        dense_step = dense_s["decode"] / (len(dense_new) - 1)
        mumoe_step = mumoe_s["decode"] / (len(mumoe_new) - 1)
        extra = routing_s + mumoe_s["pack"]  # the up-front cost: all μ-MoE does before its first step beyond dense
        ahead = (f"μ-MoE is ahead after {max(0, extra) / (dense_step - mumoe_step):.0f} new tokens"
                 if mumoe_step < dense_step else "μ-MoE does not catch up: its steps are not faster")
        print(f"a decode step: dense {1e3 * dense_step:.1f} ms, μ-MoE {1e3 * mumoe_step:.1f} ms "
              f"({mumoe_step / dense_step:.2f}x)\nup-front cost (routing, selection"
              + (" and packing" if decoding == "packed" else "") + f" beyond the dense prompt pass): "
              f"{extra / dense_step:.1f} dense decode steps; break-even: {ahead}")
    print(f"active weights: {active:,} of {total:,} in the decoder Linears ({active / total:.2%}); "
          f"embeddings and lm_head dense")
    T_all = T + len(mumoe_new)
    dense_macs = mumoe.count_macs(model, T_all, mumoe.DENSE).total
    mumoe_macs = mumoe.count_macs(model, T_all, mumoe.MuMoE(args.rho, routing=args.mumoe_routing,
                                                             prefix=args.mumoe_prefix or T))
    print(f"MACs with active weights for the prompt and {len(mumoe_new)} new tokens, each token computed once, "
          f"attention products excluded:\n  dense {si(dense_macs)}, μ-MoE {si(mumoe_macs.total)} "
          f"(routing {si(sum(mumoe_macs.routing.values()))}): {1 - mumoe_macs.total / dense_macs:.1%} saved")
    if images:
        encoder, n = llava.vision_encoder(), len(images)
        tokens = llava.config.vision_config.num_patches + 1  # the CLS token runs through the tower too
        mmp = llava.multi_modal_projector  # dense: two Linears over each image's features
        projector = llava.config.image_tokens * (mmp.linear_1.weight.numel() + mmp.linear_2.weight.numel())
        vision_dense = mumoe.count_macs(encoder, tokens, mumoe.DENSE).total + projector
        vision_routed = (mumoe.count_macs(encoder, tokens, mumoe.MuMoE(args.rho, routing=args.mumoe_routing)).total
                         + projector)
        print(f"  vision tower ({len(encoder.blocks)} layers, {tokens} tokens) and projector, {n} image(s): "
              + (f"dense {si(n * vision_dense)}, μ-MoE {si(n * vision_routed)} (--route-vision)" if args.route_vision
                 else f"{si(n * vision_dense)}, dense in both (--route-vision routes it)"))
    return 0


def medians(runs: list[dict]) -> dict:
    """The median of each timing over the runs (the step that ran: the first run's)."""
    return {key: statistics.median(run[key] for run in runs) if key != "step" else runs[0][key] for key in runs[0]}


def speed(n_new: int, timings: dict) -> str:
    """One line on how fast `generate` went: tokens/s overall, and after the prompt."""
    total = timings["prompt"] + timings["pack"] + timings["decode"]
    line = f"[{n_new} new tokens in {total:.2f} s: {n_new / total:.1f} tokens/s; prompt {timings['prompt']:.3f} s"
    if n_new > 1:  # the first token comes with the prompt pass
        line += f", then {(n_new - 1) / timings['decode']:.1f} tokens/s"
    return line + "]"


def si(n: float) -> str:
    """1.64e12 -> '1.64T'"""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


if __name__ == "__main__":
    ctrl_c.end("generate.py", main())
