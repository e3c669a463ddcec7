"""LLaVA's speed: our vision tower and our whole LLaVA forward against transformers', on the same weights.

    vision   CLIP ViT-L/14 at 336 px (LLaVA-1.5's tower, 577 tokens, 24 layers): our CLIPVisionModel against
             transformers' CLIPVisionModel, both through all 24 layers; ours through the 23 that LLaVA's
             features need is shown beside (transformers' LLaVA runs all 24 and keeps the state after 23)
    llava    one prompt of 576 image tokens + 64 text tokens through LLaVA-1.5-7B's shapes with fewer language
             layers (--text-layers, so that it fits 24 GB in float32): vision tower, projector, LLaMA layers of
             Llama-7B's width, lm_head over every position; our LlavaForConditionalGeneration against
             transformers', logits compared

Both sides share the very same weight tensors (ours are assigned from transformers' state dict), run in the
same process, alternating, after a warm-up, so machine noise hits both. Prints medians, the spread (min-max)
and the ratios (target: ours / transformers <= 1.0), for whole forwards and, less exposed to a shared
machine's drift, piece by piece (each layer of ours raced against the same layer of transformers').

    python benchmarks/bench_llava.py [--repeats 3] [--text-layers 2] [--threads N]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the library, its thread policy first
import thread_policy  # noqa: E402,F401  how torch's OpenMP threads wait: set before torch loads it
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the helpers the tests share
import llava_model  # noqa: E402
from checkpoint import empty_modules  # noqa: E402
from kit.timing import timed  # noqa: E402

TEXT_TOKENS = 64  # the prompt's text around the image (LLaVA-1.5's vicuna_v1 prompt with a question is ~60)
VICUNA_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)


def race(runs: dict, repeats: int) -> dict:
    """Each function once as a warm-up, then `repeats` rounds alternating between them: name -> seconds."""
    return timed(runs, repeats)


def paired(pieces: list, repeats: int) -> tuple[float, float]:
    """Each piece of a forward (ours, transformers'), raced on its own: the sums of the medians. Each race lasts
    a fraction of a second to a few, so the machine's drift (other jobs) moves both sides of a pair alike."""
    ours = theirs = 0.0
    for mine, other in pieces:
        times = race({"ours": mine, "transformers": other}, repeats)
        ours += statistics.median(times["ours"])
        theirs += statistics.median(times["transformers"])
    return ours, theirs


def summary(times: list[float]) -> str:
    return f"{statistics.median(times):7.3f} s  (min {min(times):.3f}, max {max(times):.3f})"


def ours_from(reference, config_json: dict):
    """Our LLaVA holding transformers' tensors themselves (no copy), through our own checkpoint-name mapping."""
    import json as json_module
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "config.json").write_text(json_module.dumps(config_json))
        config = llava_model.LlavaConfig.from_json(Path(directory) / "config.json")
    with empty_modules():
        ours = llava_model.LlavaForConditionalGeneration(config)
    state = {llava_model.our_name(k): v for k, v in reference.state_dict().items()}
    ours.load_state_dict(state, strict=True, assign=True)
    return ours.requires_grad_(False).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text-layers", type=int, default=2, help="LLaMA layers of Llama-7B's shape (7B has 32)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    torch.manual_seed(0)
    vision = {k: getattr(llava_model.CLIP_VIT_L_336, k) for k in ("hidden_size", "intermediate_size",
              "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")}
    text = dict(VICUNA_7B, num_hidden_layers=args.text_layers)
    config_json = {"model_type": "llava", "vision_config": {**vision, "model_type": "clip_vision_model"},
                   "text_config": {**text, "model_type": "llama"}, "image_token_index": 32000}
    reference = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**vision), text_config=transformers.LlamaConfig(**text),
        image_token_index=32000)).eval()
    ours = ours_from(reference, config_json)
    pixels = torch.randn(1, 3, 336, 336)
    text_ids = torch.randint(3, 32000, (TEXT_TOKENS,)).tolist()
    ids = [1] + text_ids[:8] + [32000] + text_ids[8:]  # BOS, a little text, the image, the rest
    expanded = torch.tensor([sum(([i] * 576 if i == 32000 else [i] for i in ids), [])])  # transformers' input ids
    results = {"threads": args.threads, "repeats": args.repeats, "text_layers": args.text_layers}

    with torch.inference_mode():
        tower = reference.model.vision_tower
        diff = (ours.vision_tower.hidden_states(pixels, 24) - tower(pixels).last_hidden_state).abs().max().item()
        vision_times = race({
            "ours_24_layers": lambda: ours.vision_tower.hidden_states(pixels, 24),
            "transformers": lambda: tower(pixels),
            "ours_23_layers_llava": lambda: ours.vision_tower.hidden_states(pixels, 23),
        }, args.repeats)
        theirs = reference(input_ids=expanded, pixel_values=pixels).logits
        mine = ours(ids, pixels)
        logits_diff = (mine - theirs).abs().max().item()
        del theirs, mine
        llava_times = race({"ours": lambda: ours(ids, pixels),
                            "transformers": lambda: reference(input_ids=expanded, pixel_values=pixels).logits},
                           args.repeats)

        # the same forwards piece by piece: the vision tower layer by layer, then LLaVA's vision features,
        # each language layer and the head, on inputs of the right shape
        x = ours.vision_tower.hidden_states(pixels, 0)  # (1, 577, 1024)
        vision_pieces = [(lambda: ours.vision_tower.hidden_states(pixels, 0),
                          lambda: tower.pre_layrnorm(tower.embeddings(pixels)))]
        vision_pieces += [(lambda mine=mine: mine(x), lambda other=other: other(x, None))
                          for mine, other in zip(ours.vision_tower.blocks, tower.encoder.layers)]
        vision_paired = paired(vision_pieces, args.repeats)
        h = ours.embed_prompt(ids, pixels)  # (1, 640, 4096)
        text = reference.model.language_model
        positions = torch.arange(h.shape[1])[None]
        rotary = text.rotary_emb(h, positions)
        llava_pieces = [(lambda: ours.image_features(pixels),
                         lambda: reference.model.get_image_features(pixel_values=pixels))]
        llava_pieces += [(lambda mine=mine: mine(h),
                          lambda other=other: other(h, None, position_ids=positions, position_embeddings=rotary))
                         for mine, other in zip(ours.language_model.blocks, text.layers)]
        llava_pieces.append((lambda: ours.language_model.head(h), lambda: reference.lm_head(text.norm(h))))
        llava_paired = paired(llava_pieces, args.repeats)

    median = lambda times: statistics.median(times)
    results["vision"] = {name: times for name, times in vision_times.items()}
    results["vision_ratio"] = median(vision_times["ours_24_layers"]) / median(vision_times["transformers"])
    results["vision_max_abs_diff"] = diff
    results["llava"] = {name: times for name, times in llava_times.items()}
    results["llava_ratio"] = median(llava_times["ours"]) / median(llava_times["transformers"])
    results["llava_logits_max_abs_diff"] = logits_diff
    results["vision_paired_s"], results["llava_paired_s"] = vision_paired, llava_paired
    results["vision_paired_ratio"] = vision_paired[0] / vision_paired[1]
    results["llava_paired_ratio"] = llava_paired[0] / llava_paired[1]
    print(f"{args.threads} threads, float32, median of {args.repeats} after a warm-up")
    print("CLIP ViT-L/14 at 336 px, one image (577 tokens):")
    print(f"  ours, 24 layers          {summary(vision_times['ours_24_layers'])}")
    print(f"  transformers, 24 layers  {summary(vision_times['transformers'])}")
    print(f"  ratio                    {results['vision_ratio']:.3f}  (target <= 1.0; max |diff| {diff:.1e})")
    print(f"  ours, the 23 LLaVA needs {summary(vision_times['ours_23_layers_llava'])}")
    print(f"  piece by piece (embeddings, each layer): ours {vision_paired[0]:.3f} s, transformers "
          f"{vision_paired[1]:.3f} s, ratio {results['vision_paired_ratio']:.3f}")
    print(f"LLaVA forward, 576 image + {TEXT_TOKENS} text tokens, ViT-L/14-336 + projector + {args.text_layers} "
          f"Llama-7B layers + lm_head (vocab 32064):")
    print(f"  ours                     {summary(llava_times['ours'])}")
    print(f"  transformers             {summary(llava_times['transformers'])}")
    print(f"  ratio                    {results['llava_ratio']:.3f}  (target <= 1.0; logits max |diff| "
          f"{logits_diff:.1e})")
    print(f"  piece by piece (vision features, each layer, head): ours {llava_paired[0]:.3f} s, transformers "
          f"{llava_paired[1]:.3f} s, ratio {results['llava_paired_ratio']:.3f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
