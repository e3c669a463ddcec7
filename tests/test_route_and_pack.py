"""Tests for packed_experts.route_and_pack: μ-MoE's scores, exact selection and packing in one compiled pass.

Reference: today's path, pack(pruners.wanda_gated_weight(W, ||X||², rho, "sort", nm), bias): Wanda's own stable-sort
selection (ties to the lower index), W ⊙ M, then the packing. The fused pass must give the same bytes (bits, values,
starts), so the same masks and the same products, bit for bit: it moves values and compares scores computed with
the same single float32 product. On both instruction sets (the AVX2 path built with -mno-avx512f where the CPU has
AVX-512) and on 1 and 2 threads. Where the kernel cannot be built the tests skip and say why.
"""

import pytest
import torch

import packed_experts
import pruners
from packed_experts import pack, packed_linear, route_and_gate, route_and_pack, unpack

PROBLEM = packed_experts.kernel_problem()
needs_kernel = pytest.mark.skipif(PROBLEM is not None, reason=f"the packed kernel cannot run here: {PROBLEM}")
AVX512 = "avx512f" in packed_experts.cpu_flags().split()
BUILDS = [(), ("-mno-avx512f",)] if AVX512 else [()]


def weights_and_norms(d_out: int, d_in: int, kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W and a prompt's ||X_j||², with the cases a selection can get wrong:
    "random"  distinct scores, one dead input (||X_j|| = 0: its column scores 0 in every row) and one W_ij = 0
    "tied"    every score of a row equal: the kept columns are the highest-index ones (ties pruned lowest first)
    "coarse"  W on a grid of 1/4: many exact ties at the k-th score, as 4-bit checkpoints have (SmolLM2's)
    "dead"    most inputs dead: more zero scores than the rows prune, so kept weights are dead-input ones
    "adjacent" three adjacent floats, each many times: scores that differ in their last bits only, so the radix
              select's last digit decides, with ties at the k-th
    "shifting" rows whose scores change shape and scale, in runs of three: normal, cubed (heavy tails), all about
              one size, and 80% zeros (the k-th is 0). The selection guesses a row's k-th score from the rows
              before it: here the guess holds, misses on either side, or misses both"""
    gen = torch.Generator().manual_seed(seed)
    W, sqnorms = torch.randn(d_out, d_in, generator=gen), torch.rand(d_in, generator=gen) + 0.1
    if kind == "tied":
        W, sqnorms = W.sign() * 0.5, torch.ones(d_in)
    if kind == "coarse":
        W = (W * 4).round() / 4  # zeros too: a kept W_ij = 0 is left out of the packed form, as pack leaves it
    if kind == "dead":
        sqnorms[: d_in * 3 // 4] = 0
    if kind == "adjacent":
        W, sqnorms = 1 + torch.randint(0, 3, (d_out, d_in), generator=gen) * 2.0 ** -23, torch.ones(d_in)
    if kind == "shifting":
        shape = (torch.arange(d_out) // 3 % 4)[:, None]
        sparse = W * (torch.rand(d_out, d_in, generator=gen) < 0.2)
        alike = W.sign() + W / 64  # all about one size
        W = torch.where(shape == 0, W, torch.where(shape == 1, W**3, torch.where(shape == 2, alike, sparse)))
        W = W * 10 ** (4 * torch.rand(d_out, 1, generator=gen) - 2)
    if kind == "random":
        sqnorms[min(3, d_in - 1)] = 0
        W[0, d_in // 2] = 0
    return W, sqnorms


def assert_same_packed(got, expected, what: str) -> None:
    for field in ("bits", "values", "starts"):
        a, b = getattr(got, field), getattr(expected, field)
        if not torch.equal(a, b):
            n = min(a.numel(), b.numel())
            first = (a.flatten()[:n] != b.flatten()[:n]).nonzero()[:1].flatten().tolist()
            raise AssertionError(f"{what}: {field} differ (shapes {tuple(a.shape)} vs {tuple(b.shape)}, first "
                                 f"difference at flat index {first}): the masks or the packing differ")
    assert (got.d_out, got.d_in) == (expected.d_out, expected.d_in), what
    assert (got.bias is None) == (expected.bias is None), f"{what}: the bias was dropped or invented"


@needs_kernel
@pytest.mark.parametrize("build", BUILDS, ids=lambda flags: "avx2" if flags else "native")
@pytest.mark.parametrize("d_out, d_in, rho, nm", [
    (5, 37, 0.5, None),     # d_in not a multiple of a group (16) nor of AVX2's 8; d_out not of a block (4)
    (33, 300, 0.4, None),
    (9, 64, 1 / 64, None),  # k = 1 kept: one weight per row
    (10, 100, 0.01, None),  # k = 1 kept, d_in not a multiple of 16
    (8, 50, 1.0, None),     # k = d_in: every weight kept (nothing pruned)
    (3, 7, 0.6, None),      # fewer columns than one AVX2 half-group
    (40, 1000, 0.3, None),  # rows long enough for the radix select's later passes
    (48, 1536, 0.5, None),  # SmolLM2's down_proj rows: brackets of ~100 candidates, a narrower one within
    (7, 48, 0.5, (2, 4)),   # N:M
    (4, 24, 1.0, (3, 8)),   # N:M whose M does not divide a group of 16
])
@pytest.mark.parametrize("kind", ["random", "tied", "coarse", "dead", "adjacent", "shifting"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
def test_route_and_pack_equals_route_then_pack(build, d_out, d_in, rho, nm, kind, bias, threads, monkeypatch):
    monkeypatch.setattr(packed_experts, "compiled_kernel", lambda: packed_experts.build(build))
    W, sqnorms = weights_and_norms(d_out, d_in, kind, seed=d_out * d_in)
    b = torch.randn(d_out, generator=torch.Generator().manual_seed(1)) if bias else None
    W_gated = pruners.wanda_gated_weight(W, sqnorms, rho, "sort", nm)  # today's route -> W ⊙ M
    expected = pack(W_gated, b)
    out = torch.full_like(W, float("nan"))  # every entry must be written
    got = route_and_pack(W, sqnorms, rho, nm, b, out=out if bias else None)
    what = f"{build or 'native'}, {d_out}x{d_in}, rho {rho}, nm {nm}, {kind}"
    assert_same_packed(got, expected, what)
    if bias:  # W ⊙ M written in the same pass, for the prompt's own gated product
        assert torch.equal(out, W_gated), f"{what}: the W ⊙ M written beside the packing differs"
    assert torch.equal(unpack(got), W_gated), f"{what}: the fused experts unpack to another W ⊙ M"
    gated = route_and_gate(W, sqnorms, rho, nm, out=torch.full_like(W, float("nan")) if bias else None)
    assert torch.equal(gated, W_gated), f"{what}: route_and_gate's W ⊙ M differs from wanda_gated_weight's"
    x = torch.randn(3, d_in, generator=torch.Generator().manual_seed(2))
    assert torch.equal(packed_linear(x, got), packed_linear(x, expected)), f"{what}: products differ"


@needs_kernel
def test_route_and_pack_on_a_real_checkpoints_ties():
    """SmolLM2's weights are 4-bit (|W| takes at most 16 values in 32): one of its shapes, W quantized the same way,
    long rows (576 and 1536 columns) and a prompt's norms, 1 and 2 threads alike, every select giving this mask."""
    gen = torch.Generator().manual_seed(7)
    for d_out, d_in in [(192, 576), (64, 1536)]:
        scale = torch.rand(d_out, d_in // 32, 1, generator=gen)
        W = ((torch.randint(0, 16, (d_out, d_in // 32, 32), generator=gen) - 8) * scale).reshape(d_out, d_in)
        sqnorms = torch.rand(d_in, generator=gen) * 30
        for rho in (0.6, 0.5, 0.4):
            expected = pack(pruners.wanda_gated_weight(W, sqnorms, rho, "sort"))
            for threads in (1, 2):
                torch.set_num_threads(threads)
                assert_same_packed(route_and_pack(W, sqnorms, rho), expected, f"{d_out}x{d_in} rho {rho} {threads}t")


@needs_kernel
def test_route_and_pack_refuses_what_it_would_misread():
    W, sqnorms = torch.randn(8, 32), torch.rand(32)
    for args, error, what in [((W.double(), sqnorms, 0.5), ValueError, "float32"),
                              ((W, sqnorms[:16], 0.5), ValueError, "16 features"),
                              ((W, sqnorms.double(), 0.5), ValueError, "float32"),
                              ((W, sqnorms, 0.5, None, torch.zeros(7)), ValueError, "bias of 7"),
                              ((W, sqnorms, 1.5), pruners.UsageError, "rho"),
                              ((W, sqnorms, 0.5, (2, 5)), pruners.UsageError, "divisible")]:
        with pytest.raises(error, match=what):
            route_and_pack(*args)


# -----------------------------------------------------------------------------
# Where μ-MoE uses it: a prompt routed for a packed decode never builds W ⊙ M, and "auto" takes that path


def tiny_llama(tmp_path):
    import llama_model
    from kit.tiny_models import save_tiny_llama

    save_tiny_llama(tmp_path, "llama_gqa")
    return llama_model.load_model(tmp_path)


@needs_kernel
@pytest.mark.parametrize("routing", ["block", "linear"])
def test_a_packed_route_builds_no_masked_weights(tmp_path, routing, monkeypatch):
    """route_prompt for a packed decode: every Linear's experts come from route_and_pack (same masks as the masked
    route's, same bytes), the prompt's gated pass runs on them, and wanda_gated_weight (W ⊙ M) never runs."""
    import mumoe
    from mumoe import MuMoE, route_prompt

    model, ids = tiny_llama(tmp_path), torch.tensor([[5, 9, 23, 17, 40, 2, 77, 31, 8]])
    _, masked = route_prompt(model, ids, model.new_cache(9), MuMoE(0.5, routing=routing, select="sort"), "masked")
    monkeypatch.setattr(mumoe, "wanda_gated_weight", None)  # a call to either fails
    monkeypatch.setattr(mumoe, "route_and_gate", None)
    x_packed, packed = route_prompt(model, ids, model.new_cache(9), MuMoE(0.5, routing=routing), "packed")
    for layer, experts in masked.items():
        assert_same_packed(packed[layer][0], pack(experts[0], layer.bias), f"{routing}, {tuple(layer.weight.shape)}")
    assert x_packed.shape == (1, 9, model.config.hidden_size)


@needs_kernel
@pytest.mark.parametrize("routing", ["block", "linear"])
def test_the_masked_path_selects_with_the_compiled_router(tmp_path, routing, monkeypatch):
    """select None on the CPU: the masked path's W ⊙ M comes from route_and_gate, the same bytes as pruners' sort
    selection gives (select "sort", which keeps pruners' own kernel); the forward's hidden states alike."""
    import mumoe
    from mumoe import MuMoE, route_prompt

    model, ids = tiny_llama(tmp_path), torch.tensor([[5, 9, 23, 17, 40, 2, 77, 31, 8]])
    calls = []
    noted = mumoe.route_and_gate
    monkeypatch.setattr(mumoe, "route_and_gate", lambda *a, **k: calls.append(1) or noted(*a, **k))
    x_ref, reference = route_prompt(model, ids, model.new_cache(9), MuMoE(0.5, routing=routing, select="sort"))
    assert not calls, "a select the user named was not the one that ran"
    x, experts = route_prompt(model, ids, model.new_cache(9), MuMoE(0.5, routing=routing))
    assert len(calls) == len(reference), f"route_and_gate ran for {len(calls)} of {len(reference)} Linears"
    for layer in reference:
        assert torch.equal(experts[layer][0], reference[layer][0]), f"{tuple(layer.weight.shape)}: masks differ"
    assert torch.equal(x, x_ref)
    calls.clear()  # the forward without `chosen` (eval_ppl's) takes it too
    logits = mumoe.mumoe_logits(model, ids, MuMoE(0.5, routing=routing))
    assert len(calls) == len(reference), "the routed forward built W ⊙ M without route_and_gate"
    assert torch.equal(logits, mumoe.mumoe_logits(model, ids, MuMoE(0.5, routing=routing, select="sort")))


@needs_kernel
def test_auto_takes_the_packed_path_where_the_kernel_runs(tmp_path, monkeypatch):
    """decode="auto" where the kernel runs: the packed route and the packed steps run (a decode_path that answered
    "masked" for auto would give the same tokens and pass every other test), in generate and in lm_harness."""
    import mumoe
    from lm_harness import HarnessLM
    from mumoe import MuMoE, decode_path, generate

    assert decode_path("auto", "cpu", torch.float32) == "packed"
    model, calls = tiny_llama(tmp_path), []
    for name in ("route_and_pack", "packed_linear"):
        noted = getattr(mumoe, name)
        monkeypatch.setattr(mumoe, name, lambda *a, f=noted, name=name, **k: calls.append(name) or f(*a, **k))
    generate(model, [5, 9, 23, 17], 3, MuMoE(0.5), decode="auto", step="eager")  # the packed steps in Python
    assert {"route_and_pack", "packed_linear"} <= set(calls), f"auto generated without the packed path: {set(calls)}"
    calls.clear()

    class Tokenizer:  # HarnessLM reads what the tokenizer puts before any text; the requests here are token ids
        def encode(self, text):
            return []

    lm = HarnessLM(model, Tokenizer(), batch_size=1, moe=MuMoE(0.5), decode="auto")
    lm._loglikelihood_tokens([(None, [5, 9, 23, 17], [40, 2, 77])])
    assert lm.decode_path == "packed" and {"route_and_pack", "packed_linear"} <= set(calls), (
        f"lm_harness's auto decode: path {lm.decode_path}, calls {set(calls)}")


# -----------------------------------------------------------------------------
# One block of memory for a prompt's values, the last prompt's again once nothing holds it


@needs_kernel
def test_a_prompts_values_reuse_the_last_prompts_memory_only_once_it_is_free(tmp_path):
    """route_prompt packs every Linear's values into one block of memory (packed_experts.arena_for). The next prompt
    takes the same block when no expert of the last one is held, and a new one while one is (a PackedLinear, or
    only a view of its values): held experts keep their bytes, and experts in reused memory are their route's."""
    from mumoe import MuMoE, route_prompt

    model, moe = tiny_llama(tmp_path), MuMoE(0.5, routing="linear")
    a, b = torch.tensor([[5, 9, 23, 17, 40, 2, 77, 31, 8]]), torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5]])

    def route(ids) -> dict:
        _, chosen = route_prompt(model, ids, model.new_cache(9), moe, "packed")
        return {layer: experts[0] for layer, experts in chosen.items()}

    def blocks_of(experts: dict) -> set:
        return {packed.values.untyped_storage().data_ptr() for packed in experts.values()}

    first_a = route(a)
    assert len(blocks_of(first_a)) == 1, "a prompt's Linears took their values from more than one block of memory"
    kept = {layer: packed.values.clone() for layer, packed in first_a.items()}
    first_b = route(b)  # first_a is held: b must not write into its block
    assert blocks_of(first_b) != blocks_of(first_a), "a prompt's values went into memory whose experts are held"
    assert all(torch.equal(packed.values, kept[layer]) for layer, packed in first_a.items()), "held values changed"
    free_block = next(iter(first_b.values())).values._base  # the block itself (a reference: not a user of it)
    del first_b
    again_a = route(a)  # nothing holds b's block now
    assert all(packed.values._base is free_block for packed in again_a.values()), (
        "the last prompt's memory was free, and a new block was taken")
    for layer, packed in again_a.items():
        assert_same_packed(packed, first_a[layer], f"{tuple(layer.weight.shape)}, in reused memory")
    view, held_block = next(iter(again_a.values())).values[3:], blocks_of(again_a)
    del again_a, packed
    then_b = route(b)  # only a view of again_a's values is left, and it holds the block
    assert blocks_of(then_b) != held_block, "memory that a view of the last prompt's values holds was reused"
    assert view.untyped_storage().data_ptr() in held_block
    del then_b, view
    from packed_experts import arena_for

    first, meanwhile = arena_for(100), arena_for(100)  # a second prompt routed before the first took any values
    assert first.buffer.untyped_storage().data_ptr() != meanwhile.buffer.untyped_storage().data_ptr(), (
        "two prompts routed at once were handed the same memory")


# -----------------------------------------------------------------------------
# Fewer calls: the Linears that read one input run as one product


@needs_kernel
@pytest.mark.parametrize("biases", [(True, True, True), (False, False, False), (True, False, True)],
                         ids=["biases", "no bias", "some biases"])
def test_one_product_for_linears_of_one_input_equals_theirs(biases, threads):
    """q, k and v (GQA: k and v narrower) packed as one: its output is theirs side by side, bit for bit (each row's
    sum is the same arithmetic), and each part taken back out of the whole gives its own product again."""
    from packed_experts import concatenate, part

    gen = torch.Generator().manual_seed(11)
    d_in, widths = 72, (48, 16, 16)
    parts = []
    for width, bias in zip(widths, biases):
        W, sqnorms = torch.randn(width, d_in, generator=gen), torch.rand(d_in, generator=gen)
        parts.append(route_and_pack(W, sqnorms, 0.4, None, torch.randn(width, generator=gen) if bias else None))
    whole = concatenate(parts)
    x = torch.randn(2, 3, d_in, generator=gen)
    separate = [packed_linear(x, P) for P in parts]
    assert torch.equal(packed_linear(x, whole), torch.cat(separate, dim=-1)), "the fused product differs from q|k|v"
    start = 0
    for P, y in zip(parts, separate):
        back = part(whole, slice(start, start + P.d_out))
        assert torch.equal(packed_linear(x, back), y), f"rows {start}:{start + P.d_out} taken back differ"
        assert torch.equal(unpack(back), unpack(P)), f"rows {start}:{start + P.d_out} unpack to another W ⊙ M"
        start += P.d_out
    with pytest.raises(ValueError, match="whole blocks"):
        concatenate([route_and_pack(torch.randn(6, d_in), torch.rand(d_in), 0.5), parts[0]])
