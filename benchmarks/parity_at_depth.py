"""Where do our pruned masks part from the published Wanda / SparseGPT code on a deep model, and why?

On the 30-block SmolLM2-135M our Wanda and SparseGPT masks differ from the references' more and more with depth. Two
explanations: a protocol difference (something we compute differently), or float rounding compounding through
the sequence of pruned blocks (a mask entry whose score sits within rounding of its row's threshold flips, the
next block's inputs move by that flip, more entries flip there, and so on). This script tells them apart with four
runs on the same calibration windows, each compared layer by layer with the reference's own mask:

    reference       Wanda's `prune_wanda` / SparseGPT's `prune_sparsegpt` (in Wanda's repository) on transformers'
                    LlamaForCausalLM: hooks on each Linear (`WrappedGPT.add_batch`: a running mean of
                    ||X_j||^2; `SparseGPT.add_batch`: a running mean of 2 X^T X), the stable sort per row /
                    `fasterprune` (its `sort(...)[int(numel * sparsity)]` and `<=` threshold), transcribed here
    reference, statistics in float64
                    the same code with its running means accumulated in float64 (then rounded to float32, so
                    that nothing else changes): the reference against itself, perturbed at the rounding level
    ours            `pruners.prune_model` on our model, each block fed by our own pruned blocks before it
    ours, teacher-forced
                    our statistics (`pruners.gather_statistics`, our block's forward) and our selection
                    (`wanda_mask`, `sparsegpt_prune`) at each block, on the reference's inputs to that block

If the gap is float compounding, the teacher-forced run differs from the reference at every block about as much as
at block 0, while the float64 reference drifts from the float32 one as ours does. Then the perplexity of each pruned
model on the first WikiText-2 windows (evaluated alike: our forward, which equals transformers' on this model).

    python ../shared/models/smollm2-135m/make.py /tmp/smollm2-135m
    python benchmarks/parity_at_depth.py --model /tmp/smollm2-135m --data-dir ../shared/data/rows --method wanda

Not a timing: run it under `nice` (with OMP_NUM_THREADS=1 on a busy machine). Figures and wall times: docs/smollm2.md.
"""

import argparse
import copy
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the library, its thread policy first
import thread_policy  # noqa: E402,F401  how torch's OpenMP threads wait: set before torch loads it
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the helpers the tests share

import corpora  # noqa: E402
import eval_ppl  # noqa: E402
import models  # noqa: E402
import pruners  # noqa: E402
from results_file import write_json  # noqa: E402
from kit.references import reference_fasterprune  # noqa: E402

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
BLOCKSIZE, PERCDAMP = 128, 0.01  # the references' fasterprune settings


# -----------------------------------------------------------------------------
# The reference, transcribed: Wanda's prune_wanda and prune_sparsegpt on transformers' model


class FirstLayerInputs(Exception):
    """Raised by the hook on layer 0 once it has seen its inputs (the references' Catcher)."""


def first_layer_inputs(hf, calib_ids):
    """The inputs of layer 0 for each window (N, T, hidden) and the keyword arguments every layer is called with."""
    seen = {}

    def catch(module, args, kwargs):
        seen.setdefault("x", []).append(args[0] if args else kwargs["hidden_states"])
        seen["kwargs"] = {k: kwargs[k] for k in ("attention_mask", "position_ids", "position_embeddings")}
        raise FirstLayerInputs

    hook = hf.model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    for ids in calib_ids:
        try:
            hf(ids[None])
        except FirstLayerInputs:
            pass
    hook.remove()
    return torch.cat(seen["x"]), seen["kwargs"]


def running_mean_hook(stats, name, method, accumulate):
    """WrappedGPT.add_batch (wanda: scaler_row) / SparseGPT.add_batch (H), with the accumulation's dtype a choice."""
    def add_batch(module, args, out):
        inp = args[0].reshape(-1, args[0].shape[-1]).t().to(accumulate)  # (d_in, T)
        n = stats[name]["nsamples"]
        stats[name]["value"] *= n / (n + 1)
        stats[name]["nsamples"] = n + 1
        if method == "wanda":
            stats[name]["value"] += torch.norm(inp, p=2, dim=1) ** 2 / (n + 1)
        else:
            inp = math.sqrt(2 / (n + 1)) * inp
            stats[name]["value"] += inp.matmul(inp.t())
    return add_batch


@torch.no_grad()
def reference_prune(hf, calib_ids, method, rho, accumulate=torch.float32, keep_inputs=False, exact=False):
    """Prune transformers' model in place as Wanda's repository does; returns the pruned masks by layer and name, and,
    with keep_inputs, each layer's calibration inputs (N, T, hidden), as the reference saw them."""
    inps, kwargs = first_layer_inputs(hf, calib_ids)
    masks, inputs = [], []
    for layer in hf.model.layers:
        if keep_inputs:
            inputs.append(inps.clone())
        subset = {name: layer.get_submodule(name) for name in LINEARS}
        shape = {name: (l.in_features,) if method == "wanda" else (l.in_features,) * 2 for name, l in subset.items()}
        stats = {name: {"value": torch.zeros(shape[name], dtype=accumulate), "nsamples": 0} for name in subset}
        hooks = [l.register_forward_hook(running_mean_hook(stats, name, method, accumulate)) for name, l in subset.items()]
        for j in range(len(inps)):
            layer(inps[j].unsqueeze(0), **kwargs)
        for hook in hooks:
            hook.remove()
        masks.append({})
        for name, linear in subset.items():
            W, stat = linear.weight.data, stats[name]["value"].float()  # the statistic rounded to float32
            if method == "wanda":
                W_metric = torch.abs(W) * torch.sqrt(stat.reshape((1, -1)))
                indices = torch.sort(W_metric, dim=-1, stable=True)[1][:, : int(W.shape[1] * (1 - rho))]
                W_mask = torch.zeros_like(W, dtype=torch.bool).scatter_(1, indices, True)
                W[W_mask] = 0
            else:
                W.copy_(reference_fasterprune(W, stat, 1 - rho, blocksize=BLOCKSIZE, percdamp=PERCDAMP,
                                                     exact=exact))
            masks[-1][name] = W == 0
        inps = torch.cat([layer(inps[j].unsqueeze(0), **kwargs) for j in range(len(inps))])  # the pruned layer's outputs
    return masks, inputs


# -----------------------------------------------------------------------------
# Ours: free-running, and teacher-forced on the reference's inputs


def our_masks(model):
    return [{name: block.get_submodule(name).weight == 0 for name in LINEARS} for block in model.blocks]


@torch.no_grad()
def teacher_forced(model, ref_inputs, method, rho):
    """At each block, our statistics and selection on the reference's inputs to it (the dense block's weights)."""
    masks = []
    for block, inps in zip(model.blocks, ref_inputs):
        stats = pruners.gather_statistics(block, [x[None] for x in inps], method)
        masks.append({})
        for name in LINEARS:
            W = block.get_submodule(name).weight
            if method == "wanda":
                masks[-1][name] = ~pruners.wanda_mask(W, stats[name], rho) | (W == 0)
            else:
                masks[-1][name] = pruners.sparsegpt_prune(W, stats[name], rho, BLOCKSIZE, PERCDAMP)[0] == 0
    return masks


def differing(a, b):
    """Per layer: the number of mask entries that differ, and the layer's entry count."""
    return [(sum(int((x[n] != y[n]).sum()) for n in LINEARS), sum(x[n].numel() for n in LINEARS)) for x, y in zip(a, b)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a LLaMA-family model directory (e.g. SmolLM2 from make.py)")
    p.add_argument("--data-dir", required=True, type=Path, help="{dataset}.{split}.jsonl rows (../shared/data/rows)")
    p.add_argument("--method", choices=("wanda", "sparsegpt"), default="wanda")
    p.add_argument("--rho", type=float, default=0.5, help="active-weight ratio (default 0.5)")
    p.add_argument("--nsamples", type=int, default=4, help="PTB train calibration windows (default 4)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=2, help="first WikiText-2 windows for the perplexities")
    p.add_argument("--exact-k", action="store_true", help="sparsegpt: the reference prunes exactly k weights per "
                   "block, as ours, instead of its published k + 1 (the one deliberate difference of the rule)")
    p.add_argument("--teacher-forced-only", action="store_true", help="only the reference and ours teacher-forced "
                   "(no float64 reference, no free-running run of ours, no perplexities)")
    p.add_argument("--out", type=Path, help="JSON file for every figure")
    args = p.parse_args(argv)
    if not 0 < args.rho < 1 or args.nsamples < 1 or args.eval_windows < 0:
        p.error("--rho must be in (0, 1), --nsamples >= 1, --eval-windows >= 0")
    import transformers

    torch.manual_seed(0)
    tokenizer = models.load_tokenizer(args.model)
    calib = corpora.calibration_windows("ptb", tokenizer, args.nsamples, args.seqlen, 0, args.data_dir)
    hf = transformers.LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    dense_state = copy.deepcopy(hf.state_dict())
    runs, weights, seconds = {}, {}, {}

    start = time.time()
    runs["reference"], ref_inputs = reference_prune(hf, calib, args.method, args.rho, keep_inputs=True,
                                                    exact=args.exact_k)
    weights["reference"], seconds["reference"] = copy.deepcopy(hf.state_dict()), time.time() - start
    hf.load_state_dict(dense_state)
    start = time.time()
    if not args.teacher_forced_only:
        runs["reference, statistics in float64"], _ = reference_prune(hf, calib, args.method, args.rho, torch.float64,
                                                                      exact=args.exact_k)
        weights["reference, statistics in float64"] = copy.deepcopy(hf.state_dict())
        seconds["reference, statistics in float64"] = time.time() - start
    del hf

    start = time.time()
    model = models.load_model(args.model)
    runs["ours, teacher-forced"] = teacher_forced(model, ref_inputs, args.method, args.rho)
    seconds["ours, teacher-forced"] = time.time() - start
    del ref_inputs
    if not args.teacher_forced_only:
        start = time.time()
        pruners.prune_model(model, calib, args.method, args.rho, progress=False)
        runs["ours"], weights["ours"] = our_masks(model), copy.deepcopy(model.state_dict())
        seconds["ours"] = time.time() - start

    compared = {name: differing(masks, runs["reference"]) for name, masks in runs.items() if name != "reference"}
    print(f"{args.method}, rho {args.rho}, {args.nsamples} PTB windows of {args.seqlen}: mask entries that differ "
          "from the reference's, per layer")
    print("layer " + "".join(f"{name:>36}" for name in compared))
    for b in range(len(runs["reference"])):
        total = compared["ours, teacher-forced"][b][1]
        print(f"{b:>5} " + "".join(f"{c[b][0]:>24} ({c[b][0] / total:7.4%})" for c in compared.values()))

    ppl = {}
    if args.eval_windows and not args.teacher_forced_only:
        ids = corpora.windows(corpora.evaluation_ids("wikitext2", tokenizer, args.seqlen, args.data_dir),
                              args.seqlen)[: args.eval_windows]
        for name, state in weights.items():
            model.load_state_dict(state)  # evaluated alike: our forward, which equals transformers' on this model
            ppl[name] = eval_ppl.perplexity(model, ids)
        print(f"\nWikiText-2 perplexity, the first {args.eval_windows} windows: " +
              ", ".join(f"{name} {p:.4f} ({p / ppl['reference'] - 1:+.3%})" for name, p in ppl.items()))
    print("seconds: " + ", ".join(f"{name} {s:.0f}" for name, s in seconds.items()))
    if args.out:
        write_json(args.out, {"settings": {k: str(v) for k, v in vars(args).items()}, "ppl": ppl, "seconds": seconds,
                              "differing": {name: [d for d, _ in c] for name, c in compared.items()},
                              "entries_per_layer": compared["ours, teacher-forced"][0][1]})


if __name__ == "__main__":
    main()
