"""μ-MoE: test-time pruning as a micro-grained mixture of experts, its MAC count, and generation.

This file owns the method of Koike-Akino, Liu & Wang (2025), "Test-Time Pruning as Micro-Grained
Mixture-of-Experts". Wanda prunes a Linear once, from calibration data; μ-MoE prunes it again for
every prompt, from that prompt's own activations. Read as a mixture of experts:

    experts   every weight W_ij of a decoder Linear is a micro-expert: one multiply-accumulate
    router    S_ij = |W_ij| * ||X_j||_2, where X_j is input feature j over the prompt's T tokens
              (the Wanda score, pruners.wanda_score); in each output row i the top rho fraction of
              S_i: is active: M_ij = 1 (pruners.wanda_mask, exact-k with ties to the lower index)
    gate      Y = X (W ⊙ M)^T + b: only the active experts take part, for this prompt only

Which X routes a Linear? Two readings, both per prompt, differ in the input of the later Linears:

    routing="block"   (default) X_l = the input of Linear l in a *dense* pass of its block over the prompt:
                      M_l = mask(W_l, X_l^dense), then the block runs gated: h' = block(h; W_l ⊙ M_l).
                      Wanda's procedure (its hooks fire before anything in the block is pruned) run with
                      the prompt as the only calibration sample: most likely how the paper made its table.
    routing="linear"  X_l = the input Linear l receives in the gated pass itself: out_proj reads the
                      output of gated q/k/v, fc2 the output of gated fc1. One pass and nothing dense:
                      what the paper's complexity formula counts, and what an inference engine deploys.

q, k and v read the block's input in both, so they get the same masks; the others differ, and the
gap grows as rho falls. Block routing costs a dense pass per block more (fc2's product is skipped).
In a batch each prompt gets its own masks. Embeddings and lm_head stay dense. The paper routes a
perplexity window on all of its tokens, the ones it then predicts included; `prefix=N` routes on the
first N tokens only, a strictly causal variant.

    reference_linear(W, b, X, rho)   the method in six lines, for one prompt: what the fast paths are tested against
    MuMoE(rho, routing, ...)         the method's settings, which travel together
    routed_block(moe)                (block, x) -> the block's output, each prompt routed on itself
    micro_experts(moe)               the μ-MoE Linear, a drop-in for checkpoint.dense_linear
    mumoe_logits(model, ids, moe)    (B, T) ids (or embedded prompts) -> (B, T, vocab) logits, each routed on itself
    count_macs(model, T, moe)        the analytical MAC count, ours or the paper's convention
    route_prompt(model, ids, cache)  route prompts once, filling the KV cache: their experts for later tokens
                                     (packed as routed, in one pass, where the decode is packed: route_expert)
    decode_experts(chosen, path)     the Linear later tokens run through: the experts packed (packed_experts'
                                     kernel on the CPU, triton_experts' on CUDA, read only the kept weights) or
                                     the masked W ⊙ M; decode_path picks
    experts_bytes(chosen)            the bytes a routed prompt's experts hold
    generate(model, ids, n, moe)     greedy decoding with a KV cache, routed once on the prompt (ids, or the
                                     prompt embedded: a LLaVA's, its image features spliced in); each step's
                                     blocks one call into C each where it runs (decode_step.py)

The generation command (dense beside μ-MoE, timed) is generate.py.

Complexity (the paper's argument). A dense Linear with d inputs and d' outputs costs d·d'·T MACs for
T tokens. μ-MoE costs rho·d·d'·T for the active experts, plus routing: d·T for the norms ||X_j||²,
d·d' to score, about d·d' to select (introselect is linear on average) and d·d' to gate. Relative to
the dense pass, routing is (3/T + 1/d') -- 0.3% at T = 2048, d' = 768 -- so the MACs fall almost as
rho. In wall time the selection is what costs: on the CPU packed_experts' compiled router fuses it, W to W ⊙ M
(route_and_gate; pruners.wanda_gated_weight in numpy where no compiler is found), or W to the packed experts
where the decode is packed (route_and_pack). A decode step
reads every weight once, so it costs bytes: the dense W ⊙ M reads what W does, the packed experts rho · 4 + 1/8
bytes per weight instead of 4 (packed_experts); on CUDA rho · 2 + 1/8 instead of 2 in float16 (triton_experts).

Everything here works on any model with checkpoint.py's interface (OPT, LLaMA, a vision-language model's
language model): it sees blocks, their `linears()` and hidden states, never a model family.
"""

import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import decode_step
from checkpoint import KVCache, LinearFn, UsageError, dense_linear
from packed_experts import (ROWS, Arena, arena_for, concatenate, decode_linear, kernel_problem, pack, packed_linear,
                            part, route_and_gate, route_and_pack, values_room)
from pruners import SELECTS, check_rho, default_select, prune_count, wanda_gated_weight

# -----------------------------------------------------------------------------
# The method in six lines: μ-MoE's Linear for one prompt, the reference every faster path here is tested against

def reference_linear(W: torch.Tensor, bias: torch.Tensor | None, X: torch.Tensor, rho: float):
    """μ-MoE's Linear on one prompt X (T, d_in), written plainly: route, keep each row's top k, gate.

    Returns (Y (T, d_out), M (d_out, d_in) the active experts). `micro_experts` computes the same, batched and fused.
    """
    S = W.float().abs() * X.float().square().sum(dim=0).sqrt()            # router: S_ij = |W_ij| · ||X_j||_2
    pruned = prune_count(W.shape[1], rho)                                  # each row drops its lowest `pruned`
    lowest = torch.sort(S, dim=1, stable=True).indices[:, :pruned]        # ties: the lower index goes first
    M = torch.ones_like(S, dtype=torch.bool).scatter_(1, lowest, False)   # the active experts, top k of each row
    Y = F.linear(X, W * M, bias)                                           # gate: Y = X (W ⊙ M)^T + b
    return Y, M


# -----------------------------------------------------------------------------
# Router, experts and gate, batched and fast

ROUTINGS = ("block", "linear")


@dataclass(frozen=True)
class MuMoE:
    """μ-MoE's settings, checked once and passed whole to every function here.

    rho      the active-weight ratio in (0, 1]: each row keeps d_in - int(d_in · (1 - rho)) of its experts
    routing  "block" or "linear": which activations route a Linear (see above)
    select   the exact selection kernel (None: the compiled router's on the CPU, else the fastest on W's device;
             all give the same masks)
    prefix   route on the first `prefix` tokens of a prompt only (None: on all of them)
    nm       (N, M): each prompt prunes N of every M weights of a row instead of rho

    rho = 1 without nm is the dense model itself: no routing, no copy.
    """
    rho: float = 1.0
    routing: str = "block"
    select: str | None = None
    prefix: int | None = None
    nm: tuple[int, int] | None = None

    def __post_init__(self):
        check_rho(self.rho)
        if self.routing not in ROUTINGS:
            raise UsageError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.select is not None and self.select not in SELECTS:
            raise UsageError(f"select must be one of {SELECTS}, got {self.select!r}")
        if self.prefix is not None and self.prefix < 1:
            raise UsageError(f"prefix must be a positive number of tokens, got {self.prefix}")

    @property
    def dense(self) -> bool:
        return self.rho == 1.0 and self.nm is None


DENSE = MuMoE()  # the dense model, as μ-MoE's settings


def input_sqnorms(x: torch.Tensor, prefix: int | None = None) -> torch.Tensor:
    """||X_j||² = sum_t X_tj² of each prompt of x (B, T, d_in) -> (B, d_in), in float32, over the first
    `prefix` tokens only if given (then nothing after the prefix can change the masks)."""
    return x[:, :prefix].float().square().sum(dim=1)


def gate(layer: nn.Linear, X: torch.Tensor, experts, counter: Counter | None = None) -> torch.Tensor:
    """Gate: Y_b = X_b (W ⊙ M_b)^T + bias for each prompt b of X (B, T, d_in), with only its active experts.

    `experts` yields W ⊙ M_b for each prompt in turn (a generator may build each just before its product).
    `counter` gets the MACs that each product does with nonzero weights.
    """
    Y = []
    for X_b, W_b in zip(X, experts):  # X_b (T, d_in)
        if counter is not None:
            counter[layer] += torch.count_nonzero(W_b).item() * X_b.shape[0]
        Y.append(F.linear(X_b, W_b, layer.bias))
    return Y[0][None] if len(Y) == 1 else torch.stack(Y)  # (B, T, d_out)


def micro_experts(moe: MuMoE, stats: dict | None = None, chosen: dict | None = None,
                  counter: Counter | None = None, path: str = "masked", arena: Arena | None = None) -> LinearFn:
    """The μ-MoE Linear, a drop-in for `dense_linear`: `block(x, linear=micro_experts(MuMoE(0.5)))`.

    For each prompt b of its input x (B, T, d_in) it does what `reference_linear` does -- the norms ||X_j||², each
    row's top k of S = |W| · ||X||, the gated product -- with the same masks (tested), in the settings of `moe`.
    What production adds, each in a function of its own below:
      router input  x itself (one-pass "linear" routing) or, if `stats` maps the Linear to (B, d_in) norms
                    ||X_j||², those (the "block" routing, see `routed_block`); q, k and v read one tensor, so
                    its norms are computed once
      experts       `gated_weight` builds W ⊙ M_b in one fused pass (moe.select: the kernel; moe.nm:
                    an N:M pattern instead of rho), written into one scratch tensor and used once. `chosen`: a
                    dict that receives, per nn.Linear, each prompt's experts for later tokens, in the form the
                    decode `path` reads (`route_expert`: W ⊙ M_b for "masked"; packed for "packed", in the same
                    compiled pass that routes and selects, its values taken from `arena` if given, or
                    "triton")
      gate          `gate`; `counter`: a Counter that gets, per nn.Linear, the MACs done with nonzero weights,
                    nnz(W ⊙ M_b) · T summed over prompts
      rho = 1       the dense Linear itself, no routing
    """
    prefix = moe.prefix
    last = {"x": None, "sqnorms": None}  # q, k and v read one tensor: its norms are computed once
    scratch = {}  # by shape: the memory that gated weights used for one product only are written into

    def router_input(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """(B, d_in) norms ||X_j||² of each prompt, over its first `prefix` tokens if given."""
        if stats is not None:
            return stats[layer]
        if x is not last["x"]:
            last.update(x=x, sqnorms=input_sqnorms(x, prefix))
        return last["sqnorms"]

    def experts(layer: nn.Linear, sqnorms: torch.Tensor):
        """W ⊙ M_b for each prompt b in turn, the gate's weights, built into one scratch tensor (a fresh one costs
        page faults); with `chosen`, each prompt's experts noted there too, in the form the decode reads."""
        W = layer.weight
        if W.shape not in scratch and (chosen is None or path == "packed"):
            scratch[W.shape] = torch.empty_like(W)
        if chosen is None:
            return (gated_weight(W, s_b, moe, out=scratch[W.shape]) for s_b in sqnorms)
        chosen[layer] = kept = []

        def noted():
            for s_b in sqnorms:
                expert, W_b = route_expert(layer, s_b, moe, path, scratch.get(W.shape), arena)
                kept.append(expert)
                yield W_b
        return noted()

    def routed_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if prefix is not None and prefix > x.shape[1]:
            raise UsageError(f"prefix {prefix} is longer than the {x.shape[1]} tokens of the input")
        W = layer.weight
        if moe.dense:
            if chosen is not None:
                chosen[layer] = [W] * x.shape[0]
            return gate(layer, x, [W] * x.shape[0], counter) if counter is not None else dense_linear(layer, x)
        return gate(layer, x, experts(layer, router_input(layer, x)), counter)

    return routed_linear


def route_expert(layer: nn.Linear, sqnorms: torch.Tensor, moe: MuMoE, path: str, scratch=None,
                 arena: Arena | None = None) -> tuple:
    """A Linear's experts for one prompt, routed on its (d_in,) input norms ||X_j||² -> (the experts in the form
    `path` decodes with, the W ⊙ M the prompt's own gated product reads). "masked": W ⊙ M itself
    (`gated_weight`), both. "packed": the experts packed straight from W and the norms in one pass
    (packed_experts.route_and_pack: the same masks), W ⊙ M written into `scratch` in that pass, a matrix that the
    next Linear of this shape overwrites: the prompt's W ⊙ M is never held for every Linear at once (the values
    into `arena`, packed_experts.arena_for's, where given). "triton":
    W ⊙ M packed for CUDA's kernel (triton_experts.pack) as soon as it is built, for the gated product only."""
    W = layer.weight
    if path == "packed":
        return route_and_pack(W, sqnorms, moe.rho, moe.nm, layer.bias, out=scratch, arena=arena), scratch
    W_gated = gated_weight(W, sqnorms, moe)
    if path == "triton":
        return packer(path)(W_gated, layer.bias), W_gated
    return W_gated, W_gated


def gated_weight(W: torch.Tensor, sqnorms: torch.Tensor, moe: MuMoE, out: torch.Tensor | None = None) -> torch.Tensor:
    """W ⊙ M for one prompt's (d_in,) norms ||X_j||², into `out` if given: pruners.wanda_gated_weight's, with
    moe.select's kernel; with select None, where the compiled router runs (float32 on the CPU), by its selection
    (packed_experts.route_and_gate: the same masks, 5-7x faster than numpy's partition)."""
    if compiled_router(moe, W.device, W.dtype):
        return route_and_gate(W, sqnorms, moe.rho, moe.nm, out=out)
    return wanda_gated_weight(W, sqnorms, moe.rho, moe.select, moe.nm, out=out)


def selection(moe: MuMoE, path: str, device, dtype: torch.dtype) -> str:
    """The selection that routes prompts with `moe` for a decode `path`, as the commands print it: "compiled"
    (packed_experts' router: route_and_pack for the packed decode, route_and_gate where select is None and it
    runs) or pruners' kernel (moe.select, or the fastest on the device)."""
    if path == "packed" or compiled_router(moe, device, dtype):
        return "compiled"
    return moe.select or default_select(device)


def compiled_router(moe: MuMoE, device, dtype: torch.dtype) -> bool:
    """Whether the masked path's W ⊙ M comes from packed_experts' compiled router: select None, where it runs."""
    return moe.select is None and kernel_problem(device, dtype) is None


def block_statistics(block: nn.Module, x: torch.Tensor, prefix: int | None = None) -> dict:
    """One dense pass of `block` over x (B, T, hidden): each Linear -> the (B, d_in) norms ||X_j||² of its input.

    The block is dense throughout, as the reference's Wanda hooks see it. The model is causal, so the
    first `prefix` tokens' activations are those of a pass over the prefix alone.
    """
    stats, last = {}, {"x": None, "sqnorms": None}
    *_, final = block.linears().values()  # fc2, down_proj: its output only feeds the block's output,
                                          # which this pass does not need

    def dense_noting_input(layer, x_in):
        if x_in is not last["x"]:  # q, k and v read one tensor
            last.update(x=x_in, sqnorms=input_sqnorms(x_in))
        stats[layer] = last["sqnorms"]
        return x_in.new_zeros(()) if layer is final else layer(x_in)  # x + 0: the last product is skipped

    block(x[:, :prefix], dense_noting_input)
    return stats


def routed_block(moe: MuMoE, chosen: dict | None = None, counter: Counter | None = None, path: str = "masked",
                 arena: Arena | None = None):
    """(block, x) -> the block's output for x (B, T, hidden), each prompt routed on itself.

        routing="block"   the block's Linears route on the statistics of a dense pass of the block over the
                          prompt, then the block runs gated: Wanda's procedure, run per prompt
        routing="linear"  each Linear routes on the input it receives in the gated pass itself: one pass,
                          nothing dense

    `chosen`, `counter`, `path` and `arena` are `micro_experts`'. `run(block, x, cache)` fills the block's KVCache
    in the gated pass (the statistics pass leaves it alone): how `generate` routes the prompt.
    """
    prefix = moe.prefix
    stats = {} if moe.routing == "block" and not moe.dense else None  # each block's statistics, as it runs
    linear = micro_experts(moe, stats, chosen, counter, path, arena)

    def run(block: nn.Module, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if prefix is not None and prefix > x.shape[1]:
            raise UsageError(f"prefix {prefix} is longer than the {x.shape[1]} tokens of the input")
        if stats is not None:  # without the cache: the gated pass below fills it
            stats.update(block_statistics(block, x, prefix))
        return block(x, linear, cache)

    return run


def chosen_experts(chosen: dict) -> LinearFn:
    """The Linear that gates with experts chosen earlier (`micro_experts(chosen=...)`): no routing at all."""

    def gate_with_chosen(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if len(chosen[layer]) != x.shape[0]:
            raise ValueError(f"{len(chosen[layer])} prompts' experts for a batch of {x.shape[0]} prompts")
        return gate(layer, x, [W.to(x.device) for W in chosen[layer]])  # (an offloaded block's come along)

    return gate_with_chosen


# -----------------------------------------------------------------------------
# Decoding with a prompt's experts: masked (W ⊙ M, dense) or packed (only the kept weights)

DECODES = ("auto", "packed", "masked")
PACKED_PATHS = ("packed", "triton")  # decode_path's answers that read packed experts: the CPU's, CUDA's kernel


def decode_path(decode: str, device, dtype: torch.dtype) -> str:
    """Which product later tokens run through: "packed" (packed_experts' kernel on the CPU), "triton"
    (triton_experts' kernel on CUDA), both reading only the kept weights, or "masked" (the dense W ⊙ M, zeros
    included). decode "auto" takes the device's packed kernel where it runs and the masked product, the same
    tokens, elsewhere; "packed" where it cannot run is a UsageError saying why."""
    if decode not in DECODES:
        raise UsageError(f"decode must be one of {DECODES}, got {decode!r}")
    if decode == "masked":
        return "masked"
    if torch.device(device).type == "cuda":
        import triton_experts  # here only: triton takes 0.4 s to import, which the CPU never needs

        path, problem = "triton", triton_experts.kernel_problem(device, dtype)
        problem = problem and f"the packed decode kernel on CUDA is triton_experts': {problem}"
    else:
        path, problem = "packed", kernel_problem(device, dtype)
    if problem is not None and decode == "packed":
        raise UsageError(f"--decode packed cannot run here: {problem}")
    return "masked" if problem is not None else path


def packer(path: str):
    """The packing of `path`'s kernel (one of PACKED_PATHS): (W ⊙ M, bias) -> the packed experts, on W's device."""
    if path == "triton":
        import triton_experts

        return triton_experts.pack
    return pack


def packed_gate(x: torch.Tensor, experts: list, product=None) -> torch.Tensor:
    """y_b = x_b (W ⊙ M_b)^T + bias with each prompt's packed experts, by `product` (packed_experts' kernel if not
    given); one prompt's experts serve every sequence of x."""
    product = product or packed_linear
    if len(experts) == 1:
        return product(x, experts[0])  # (B, T, d_out), every sequence with these experts
    if len(experts) != x.shape[0]:
        raise ValueError(f"{len(experts)} prompts' experts for a batch of {x.shape[0]} prompts")
    return torch.stack([product(x_b, P_b) for x_b, P_b in zip(x, experts)])


def pack_experts(chosen: dict, path: str = "packed") -> dict[nn.Linear, list]:
    """`chosen` (per nn.Linear, each prompt's W ⊙ M_b, or its experts packed already) -> per nn.Linear, each
    prompt's experts packed for `path`."""
    pack_one = packer(path)
    return {layer: [pack_one(W_b, layer.bias) if torch.is_tensor(W_b) else W_b for W_b in experts]
            for layer, experts in chosen.items()}


def packed_experts(packed: dict, path: str = "packed") -> LinearFn:
    """The Linear that gates with packed experts (`pack_experts`): y_b = x_b (W ⊙ M_b)^T + bias, reading only the
    kept weights, by `path`'s kernel. One prompt's experts serve every sequence of the batch (continuations of
    one context).

    On the CPU, the Linears that a block calls one after another on one tensor (q, k and v; gate and up) run as one
    product from the second step on: the first step notes which they are, and their experts are concatenated then
    (packed_experts.concatenate; each keeps a view of its rows), so a step makes fewer, longer kernel calls.
    """
    if path == "triton":
        import triton_experts

        return lambda layer, x: packed_gate(x, packed[layer], triton_experts.packed_linear)

    learning, seen, run = True, set(), {"x": None, "layers": []}  # the current run of Linears reading one tensor
    groups = {}  # first Linear of a group -> the group, in call order
    waiting = {}  # Linear -> (the tensor it was computed for, its output), by its group's product

    def close_run():
        members = run["layers"]
        if len(members) > 1 and all(len(packed[layer]) == 1 and layer.out_features % ROWS == 0 for layer in members):
            whole = concatenate([packed[layer][0] for layer in members])
            groups[members[0]] = (members, whole)
            start = 0
            for layer in members:  # each keeps a view of its rows: the memory is held once
                packed[layer] = [part(whole, slice(start, start + layer.out_features))]
                start += layer.out_features
        run.update(x=None, layers=[])

    def gate_packed(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        nonlocal learning
        if layer in waiting:
            x_computed, y = waiting.pop(layer)
            if x_computed is x:
                return y
        if learning and layer in seen:  # a second step begins: every Linear has been called once
            close_run()
            learning = False
        if learning:
            seen.add(layer)
            if run["x"] is not x:
                close_run()
                run["x"] = x
            run["layers"].append(layer)
        elif layer in groups:
            members, whole = groups[layer]
            outputs = packed_linear(x, whole).split([member.out_features for member in members], dim=-1)
            for member, y in zip(members[1:], outputs[1:]):
                waiting[member] = (x, y)
            return outputs[0]
        return packed_gate(x, packed[layer])

    return gate_packed


def decode_experts(chosen: dict, path: str) -> LinearFn:
    """The Linear that later tokens run through with the experts the prompt chose: `path` "packed" or "triton"
    reads them packed (packing any W ⊙ M in `chosen`, which may then go), "masked" multiplies W ⊙ M itself. One
    prompt's experts serve every sequence of the batch in all."""
    if path in PACKED_PATHS:
        return packed_experts(pack_experts(chosen, path), path)

    def gate_masked(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        experts = [W.to(x.device) for W in chosen[layer]]  # (an offloaded block's come along)
        return gate(layer, x, experts * x.shape[0] if len(experts) == 1 else experts)

    return gate_masked


def experts_bytes(chosen: dict) -> int:
    """The bytes a routed prompt's experts hold (`route_prompt`'s `chosen`): each W ⊙ M's, or its packed form's.
    (The dense model's `chosen` is W itself, no copy: it holds nothing more than the model.)"""
    return sum(e.numel() * e.element_size() if torch.is_tensor(e) else e.nbytes
               for experts in chosen.values() for e in experts)


@torch.no_grad()
def mumoe_logits(model, prompts: torch.Tensor, moe: MuMoE, chosen: dict | None = None,
                 counter: Counter | None = None) -> torch.Tensor:
    """Token ids (B, T) -> logits (B, T, vocab), each of the B prompts routed on itself, block by block.
    `prompts` may also be embedded already (B, T, hidden): a LLaVA prompt with its image features."""
    run = routed_block(moe, chosen, counter)
    x = prompts if prompts.is_floating_point() else model.embed(prompts)
    for block in model.blocks:
        x = run(block, x)
    return model.head(x)


def linear_names(model) -> dict[nn.Linear, str]:
    """Each decoder Linear -> its checkpoint name, the keys of `count_macs` (e.g. to read a counter)."""
    return {layer: f"{model.blocks_key}.{i}.{name}"
            for i, block in enumerate(model.blocks) for name, layer in block.linears().items()}


# -----------------------------------------------------------------------------
# MACs: an analytical count

CONVENTIONS = ("ours", "paper")


@dataclass(frozen=True)
class MacCount:
    """Multiply-accumulates of one forward pass over one prompt, by checkpoint name."""
    linear: dict[str, int]   # weights used x tokens, for every Linear (decoder Linears, projections, lm_head)
    routing: dict[str, int]  # the router's cost per decoder Linear (block routing: its statistics pass too);
                             # empty at rho = 1 (the dense model)
    attention: int           # q k^T and softmax(.) v of all layers; reported beside `total`, not in it

    @property
    def total(self) -> int:
        return sum(self.linear.values()) + sum(self.routing.values())


def count_macs(model, tokens: int, moe: MuMoE, convention: str = "ours") -> MacCount:
    """MACs of a μ-MoE forward over `tokens` tokens of one prompt (DENSE: the dense model), counted from the
    model's own Linear shapes (a model built on the meta device will do: `models.empty_model(config)`).

    convention="ours" counts the multiply-accumulates with active (nonzero) weights, the work a sparse
    kernel would do (the gate here multiplies the dense W ⊙ M, zeros included): a decoder Linear
    (d_in -> d_out) uses d_out · (d_in - int(d_in · (1 - rho))) · T MACs -- the exact kept count, about
    rho·d·d'·T -- plus routing d_in·T (norms over the routed tokens: `prefix` of them, if given) +
    d_in·d_out (scores). routing="block" adds, per Linear but the block's last (fc2, down_proj), its dense
    product over the routed tokens (d_in·d_out·T_routed): the dense pass that gathers the block's statistics.
    The Linears are the block's own: OPT's six (q, k, v, out_proj, fc1, fc2), LLaMA's seven, whose MLP has
    three matrices (gate_proj and up_proj read the block's normed input, down_proj their product) and
    whose k and v are smaller than q under grouped-query attention (num_key_value_heads · head_dim outputs).
    Embeddings are lookups; project_in/out (OPT-350m) and lm_head are dense Linears. Attention products
    are causal: q k^T and the weighted sum over v each take n_heads·head_dim · T(T+1)/2 MACs per layer.

    convention="paper" is how the paper's OPT-13B table counts: every Linear, lm_head included,
    costs rho·d·d'·T, each decoder Linear adds d·d' for its scores when rho < 1, and attention
    products are left out. At rho = 1 the table is the dense model, without scores (with them it
    would be 1.656T, printed 1.66T); the rows with rho < 1 do include them (without, rho = 0.6 would
    give 986G, not 999G). This reading gives 1.644T, 1.327T, 999G, 670G, 341G: all within 0.3%.
    Selection is comparisons, not MACs, in both conventions.
    """
    if convention not in CONVENTIONS:
        raise UsageError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    rho, prefix, routing = moe.rho, moe.prefix, moe.routing
    T, paper = tokens, convention == "paper"
    routed = T if prefix is None else prefix
    shapes = {name: layer.weight.shape for name, layer in model.blocks[0].linears().items()}  # every block alike
    *_, final = shapes  # its product is not needed by block routing's statistics pass

    linear, router = {}, {}
    for i in range(len(model.blocks)):
        for name, (d_out, d_in) in shapes.items():
            key = f"{model.blocks_key}.{i}.{name}"
            kept = rho * d_in if paper else d_in - prune_count(d_in, rho)
            linear[key] = round(d_out * kept * T)
            if rho < 1.0:
                router[key] = d_out * d_in + (0 if paper else d_in * routed)
                if routing == "block" and not paper and name != final:
                    router[key] += d_out * d_in * routed
    outer_scale = rho if paper else 1.0  # the paper scales the Linears outside the blocks too
    for name, layer in model.named_modules():  # lm_head, and OPT-350m's project_in/out
        if isinstance(layer, nn.Linear) and not name.startswith(model.blocks_key + "."):
            d_out, d_in = layer.weight.shape
            linear[name] = round(outer_scale * d_in * d_out * T)
    c = model.config
    attention = 0 if paper else len(model.blocks) * 2 * c.num_attention_heads * c.head_dim * T * (T + 1) // 2
    return MacCount(linear, router, attention)


# -----------------------------------------------------------------------------
# Generation: route on the prompt, then decode greedily with the prompt's micro-experts


@torch.no_grad()
def route_prompt(model, prompts: torch.Tensor, cache: list[KVCache], moe: MuMoE = DENSE,
                 path: str = "masked") -> tuple[torch.Tensor, dict]:
    """Run prompts, token ids (B, T) or embedded already (B, T, hidden), once, block by block, each routed on
    itself, filling the empty `cache`.

    Returns the hidden states leaving the last block (B, T, hidden) and `chosen`: per nn.Linear, each prompt's
    experts, with which later tokens run through the cache (`decode_experts(chosen, path)`), in the form the
    decode `path` reads: "masked", the gated weights W ⊙ M_b; "packed" (or "triton"), the experts packed as each
    Linear is routed (`route_expert`), so that the prompt's W ⊙ M is never held for every Linear at once, never a
    second copy of the model (the dense model, rho = 1, keeps W itself). The packed experts' values lie in one
    block of memory for all Linears (packed_experts.arena_for): the last prompt's again once nothing holds it.
    """
    chosen, arena = {}, None
    if path == "packed" and not moe.dense:
        linears = [layer for block in model.blocks for layer in block.linears().values()]
        arena = arena_for(len(prompts) * sum(values_room(layer.weight, moe.rho, moe.nm) for layer in linears))
    run = routed_block(moe, chosen=chosen, path=path, arena=arena)
    x = prompts if prompts.is_floating_point() else model.embed(prompts)
    for block, block_cache in zip(model.blocks, cache):
        x = run(block, x, block_cache)
        home = next(block.parameters()).device  # the CPU, after its turn, for a model offloaded block by block
        for layer in block.linears().values():  # the experts wait where their block waits
            chosen[layer] = [W.to(home) if torch.is_tensor(W) else W for W in chosen[layer]]
    return x, chosen


@torch.no_grad()
def generate(model, prompt, max_new_tokens: int, moe: MuMoE = DENSE, eos_id=None, timings: dict | None = None,
             stop=None, decode: str = "auto", step: str = "auto") -> list[int]:
    """Greedy decoding with a KV cache: the new token ids, at most `max_new_tokens`, the last one an end of
    sequence if emitted (`eos_id`: one id, or several, as Llama 3's config.json lists them).

    The prompt runs once, block by block, routed on itself with `moe`'s settings (DENSE: the dense model). With block
    routing each block's dense statistics pass runs first, then its gated pass, which fills the block's cache.
    The gated pass leaves every Linear's experts in `chosen`, and each new token runs through the cache with
    exactly those, the masks never rebuilt. `decode` (see `decode_path`): "packed" routes, selects and packs each
    Linear's experts in one pass as the prompt reaches it (route_prompt; on CUDA, "triton" packs each Linear's
    W ⊙ M as soon as it is routed), and a step reads only the kept weights; "masked" builds and keeps the dense
    W ⊙ M, a second copy of the decoder Linears, a step costing what a dense step costs; "auto" packs where a
    packed kernel runs. All give the same tokens. The products a step keeps dense (lm_head, and every Linear of the
    dense model) run through packed_experts.decode_linear: W read once by its compiled kernel, F.linear where that
    cannot run.
    The new tokens do not change the routing, as if the decode were routed on the prompt alone at every step
    (`moe.prefix`: on its first `prefix` tokens only).
    `timings`: a dict that receives the seconds spent up to the first new token ("prompt": routing, selection,
    packing where the decode is packed, the prompt pass, the first token), after it on readying the experts for the
    decode ("pack": what packing is left) and on the other tokens ("decode"), and the bytes the prompt's experts
    hold while the tokens decode ("experts_bytes", `experts_bytes`; 0 for the dense model), and which step ran
    ("step": "fused", or "eager (why)").
    `prompt`: token ids (a list), or a prompt embedded already (1, T, hidden): a LLaVA prompt with its image
    features, routed like any other. `stop`: a function of the new ids so far that returns True to end decoding there (e.g. at a stop string).
    """
    embedded = torch.is_tensor(prompt) and prompt.is_floating_point()
    if embedded and (prompt.ndim != 3 or prompt.shape[0] != 1):
        raise ValueError(f"an embedded prompt is one sequence (1, T, hidden), got {tuple(prompt.shape)}")
    T, T_max = (prompt.shape[1] if embedded else len(prompt)), model.config.max_position_embeddings
    if T < 1:
        raise UsageError("the prompt is empty")
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if T + max_new_tokens > T_max:
        raise UsageError(f"{T} prompt tokens + {max_new_tokens} new tokens exceed max_position_embeddings={T_max}")
    device = next(model.parameters()).device
    path = decode_path(decode, device, next(model.parameters()).dtype)  # checked for the dense model too
    path = "dense" if moe.dense else path
    eager_why = decode_step.chosen_step(step, model, path)  # None: the fused step
    start = time.perf_counter()
    cache = model.new_cache(T + max_new_tokens - 1)  # the last new token is never fed back
    prompts = prompt if embedded else torch.tensor([prompt], device=device)  # (1, T[, hidden])
    packs = path in PACKED_PATHS and max_new_tokens > 1  # only if a token will use them
    x, chosen = route_prompt(model, prompts, cache, moe, path if packs else "masked")
    held = 0 if path == "dense" else experts_bytes(chosen)
    logits = model.head(x[:, -1:], decode_linear)  # (1, 1, vocab): only the last position picks the next token
    next_id = logits[:, -1].argmax(dim=-1, keepdim=True)  # (1, 1)
    new = [next_id.item()]
    prompt_done = time.perf_counter()
    eos = set(eos_id) if isinstance(eos_id, (list, tuple, set)) else {eos_id}
    done = new[-1] in eos or len(new) >= max_new_tokens or (stop and stop(new))
    if not done and eager_why is None:  # each block one call into C, with W (dense) or the prompt's packed experts
        fused = decode_step.FusedStep(model, cache, {layer: kept[0] for layer, kept in chosen.items()})
    elif not done:
        experts = decode_linear if path == "dense" else decode_experts(chosen, path)  # chosen by the pass above
    del chosen
    pack_done = time.perf_counter()
    while not done:  # one token at a time, at position cache length: (1, 1, vocab)
        logits = fused(next_id) if eager_why is None else model(next_id, experts, cache, decode_linear)
        next_id = logits[:, -1].argmax(dim=-1, keepdim=True)
        new.append(next_id.item())
        done = new[-1] in eos or len(new) >= max_new_tokens or (stop and stop(new))
    if timings is not None:
        timings.update(prompt=prompt_done - start, pack=pack_done - prompt_done, decode=time.perf_counter() - pack_done,
                       experts_bytes=held, step="fused" if eager_why is None else f"eager ({eager_why})")
    return new
