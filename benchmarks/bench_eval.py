"""Time and memory of the perplexity evaluation on an OPT-125M-shaped model at seqlen 2048.

Three loops over the same windows and the same random weights, in one process: each is run once untimed
(a warm-up: thread pools, the allocator, first-call costs), then once per round, the order reversed every
other round so that none always runs first or last:

    ours    eval_ppl.perplexity: every window through block 0, then block 1, ... (SparseGPT's opt_eval order)
    hf      transformers' OPTForCausalLM, `model(window).logits` then the loss, window by window
            (Wanda's eval_ppl_wikitext)
    mumoe   eval_ppl.perplexity with each window routed on itself (mumoe.routed_block, the default routing)

Targets: ours / hf <= 1.0 and mumoe / ours <= 1.3. Ours and hf must give the same perplexity (within
PPL_RTOL) in every round, and every loop the same number in every round: the benchmark fails otherwise,
since a faster loop that computes something else proves nothing.

Memory: for each loop, the peak resident set (VmHWM) above the resident set at its start. The peak is reset
before each loop by writing 5 to /proc/self/clear_refs (Linux); `ru_maxrss` alone could not be reset, so
it would only show the largest of the three. tracemalloc would miss torch's tensors, which are not allocated
through Python's allocator. Expected for ours: the hidden states of all windows (N x T x 768 x 4 bytes)
plus one window's float32 logits and their log-softmax (2 x T x 50272 x 4 bytes = 0.8 GB at T = 2048).
One-time allocations (thread pools, kernels' workspaces) fall in the warm-up, outside the peaks.

Other processes on the machine move these numbers by 10-30%: the load average is printed before and after.

    python benchmarks/bench_eval.py [--windows 4] [--seqlen 2048] [--rho 0.5] [--repeats 3]
"""

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the library, its thread policy first
import thread_policy  # noqa: E402,F401  how torch's OpenMP threads wait: set before torch loads it
import torch  # noqa: E402
import torch.nn.functional as F

import eval_ppl  # noqa: E402
import mumoe  # noqa: E402
from opt_model import OPTConfig, load_model  # noqa: E402

# float32, the same arithmetic in another order (block by block vs model by model, SDPA vs transformers' attention);
# measured: identical at 1 x 256 tokens; the margin is for the longer sums at 4 x 2048
PPL_RTOL = 1e-5


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measured(fn):
    """(result, seconds, peak MiB above the start) of fn()."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    start_rss, start = rss_kib("VmRSS"), time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start, (rss_kib("VmHWM") - start_rss) / 1024


@torch.no_grad()
def hf_perplexity(model, ids: torch.Tensor) -> float:
    """Wanda's loop: the whole model per window, logits of all positions, mean NLL per window."""
    nlls = []
    for window in ids:
        logits = model(window[None]).logits
        shift_logits = logits[:, :-1, :].contiguous()
        nlls.append(F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)).float(), window[1:]).item())
    return math.exp(sum(nlls) / len(nlls))


def check_same_perplexity(ppls: dict[str, list[float]]) -> None:
    """Every loop gives one number in every round, and ours gives hf's: else stop, as a failed benchmark."""
    for name, values in ppls.items():
        if len(set(values)) != 1:
            raise SystemExit(f"FAILED: {name} gives other perplexities in other rounds: {values}")
    ours, hf = ppls["ours"][0], ppls["hf"][0]
    rel = abs(ours / hf - 1)
    if rel > PPL_RTOL:
        raise SystemExit(f"FAILED: ours {ours:.6f} vs hf {hf:.6f}: rel. diff {rel:.1e} > {PPL_RTOL:.0e}")
    print(f"  ours and hf agree: perplexity {ours:.4f}, rel. diff {rel:.1e} (<= {PPL_RTOL:.0e})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--rho", type=float, default=0.5, help="μ-MoE active-weight ratio")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up; medians are compared")
    args = parser.parse_args()

    import transformers

    c = OPTConfig()  # OPT-125M's shape
    torch.manual_seed(0)
    hf_config = transformers.OPTConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, ffn_dim=c.ffn_dim,
                                       num_hidden_layers=c.num_hidden_layers, max_position_embeddings=2048,
                                       num_attention_heads=c.num_attention_heads, word_embed_proj_dim=c.hidden_size)
    reference = transformers.OPTForCausalLM(hf_config).eval()
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        ours = load_model(directory)
    ids = torch.randint(0, 50265, (args.windows, args.seqlen), generator=torch.Generator().manual_seed(0))
    routed = mumoe.routed_block(mumoe.MuMoE(args.rho))  # the default routing, as eval_ppl.py runs μ-MoE
    loops = {
        "hf": lambda: hf_perplexity(reference, ids),
        "ours": lambda: eval_ppl.perplexity(ours, ids),
        "mumoe": lambda: eval_ppl.perplexity(ours, ids, run_block=routed),
    }
    print(f"OPT-125M shape, random weights, {args.windows} windows x {args.seqlen} tokens, float32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__} "
          f"({reference.config._attn_implementation} attention); load average {os.getloadavg()[0]:.2f}")
    seconds, ppls = {name: [] for name in loops}, {name: [] for name in loops}
    for name, loop in loops.items():
        ppl, s, _ = measured(loop)
        ppls[name].append(ppl)
        print(f"  warm-up {name:<6} {s:7.1f} s  ppl {ppl:.4f}", flush=True)
    for round_ in range(args.repeats):
        for name in list(loops) if round_ % 2 == 0 else reversed(loops):
            ppl, s, peak = measured(loops[name])
            seconds[name].append(s)
            ppls[name].append(ppl)
            print(f"  {name:<6} {s:7.1f} s  ({s / args.windows:5.2f} s/window)  peak +{peak:6.0f} MiB  ppl {ppl:.4f}",
                  flush=True)
    check_same_perplexity(ppls)
    t = {name: statistics.median(s) for name, s in seconds.items()}
    print(f"ours / hf     = {t['ours'] / t['hf']:.2f}  (target <= 1.0)")
    print(f"mumoe / ours  = {t['mumoe'] / t['ours']:.2f}  (target <= 1.3, rho = {args.rho})")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
