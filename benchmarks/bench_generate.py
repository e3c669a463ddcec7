"""Greedy generation with the KV cache: our dense decoding against transformers', and μ-MoE against our dense.

An OPT-125M-shaped model with random weights (as benchmarks/bench_mumoe.py builds it: normal, std 0.02,
opt_model's default OPTConfig), fp32 on CPU, a 256-token prompt and 64 new tokens. Transformers'
OPTForCausalLM gets the same state dict and runs `generate(use_cache=True, do_sample=False)`; both dense
paths must produce the same tokens. Targets:

    ours dense / transformers          <= 1.0 (bar 1.1), in total time
    μ-MoE (rho 0.5) / ours dense       <= 1.1 (bar 1.3), decoding only and in total: after the prompt a
                                       μ-MoE step is a dense step with the prompt's W ⊙ M

Modes, each warmed up once, then run in a rotating order repeat after repeat so that noise from the rest
of the machine hits all of them; medians are reported with their spread (min - max):

    ours dense          mumoe.generate(rho=1)
    transformers        transformers' generate, 64 new tokens ("transformers 1st" generates only the first
                        one: its prompt pass; its decoding time is the difference of the two medians)
    μ-MoE block|linear  mumoe.generate(rho=0.5, routing=...): routed once on the prompt

The one-off routing time is the μ-MoE prompt pass minus the dense one (the same gated product, plus the
statistics pass for block routing, the norms, scores, selection and W ⊙ M).

About 2 minutes on a 2-core CPU (each repeat ~15 s with one thread).

    python benchmarks/bench_generate.py [--prompt 256] [--new 64] [--rho 0.5] [--repeats 3] [--threads N]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the library, its thread policy first
import thread_policy  # noqa: E402,F401  how torch's OpenMP threads wait: set before torch loads it
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the helpers the tests share
from kit.data import random_ids  # noqa: E402
from kit.tiny_models import random_opt  # noqa: E402
from mumoe import MuMoE, generate  # noqa: E402
from opt_model import OPTConfig  # noqa: E402

DENSE_TARGET, DENSE_BAR = 1.0, 1.1  # ours dense / transformers
MUMOE_TARGET, MUMOE_BAR = 1.1, 1.3  # μ-MoE / ours dense


def transformers_twin(model):
    """transformers' OPTForCausalLM holding the same weights as our `model` (opt_model's default config)."""
    import transformers

    c = model.config
    config = transformers.OPTConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, ffn_dim=c.ffn_dim,
                                    num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                                    max_position_embeddings=c.max_position_embeddings,
                                    word_embed_proj_dim=c.word_embed_proj_dim,
                                    do_layer_norm_before=c.do_layer_norm_before)
    twin = transformers.OPTForCausalLM(config)
    # their keys are ours under "model." (the lm_head aside): the checkpoint layout
    state = {("model." + k if k.startswith("decoder.") else k): v for k, v in model.state_dict().items()}
    twin.load_state_dict(state, strict=True)
    twin.generation_config.eos_token_id = None  # random weights may emit </s>: always generate every token
    return twin.requires_grad_(False).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="new tokens")
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice); "
                        "1 gives steadier ratios on a machine that other jobs share")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = random_opt(OPTConfig())
    twin = transformers_twin(model)
    prompt = random_ids(1, args.prompt, OPTConfig().vocab_size)  # (1, T)
    prompt_ids = prompt[0].tolist()

    def ours(rho=1.0, routing="block"):
        timings = {}
        new = generate(model, prompt_ids, args.new, MuMoE(rho, routing=routing), timings=timings)
        return new, dict(timings, total=timings["prompt"] + timings["pack"] + timings["decode"])

    def theirs(n):
        start = time.perf_counter()
        out = twin.generate(prompt, max_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=1)
        return out[0, prompt.shape[1]:].tolist(), {"total": time.perf_counter() - start}

    modes = {"ours dense": ours, "transformers": lambda: theirs(args.new), "transformers 1st": lambda: theirs(1),
             "μ-MoE block": lambda: ours(args.rho, "block"), "μ-MoE linear": lambda: ours(args.rho, "linear")}
    names = list(modes)
    times = {name: [] for name in names}  # one timings dict per repeat
    with torch.inference_mode():
        tokens = {name: fn()[0] for name, fn in modes.items()}  # warm-up
        assert tokens["ours dense"] == tokens["transformers"], "the two dense paths disagree"
        assert all(len(tokens[name]) == args.new for name in names if name != "transformers 1st")
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:  # each repeat starts one mode later
                new, timings = modes[name]()
                assert new == tokens[name], f"{name} generated other tokens than in its warm-up"
                times[name].append(timings)
            last = ", ".join(f"{name} {t[-1]['total']:.2f}s" for name, t in times.items())
            print(f"repeat {r + 1}/{args.repeats}: {last}", flush=True)

    def median(name, key):
        return statistics.median(t[key] for t in times[name])

    def spread(name, key):
        values = [t[key] for t in times[name]]
        return f"{min(values):.3f}-{max(values):.3f}"

    # transformers' decoding time: its full generate minus its prompt pass (generate with one new token)
    decode = {"transformers": median("transformers", "total") - median("transformers 1st", "total")}
    print(f"\nOPT-125M shape, random weights, fp32 CPU, {torch.get_num_threads()} threads; prompt {args.prompt} "
          f"tokens, {args.new} new tokens, greedy; median of {args.repeats} (spread min-max)")
    print(f"{'mode':>14} {'total s':>8} {'spread':>12} {'tokens/s':>9} {'prompt s':>9} {'decode tokens/s':>16}")
    rows = {}
    for name in ("ours dense", "transformers", "μ-MoE block", "μ-MoE linear"):
        total = median(name, "total")
        prompt_s = median(name, "prompt") if name != "transformers" else median("transformers 1st", "total")
        decode_s = median(name, "decode") if name != "transformers" else decode["transformers"]
        rows[name] = dict(total_s=total, prompt_s=prompt_s, decode_s=decode_s, tokens_per_s=args.new / total,
                          decode_tokens_per_s=(args.new - 1) / decode_s, all_total_s=[t["total"] for t in times[name]])
        print(f"{name:>14} {total:8.3f} {spread(name, 'total'):>12} {args.new / total:9.1f} {prompt_s:9.3f} "
              f"{(args.new - 1) / decode_s:16.1f}")

    dense, transformers = rows["ours dense"], rows["transformers"]
    ratios = [("ours dense / transformers, total", dense["total_s"] / transformers["total_s"], DENSE_TARGET, DENSE_BAR),
              ("ours dense / transformers, decoding", dense["decode_s"] / transformers["decode_s"],
               DENSE_TARGET, DENSE_BAR)]
    for routing in ("block", "linear"):
        row = rows[f"μ-MoE {routing}"]
        print(f"routing on the prompt ({routing}), once: {row['prompt_s'] - dense['prompt_s']:.3f} s "
              f"(μ-MoE prompt pass {row['prompt_s']:.3f} s - dense {dense['prompt_s']:.3f} s)")
        ratios += [(f"μ-MoE {routing} / ours dense, decoding", row["decode_s"] / dense["decode_s"],
                    MUMOE_TARGET, MUMOE_BAR),
                   (f"μ-MoE {routing} / ours dense, total", row["total_s"] / dense["total_s"],
                    MUMOE_TARGET, MUMOE_BAR)]
    print()
    for name, ratio, target, bar in ratios:
        verdict = "meets the target" if ratio <= target else "within the bar" if ratio <= bar else "MISSES the bar"
        print(f"{name:>38}: {ratio:.3f}  (target <= {target}, bar {bar}: {verdict})")
    print(json.dumps(dict(prompt=args.prompt, new=args.new, rho=args.rho, threads=torch.get_num_threads(),
                          torch=torch.__version__, rows=rows, ratios={name: r for name, r, _, _ in ratios})))


if __name__ == "__main__":
    main()
