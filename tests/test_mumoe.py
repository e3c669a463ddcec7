"""mumoe: the router, the gate, block and one-pass routing against models pruned by prune_model, the MAC count
against the paper's OPT-13B table, prefix routing, and generation (its command: test_generate.py)."""

import copy
import math
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
import mumoe
from mumoe import ROUTINGS, MuMoE, count_macs, generate, linear_names, micro_experts, mumoe_logits
from checkpoint import UsageError
from generate import si
from opt_model import OPTConfig, OPTForCausalLM, load_model
from pruners import SELECTS, prune_model, wanda_mask
from kit.checks import assert_close, n_diff
from kit.data import random_ids
from kit.tiny_models import TINY_LAYOUTS, save_tiny_opt


TINY = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                 max_position_embeddings=64, word_embed_proj_dim=32)
BATCH_ATOL = 1e-5  # one prompt alone vs. inside a batch: the same arithmetic, batched kernels
# PyTorch's default init leaves the N(0, 1) embeddings in charge, and greedy decoding of such a model
# repeats one token; Linears with std 2/sqrt(d_in) make every block matter.
LINEAR_GAIN = 2.0


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = OPTForCausalLM(TINY).requires_grad_(False).eval()
    for layer in linear_names(model):
        layer.weight.normal_(0, LINEAR_GAIN / layer.in_features ** 0.5)
    return model


def prompt_masks(model, ids, rho, **kw):
    """Every Linear's masks from one μ-MoE forward, by checkpoint name: name -> [M_b for each prompt].
    (Read from the gated weights W ⊙ M_b: the random normal weights here have no zeros of their own.)"""
    chosen = {}
    mumoe_logits(model, ids, MuMoE(rho, **kw), chosen=chosen)
    return {name: [W_b != 0 for W_b in chosen[layer]] for layer, name in linear_names(model).items()}


# -----------------------------------------------------------------------------
# The router and the gate


@pytest.mark.parametrize("select", SELECTS)
def test_routed_linear_matches_from_scratch_stable_sort(select):
    """One Linear against Wanda's rule written out: stable ascending sort of |W| * ||X_j||, prune k per row."""
    torch.manual_seed(2)
    B, T, d_in, d_out, rho = 2, 16, 48, 40, 0.3
    layer = nn.Linear(d_in, d_out).requires_grad_(False)
    layer.weight[:, 5] = layer.weight[:, 6]  # duplicate scores ...
    X = torch.randn(B, T, d_in)
    X[:, :, 10:14] = 0  # ... and zero input columns: ties that only the exact-k rule resolves
    k = int(d_in * (1 - rho))
    expected = []
    for X_b in X:
        S = layer.weight.abs() * (X_b ** 2).sum(dim=0).sqrt()  # (d_out, d_in)
        pruned = torch.sort(S, dim=1, stable=True).indices[:, :k]
        M = torch.ones_like(S, dtype=torch.bool).scatter_(1, pruned, False)
        expected.append(X_b @ (layer.weight * M).T + layer.bias)
    with torch.no_grad():
        Y = micro_experts(MuMoE(rho, select=select))(layer, X)
    assert_close(Y, torch.stack(expected), 1e-6, f"routed Linear ({select}) vs from-scratch stable sort")


REFERENCE_ATOL = 1e-6  # the gated product against reference_linear's: the same masks, the same F.linear per prompt


@pytest.mark.parametrize("rho", [0.9, 0.5, 0.3])
@pytest.mark.parametrize("select", SELECTS)
def test_micro_experts_masks_are_the_references(select, rho):
    """The fast path (input_sqnorms, the fused wanda_gated_weight, gate) against mumoe.reference_linear, the method
    in six lines: every mask identical, ties included (a duplicated weight column; zero input columns, among which
    the cut falls at rho 0.9)."""
    torch.manual_seed(4)
    B, T, d_in, d_out = 3, 12, 40, 24
    layer = nn.Linear(d_in, d_out).requires_grad_(False)
    layer.weight[:, 7] = layer.weight[:, 8]
    X = torch.randn(B, T, d_in)
    X[:, :, 16:26] = 0  # ten zero scores per row: at rho 0.9 the 4 pruned are four of them, the lowest indices
    chosen = {}
    with torch.no_grad():
        Y = micro_experts(MuMoE(rho, select=select), chosen=chosen)(layer, X)
    for b in range(B):
        Y_ref, M_ref = mumoe.reference_linear(layer.weight, layer.bias, X[b], rho)
        M = chosen[layer][b] != 0  # random normal weights have no zeros of their own
        assert n_diff(M, M_ref) == 0, f"prompt {b} ({select}, rho={rho}): {n_diff(M, M_ref)} experts differ"
        assert_close(Y[b], Y_ref, REFERENCE_ATOL, f"prompt {b} gated ({select}, rho={rho}) vs reference_linear")


ROUTING_ATOL = 1e-5  # block routing vs. a model pruned by prune_model: the same masks, products in another order


@pytest.mark.parametrize("rho", [0.5, 0.3])
@pytest.mark.parametrize("select", SELECTS)
def test_block_routing_is_wanda_calibrated_on_the_window(tiny_model, rho, select):
    """The reference's definition, written with our own parts: Wanda's driver with the window as its only
    calibration sample, then the pruned model's dense logits of that window."""
    window = random_ids(1, 40, TINY.vocab_size, low=3, seed=3)
    pruned = copy.deepcopy(tiny_model)
    prune_model(pruned, window, "wanda", rho, select=select, progress=False)
    routed = mumoe_logits(tiny_model, window, MuMoE(rho, routing="block", select=select))
    assert_close(routed, pruned(window), ROUTING_ATOL, f"block routing vs prune_model on the window, rho={rho}")
    one_pass = mumoe_logits(tiny_model, window, MuMoE(rho, routing="linear", select=select))
    assert (one_pass - pruned(window)).abs().max() > 100 * ROUTING_ATOL, "linear routing is another method"


def test_routings_share_only_the_first_inputs(tiny_model):
    """In block 0 q, k and v read the same LayerNorm output in both routings; out_proj, fc1 and fc2 read
    outputs of gated Linears in the one-pass routing and of dense ones in the block routing."""
    ids = random_ids(2, 24, TINY.vocab_size, low=3)
    block, linear = prompt_masks(tiny_model, ids, 0.5, routing="block"), prompt_masks(tiny_model, ids, 0.5, routing="linear")
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        key = f"decoder.layers.0.{name}"
        assert all(torch.equal(a, b) for a, b in zip(block[key], linear[key])), f"{key} should match"
    for name in ("self_attn.out_proj", "fc1", "fc2"):
        key = f"decoder.layers.0.{name}"
        assert not torch.equal(block[key][0], linear[key][0]), f"{key} should differ between the routings"


@pytest.mark.parametrize("routing", ROUTINGS)
def test_prompts_in_a_batch_are_routed_independently(tiny_model, routing):
    ids = random_ids(3, 24, TINY.vocab_size, low=3)
    batched = mumoe_logits(tiny_model, ids, MuMoE(0.5, routing=routing))
    for b in range(3):
        alone = mumoe_logits(tiny_model, ids[b:b + 1], MuMoE(0.5, routing=routing))[0]
        assert_close(batched[b], alone, BATCH_ATOL, f"prompt {b} batched vs alone ({routing})")
    masks = prompt_masks(tiny_model, ids, 0.5, routing=routing)
    assert any(not torch.equal(M[0], M[1]) for M in masks.values()), "the prompts should pick different experts"


@pytest.mark.parametrize("routing", ROUTINGS)
def test_rho_one_is_exactly_dense(tiny_model, routing):
    ids = random_ids(2, 20, TINY.vocab_size, low=3)
    assert torch.equal(mumoe_logits(tiny_model, ids, MuMoE(1.0, routing=routing)), tiny_model(ids))
    assert not torch.allclose(mumoe_logits(tiny_model, ids, MuMoE(0.9, routing=routing)), tiny_model(ids)), \
        "rho < 1 must change the logits"


@pytest.mark.parametrize("routing", ROUTINGS)
def test_weights_are_left_untouched(tiny_model, routing):
    before = {name: p.clone() for name, p in tiny_model.state_dict().items()}
    mumoe_logits(tiny_model, random_ids(2, 20, TINY.vocab_size, low=3), MuMoE(0.4, routing=routing))
    for name, p in tiny_model.state_dict().items():
        assert torch.equal(p, before[name]), f"{name} was modified by a μ-MoE forward ({routing})"


@pytest.mark.parametrize("rho", [0.3, 0.75])
@pytest.mark.parametrize("routing", ROUTINGS)
def test_every_select_gives_identical_logits(tiny_model, rho, routing):
    ids = random_ids(2, 32, TINY.vocab_size, low=3)
    reference = mumoe_logits(tiny_model, ids, MuMoE(rho, routing=routing, select="sort"))
    for select in SELECTS:
        assert torch.equal(mumoe_logits(tiny_model, ids, MuMoE(rho, routing=routing, select=select)), reference), \
            f"{select} differs from sort ({routing})"


def test_chosen_experts_refuse_another_batch_size(tiny_model):
    """Experts chosen for one prompt cannot silently serve a batch of two (zip would drop the second)."""
    chosen = {}
    mumoe_logits(tiny_model, random_ids(1, 8, TINY.vocab_size, low=3), MuMoE(0.5), chosen=chosen)
    with pytest.raises(ValueError, match="1 prompts' experts for a batch of 2 prompts"):
        tiny_model(random_ids(2, 8, TINY.vocab_size, low=3), mumoe.chosen_experts(chosen))


def test_unknown_routing_is_refused(tiny_model):
    with pytest.raises(UsageError, match="routing must be one of"):
        mumoe_logits(tiny_model, random_ids(1, 8, TINY.vocab_size, low=3), MuMoE(0.5, routing="dense"))


# One routed Linear in half precision vs float32 arithmetic on the same inputs and masks, as a fraction of the
# largest |output|. Measured on tiny_model (both routings, rho 0.3 and 0.5, 3 batches of prompts):
# float16 <= 4.6e-4, bfloat16 <= 3.8e-3.
HALF_LINEAR_RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@pytest.mark.cuda
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mumoe_in_half_precision(tiny_model, dtype, routing):
    """μ-MoE on a half-precision model, Linear by Linear against float32 arithmetic on what each Linear really got:
    its masks are those of float32 statistics of the input it routes on (its own, or the block's dense pass's),
    which summed in half precision would flip 2-24 of them here; its outputs agree within rounding. End to end
    the logits are not compared with the float32 model's: one rounding flips a near tie early and this tiny
    model amplifies it, to 5-50% of the largest logit."""
    model, ids = copy.deepcopy(tiny_model).to(dtype), random_ids(2, 24, TINY.vocab_size, low=3)
    for rho in (0.3, 0.5):
        # mumoe_logits written out, so that each Linear can be watched: routed_block's steps, block by block
        stats, chosen, seen, dense_inputs = {}, {}, [], {}
        experts = micro_experts(MuMoE(rho), stats=stats if routing == "block" else None, chosen=chosen)

        def noting_linear(layer, x):
            y = experts(layer, x)
            seen.append((layer, x, y))
            return y

        def noting_dense_input(layer, x):
            dense_inputs[layer] = x
            return layer(x)

        x = model.embed(ids)
        for block in model.decoder.layers:
            if routing == "block":
                block(x, noting_dense_input)
                stats.update(mumoe.block_statistics(block, x))
            x = block(x, noting_linear)
        logits = model.head(x)
        assert logits.dtype == dtype
        expected = mumoe_logits(model, ids, MuMoE(rho, routing=routing))
        assert torch.equal(logits, expected), "not what mumoe_logits computes"
        assert len(seen) == 6 * TINY.num_hidden_layers
        for layer, X, Y in seen:
            name, routed_on = linear_names(model)[layer], dense_inputs[layer] if routing == "block" else X
            W, bias = layer.weight.float(), layer.bias.float()
            for b, X_b in enumerate(X.float()):  # X_b (T, d_in): the half-precision input, exactly
                M = wanda_mask(W, routed_on[b].float().square().sum(dim=0), rho, "sort")
                diff = n_diff(chosen[layer][b] != 0, M)  # (random weights have no zeros of their own)
                assert diff == 0, f"{dtype} {name}, prompt {b}, rho={rho}: {diff} mask entries differ from float32's"
                expected = F.linear(X_b, W * M, bias)
                assert_close(Y[b], expected, HALF_LINEAR_RTOL[dtype] * expected.abs().max().item(),
                             f"{dtype} {name}, prompt {b}, rho={rho}: output vs float32 arithmetic")


# -----------------------------------------------------------------------------
# Active weights and MACs


@pytest.mark.parametrize("rho", [0.3, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("routing", ROUTINGS)
def test_active_weights_and_counter_match_count_macs(tiny_model, rho, routing):
    B, T = 2, 20
    counter = Counter()
    mumoe_logits(tiny_model, random_ids(B, T, TINY.vocab_size, low=3), MuMoE(rho, routing=routing), counter=counter)
    analytic = count_macs(models.empty_model(TINY), T, MuMoE(rho))
    for layer, name in linear_names(tiny_model).items():
        d_out, d_in = layer.weight.shape
        kept = d_in - math.floor(d_in * (1 - rho) + 1e-9)  # the promise: int(d_in * (1 - rho)) pruned per row
        assert counter[layer] == B * T * d_out * kept, f"{name}: nonzero weights used, rho={rho}"
        assert counter[layer] == B * analytic.linear[name], f"{name}: counter vs count_macs, rho={rho}"
    assert len(counter) == 6 * TINY.num_hidden_layers


def test_count_macs_ours():
    T, rho = 100, 0.5
    tiny = models.empty_model(TINY)
    dense, routed = count_macs(tiny, T, MuMoE(1.0)), count_macs(tiny, T, MuMoE(rho, routing="linear"))
    d, f, V = 32, 64, 128
    per_block_dense = (4 * d * d + 2 * d * f) * T
    assert dense.routing == {} and dense.total == 2 * per_block_dense + V * d * T
    # routing per Linear: d_in*T for the norms + d_out*d_in for the scores; lm_head stays dense
    per_block_routing = 4 * (d * T + d * d) + (d * T + f * d) + (f * T + d * f)
    assert routed.total == 2 * (per_block_dense // 2 + per_block_routing) + V * d * T
    # block routing adds the dense statistics pass: every Linear's product but fc2's
    statistics_pass = (4 * d * d + d * f) * T
    assert count_macs(tiny, T, MuMoE(rho)).total == routed.total + 2 * statistics_pass
    assert count_macs(tiny, T, MuMoE(1.0, routing="block")) == dense, "the dense model gathers no statistics"
    assert routed.attention == dense.attention == 2 * 2 * d * T * (T + 1) // 2  # causal q k^T and AV
    one_pass = count_macs(tiny, T, MuMoE(rho, routing="linear", prefix=10)).routing
    assert one_pass["decoder.layers.0.fc2"] == f * 10 + d * f
    block = count_macs(tiny, T, MuMoE(rho, prefix=10)).routing
    assert block["decoder.layers.0.fc1"] == d * 10 + f * d + f * d * 10
    opt350m = OPTConfig(hidden_size=1024, ffn_dim=4096, num_hidden_layers=24, num_attention_heads=16,
                        word_embed_proj_dim=512, do_layer_norm_before=False)
    assert count_macs(models.empty_model(opt350m), 1, MuMoE(1.0)).linear["decoder.project_in"] == 512 * 1024
    with pytest.raises(UsageError):
        count_macs(tiny, T, MuMoE(0.5), convention="flops")


OPT_13B = OPTConfig(hidden_size=5120, ffn_dim=20480, num_hidden_layers=40, num_attention_heads=40,
                    vocab_size=50272, word_embed_proj_dim=5120)
PAPER_TABLE = {1.0: 1.64e12, 0.8: 1.33e12, 0.6: 999e9, 0.4: 671e9, 0.2: 342e9}  # OPT-13B, T = 128
# count_macs's docstring: the paper's convention gives every row within 0.3% (the worst, rho = 1: 1.644T vs 1.64T,
# 0.22%); each other reading below misses some row by more, so the table itself decides each convention.
PAPER_RTOL = 0.003


@pytest.mark.parametrize("rho", sorted(PAPER_TABLE))
def test_paper_table_for_opt_13b(rho):
    total = count_macs(models.empty_model(OPT_13B), 128, MuMoE(rho), convention="paper").total
    assert abs(total / PAPER_TABLE[rho] - 1) <= PAPER_RTOL, \
        f"rho={rho}: {total:.4g} MACs vs the paper's {PAPER_TABLE[rho]:.4g}: off by {total / PAPER_TABLE[rho] - 1:+.2%}"


def test_paper_table_reading():
    """Each convention of the paper's count, by the row it changes: the other reading, computed here from the
    shapes, misses that row by more than PAPER_RTOL."""
    T, d, f, V, layers = 128, 5120, 20480, 50272, 40
    scores = layers * (4 * d * d + 2 * d * f)  # d_out * d_in of every decoder Linear
    paper = {rho: count_macs(models.empty_model(OPT_13B), T, MuMoE(rho), convention="paper") for rho in PAPER_TABLE}
    for rho, count in paper.items():
        routing = sum(count.routing.values())
        assert routing == (0 if rho == 1.0 else scores), f"rho={rho}: routing {routing}, the scores are {scores}"
    readings = {  # convention: (the row it changes, the other reading's total, as the table would print it)
        "the dense row counts no scores": (1.0, paper[1.0].total + scores, "1.66T"),
        "the rows with rho < 1 count the scores": (0.6, paper[0.6].total - scores, "986G"),
        "lm_head is scaled by rho too": (0.2, paper[0.2].total - paper[0.2].linear["lm_head"] + V * d * T, "368G"),
        "attention products are left out": (0.2, paper[0.2].total + layers * 2 * d * T * (T + 1) // 2, "345G"),
    }
    for convention, (rho, other, printed) in readings.items():
        assert si(other) == printed, f"{convention}: the other reading gives {si(other)}"
        assert abs(other / PAPER_TABLE[rho] - 1) > PAPER_RTOL, \
            f"{convention}: the other reading ({printed} at rho={rho}) is as close to the table"
    # Not decided by the table: the norms ||X_j||^2 (d_in * T per Linear, 0.07% at rho = 0.2) are left out as
    # ours counts them; rho * d_in and the exact kept count d_in - int(d_in * (1 - rho)) agree for OPT-13B.


# -----------------------------------------------------------------------------
# Prefix routing and generation


@pytest.mark.parametrize("routing", ROUTINGS)
def test_prefix_routing_ignores_later_tokens(tiny_model, routing):
    N, rho = 12, 0.5
    ids = random_ids(1, 30, TINY.vocab_size, low=3)
    changed = ids.clone()
    changed[:, N:] = random_ids(1, 30 - N, TINY.vocab_size, low=3, seed=7)
    prefix_a = prompt_masks(tiny_model, ids, rho, prefix=N, routing=routing)
    prefix_b = prompt_masks(tiny_model, changed, rho, prefix=N, routing=routing)
    assert all(torch.equal(prefix_a[name][0], prefix_b[name][0]) for name in prefix_a)
    full_a, full_b = prompt_masks(tiny_model, ids, rho, routing=routing), prompt_masks(tiny_model, changed, rho, routing=routing)
    assert any(not torch.equal(full_a[name][0], full_b[name][0]) for name in full_a), "without prefix they differ"
    # routing on the first N tokens of the sequence = routing on those N tokens alone (the model is causal)
    alone = prompt_masks(tiny_model, ids[:, :N], rho, routing=routing)
    assert all(torch.equal(prefix_a[name][0], alone[name][0]) for name in alone)


def test_prefix_longer_than_prompt_is_refused(tiny_model):
    with pytest.raises(UsageError, match="prefix 11 is longer than the 10 tokens"):
        mumoe_logits(tiny_model, random_ids(1, 10, TINY.vocab_size, low=3), MuMoE(0.5, prefix=11))
    with pytest.raises(UsageError, match="rho"):
        micro_experts(MuMoE(1.5))


# At OPT's init_std 0.02 the embeddings dominate a tiny model and greedy decoding of the pre-LN one repeats
# a single token at once, which a broken cache would reproduce too; at these stds the tokens keep changing.
GENERATION_INIT_STD = {"pre_ln": 0.25, "post_ln_350m": 0.1}


@pytest.fixture(scope="module", params=sorted(TINY_LAYOUTS))
def generating_checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"generating_{request.param}")
    reference = save_tiny_opt(directory, init_std=GENERATION_INIT_STD[request.param], **TINY_LAYOUTS[request.param])
    return directory, reference


def test_cached_greedy_generation_matches_transformers_and_recomputation(generating_checkpoint):
    """Dense greedy decoding with our KV cache = transformers' generate (its own cache) on the same weights =
    the whole sequence recomputed at every step, without any cache."""
    directory, reference = generating_checkpoint
    model = load_model(directory)
    prompt, steps = [2, 5, 17, 9, 33, 70, 41, 8], 24
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
        hf = reference.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                                eos_token_id=None, pad_token_id=1)
    recomputed, transformers_new = ids[0, len(prompt):].tolist(), hf[0, len(prompt):].tolist()
    cached = generate(model, prompt, steps)
    assert cached == transformers_new, f"ours with the cache {cached}\ntransformers' generate {transformers_new}"
    assert cached == recomputed, f"ours with the cache {cached}\nrecomputed without it {recomputed}"
    assert len(set(cached)) >= 6, f"a degenerate continuation cannot tell a broken cache: {cached}"


@pytest.mark.parametrize("routing", ROUTINGS)
def test_generation_keeps_the_prompts_experts(tiny_model, routing):
    """Decoding through the cache with the prompt's experts = recomputing the whole sequence at every step, each
    time routed on the prompt's tokens only (prefix): the same masks, applied to every new token."""
    prompt, rho, steps = random_ids(1, 9, TINY.vocab_size, low=3, seed=5)[0].tolist(), 0.5, 10
    new = generate(tiny_model, prompt, steps, MuMoE(rho, routing=routing))
    ids = torch.tensor([prompt])
    for _ in range(steps):
        next_id = mumoe_logits(tiny_model, ids, MuMoE(rho, routing=routing, prefix=len(prompt)))[:, -1].argmax(-1,
                                                                                                               keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    assert new == ids[0, len(prompt):].tolist()
    assert len(set(new)) >= 6, f"a degenerate continuation cannot tell a broken decode: {new}"
    assert new != generate(tiny_model, prompt, steps), "the dense model continues differently"


@pytest.mark.parametrize("rho", [1.0, 0.5])
def test_generation_stops_at_eos(tiny_model, rho):
    """With eos_id set to the token greedily emitted at step k (its first occurrence), decoding ends right there."""
    prompt = random_ids(1, 9, TINY.vocab_size, low=3, seed=5)[0].tolist()
    free = generate(tiny_model, prompt, 10, MuMoE(rho))
    k = next(k for k in range(2, 10) if free[k] not in free[:k])
    assert generate(tiny_model, prompt, 10, MuMoE(rho), eos_id=free[k]) == free[:k + 1]


def test_generation_bad_input(tiny_model):
    prompt = random_ids(1, 60, TINY.vocab_size, low=3)[0].tolist()
    with pytest.raises(UsageError, match="max_new_tokens must be at least 1, got 0"):
        generate(tiny_model, prompt, 0)
    with pytest.raises(UsageError, match="60 prompt tokens \\+ 5 new tokens exceed max_position_embeddings=64"):
        generate(tiny_model, prompt, 5, MuMoE(0.5))
    with pytest.raises(UsageError, match="the prompt is empty"):
        generate(tiny_model, [], 5)
    assert len(generate(tiny_model, prompt, 4, MuMoE(0.5))) == 4, "60 + 4 tokens fit the 64 positions exactly"
