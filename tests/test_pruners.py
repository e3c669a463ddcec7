"""pruners: exact counts, four selection kernels with one mask, magnitude, Wanda and SparseGPT against the
published algorithms (SparseGPT's `fasterprune` transcribed in kit.references), N:M, and the sequential driver on a tiny
OPT against statistics hooked on transformers' model."""

import copy
import math

import pytest
import torch

import pruners
from checkpoint import UsageError
from opt_model import load_model
from pruners import magnitude_mask, prune_lowest, prune_model, sparsegpt_prune, wanda_mask, wanda_score
from kit.checks import OFFLOAD_DEVICES, assert_each_visits, n_diff, record_moves
from kit.references import hooked_statistics, reference_fasterprune
from kit.tiny_models import save_tiny_opt


RHOS = (0.1, 0.25, 0.4, 0.5, 0.75, 1.0)


def correlated_inputs(d_in, tokens, seed=0):
    """X (tokens, d_in) = Z A: inputs mixed by a random matrix, with a few large-magnitude columns."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(tokens, d_in, generator=g)
    A = torch.eye(d_in) + 0.5 * torch.randn(d_in, d_in, generator=g) / d_in ** 0.5
    X = Z @ A
    X[:, :4] *= 10  # outlier features, as LLM activations have
    return X


def pruned_count(keep):
    return int((~keep).sum())


# -----------------------------------------------------------------------------
# Exact counts


@pytest.mark.parametrize("rho", RHOS)
def test_magnitude_counts(rho):
    W = torch.randn(48, 80, generator=torch.Generator().manual_seed(1))
    keep = magnitude_mask(W, rho)
    assert pruned_count(keep) == int(W.numel() * (1 - rho)), f"matrix: {pruned_count(keep)} pruned at rho={rho}"
    assert (W.abs()[~keep].max() if (~keep).any() else -1) <= W.abs()[keep].min(), "pruned a larger |W|"
    rows = (~magnitude_mask(W, rho, group="row")).sum(dim=1)
    assert (rows == int(80 * (1 - rho))).all(), f"row: pruned per row {rows.tolist()} at rho={rho}"


@pytest.mark.parametrize("rho", RHOS)
def test_wanda_counts_per_row(rho):
    g = torch.Generator().manual_seed(2)
    W, x_sqnorm = torch.randn(40, 96, generator=g), torch.rand(96, generator=g)
    for select in pruners.SELECTS:
        rows = (~wanda_mask(W, x_sqnorm, rho, select)).sum(dim=1)
        assert (rows == int(96 * (1 - rho))).all(), f"{select}: pruned per row {rows.tolist()} at rho={rho}"


@pytest.mark.parametrize("rho", RHOS)
def test_sparsegpt_counts_per_block(rho):
    g = torch.Generator().manual_seed(3)
    W, X = torch.randn(24, 200, generator=g), correlated_inputs(200, 400)
    W_pruned, keep = sparsegpt_prune(W, 2 * X.T @ X, rho, blocksize=64)  # blocks of 64, 64, 64, 8 columns
    for i1 in range(0, 200, 64):
        block = keep[:, i1:i1 + 64]
        assert pruned_count(block) == int(block.numel() * (1 - rho)), \
            f"block at column {i1}: {pruned_count(block)} pruned of {block.numel()} at rho={rho}"
    assert (W_pruned[~keep] == 0).all(), "a pruned weight is not zero"


def test_prune_count_uses_the_decimal_sparsity():
    # 1 - 0.8 = 0.19999999999999996 in binary: without rounding, 2560 (OPT-2.7B's hidden) gives 511, not 512
    assert pruners.prune_count(2560, 0.8) == 512
    assert (~magnitude_mask(torch.randn(1, 2560), 0.8, group="row")).sum() == 512


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_groups_have_exactly_n_zeros(nm):
    N, M = nm
    g = torch.Generator().manual_seed(4)
    W, X = torch.randint(-3, 4, (16, 64), generator=g).float(), correlated_inputs(64, 256)
    x_sqnorm = (X ** 2).sum(dim=0)
    W_sg, keep_sg = sparsegpt_prune(W, X.T @ X, 0.5, nm=nm)
    masks = {"magnitude": magnitude_mask(W, 0.5, nm=nm), "wanda": wanda_mask(W, x_sqnorm, 0.5, nm=nm),
             "sparsegpt": keep_sg}
    for method, keep in masks.items():
        per_group = (~keep).reshape(16, 64 // M, M).sum(dim=-1)
        assert (per_group == N).all(), f"{method} {N}:{M}: zeros per group {per_group.unique().tolist()}"
    assert (W_sg[~keep_sg] == 0).all(), "sparsegpt N:M: a pruned weight is not zero"
    # integer weights tie inside groups: the lowest-index ties go first, as a stable sort
    order = torch.sort(W.abs().reshape(16, -1, M), dim=-1, stable=True).indices[..., :N]
    expected = ~torch.zeros(16, 64 // M, M, dtype=torch.bool).scatter_(-1, order, True).reshape(16, 64)
    diff = n_diff(masks["magnitude"], expected)
    assert diff == 0, f"magnitude {N}:{M}: {diff} weights differ from a stable sort of each group (ties)"


# -----------------------------------------------------------------------------
# Selection: four kernels, one mask


@pytest.mark.parametrize("rho", (0.25, 0.5, 0.6))
def test_selects_identical_with_ties_and_zero_columns(rho):
    g = torch.Generator().manual_seed(5)
    W = torch.randint(-4, 5, (64, 128), generator=g).float()  # integer weights: many equal |W|
    x_sqnorm = torch.randint(0, 4, (128,), generator=g).float() ** 2
    x_sqnorm[::7] = 0  # dead inputs (a ReLU that never fired): whole columns score 0
    S, k = wanda_score(W, x_sqnorm), int(128 * (1 - rho))
    reference = ~torch.zeros_like(W, dtype=torch.bool).scatter_(
        1, torch.sort(S, dim=-1, stable=True)[1][:, :k], True)  # Wanda's own line
    naive = (S <= torch.kthvalue(S, k, dim=1).values[:, None]).sum(dim=1)
    assert (naive > k).any(), "test data has no ties at the threshold: it would not catch a `<=` selection"
    for select in pruners.SELECTS:
        diff = n_diff(wanda_mask(W, x_sqnorm, rho, select), reference)
        assert diff == 0, f"{select} differs from the stable sort in {diff} weights at rho={rho}"
        # a batch of score matrices (one per prompt, as a router has) is a stack of independent rows
        batched = prune_lowest(torch.stack([S, S.flip(0)]), k, select)
        diff = n_diff(batched, torch.stack([prune_lowest(S, k, select), prune_lowest(S.flip(0), k, select)]))
        assert diff == 0, f"{select}: batched selection differs from one matrix at a time in {diff} weights"


def test_selects_identical_when_only_some_rows_tie():
    """Float scores rarely tie: the tie step must redo the rows with ties at the threshold and only those."""
    S, k = torch.rand(32, 64, generator=torch.Generator().manual_seed(15)), 20
    for row in (3, 17):  # a second copy of the row's k-th smallest score, at the first index holding a larger one
        kth = S[row].sort().values[k - 1]
        S[row, (S[row] > kth).nonzero()[0, 0]] = kth
    reference = torch.zeros_like(S, dtype=torch.bool).scatter_(1, torch.sort(S, dim=1, stable=True)[1][:, :k], True)
    assert (S <= torch.kthvalue(S, k, dim=1).values[:, None]).sum(dim=1).gt(k).sum() == 2, "two tied rows"
    for select in pruners.SELECTS:
        diff = n_diff(prune_lowest(S, k, select), reference)
        assert diff == 0, f"{select} differs from the stable sort in {diff} scores"


def test_partition_on_several_threads_gives_the_sorts_mask(monkeypatch):
    """The CPU default: np.partition over row chunks, one per torch thread, in pruners' pool (one_thread sets 1
    for the other tests). On 3 threads the chunks must come back in row order, ties resolved as the stable sort."""
    from concurrent.futures import ThreadPoolExecutor

    chunks, pool = [], ThreadPoolExecutor(3)

    def map_noting_chunks(fn, parts):
        chunks.append(len(parts))
        return ThreadPoolExecutor.map(pool, fn, parts)

    pool.map = map_noting_chunks
    monkeypatch.setattr(pruners, "cpu_threads", lambda: pool)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    g = torch.Generator().manual_seed(16)
    S = torch.randint(0, 5, (2, 31, 96), generator=g).float()  # a batch of 62 rows: uneven chunks, many ties
    S[..., ::9] = 0  # dead input columns
    for k in (1, 40, 95):
        diff = n_diff(prune_lowest(S, k, "partition"), prune_lowest(S, k, "sort"))
        assert diff == 0, f"partition on 3 threads differs from the stable sort in {diff} scores (k={k})"
    pool.shutdown()
    assert chunks == [3, 3, 3], f"rows split into {chunks} chunks: the threaded path did not run"


@pytest.mark.parametrize("rho", [0.1, 0.5, 0.8])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_gated_weight_is_w_times_the_stable_sort_mask(rho, threads, monkeypatch):
    """μ-MoE's fused CPU path (scores, partition, gate in L2-sized steps over several threads) against
    W ⊙ M with M from the stable sort, where ties decide: equal columns, dead inputs, a constant row, zeros."""
    gen = torch.Generator().manual_seed(16)
    W, x_sqnorm = torch.randn(37, 40, generator=gen), torch.rand(40, generator=gen) * 4
    W[:, 7] = W[:, 3]  # equal scores within every row
    x_sqnorm[20:26] = 0  # dead inputs: six zero scores per row
    W[5] = 0.5  # a row where scores tie by the input norms only
    W[9, ::2] = 0  # a row of half zeros
    x_sqnorm[30:] = 2.0  # ten equal input norms, and rows whose equal scores straddle the threshold:
    W[12], W[12, 30:] = 0.01, 0.5  # at rho = 0.1 (keep 4 of the 10 largest, all equal)
    W[13, 30:] = W[13, :30].abs().sort().values[17]  # at rho = 0.5 (the 20th smallest of 40 is among them)
    monkeypatch.setattr(pruners, "FUSED_CHUNK_ELEMENTS", 5 * 40)  # 8 steps of 5 rows (the last one 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    pruners.cpu_threads.cache_clear()
    try:
        fused = pruners.wanda_gated_weight(W, x_sqnorm, rho)
    finally:
        pruners.cpu_threads.cache_clear()
    reference = W * wanda_mask(W, x_sqnorm, rho, "sort")
    assert torch.equal(fused, reference), f"{n_diff(fused, reference)} weights differ, rho={rho}, {threads} threads"


def test_magnitude_matrix_ties_follow_the_flattened_stable_order():
    W = torch.randint(-3, 4, (16, 24), generator=torch.Generator().manual_seed(14)).float()
    k = int(W.numel() * 0.5)
    order = torch.sort(W.abs().flatten(), stable=True).indices[:k]
    expected = ~torch.zeros(W.numel(), dtype=torch.bool).scatter_(0, order, True).reshape(W.shape)
    diff = n_diff(magnitude_mask(W, 0.5), expected)
    assert diff == 0, f"{diff} weights differ from a stable sort of the flattened |W| (ties to the lower index)"


def test_wanda_with_equal_norms_is_row_magnitude():
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(6))
    x_sqnorm = torch.full((64,), 4.0)  # sqrt = 2: scaling by a power of two keeps every order and tie
    for rho in (0.3, 0.5):
        diff = n_diff(wanda_mask(W, x_sqnorm, rho), magnitude_mask(W, rho, group="row"))
        assert diff == 0, f"rho={rho}: {diff} weights differ between Wanda (equal norms) and row magnitude"


def test_inputs_are_not_modified():
    g = torch.Generator().manual_seed(7)
    W, X = torch.randn(8, 32, generator=g), correlated_inputs(32, 64)
    H, x_sqnorm = X.T @ X, (X ** 2).sum(dim=0)
    copies = W.clone(), H.clone(), x_sqnorm.clone()
    magnitude_mask(W, 0.5), wanda_mask(W, x_sqnorm, 0.5)
    sparsegpt_prune(W, H, 0.5), sparsegpt_prune(W, H, 0.5, nm=(2, 4))
    for name, before, after in zip(("W", "H", "x_sqnorm"), copies, (W, H, x_sqnorm)):
        assert n_diff(before, after) == 0, f"{name} was modified in place"


# -----------------------------------------------------------------------------
# SparseGPT


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_matches_reference_transcription(nm):
    g = torch.Generator().manual_seed(8)
    W, X = torch.randn(32, 96, generator=g), correlated_inputs(96, 300)
    X[:, 5] = 0  # a dead input: H_55 = 0
    H = 2 * X.T @ X / 300
    expected = reference_fasterprune(W, H, 0.5, *(nm or (0, 0)), blocksize=32)
    W_pruned, keep = sparsegpt_prune(W, H, 0.5, blocksize=32, nm=nm)
    maxdiff = (W_pruned - expected).abs().max().item()
    diff = n_diff(keep, expected != 0)
    assert diff == 0, f"{diff} mask entries differ from the reference's zeros ({nm=})"
    # the same float32 operations in the same order: bit-identical, not merely close
    assert maxdiff == 0, f"max |W_ours - W_reference| = {maxdiff:.3g} ({nm=})"
    assert (W_pruned[:, 5] == 0).all(), "the dead input's weights were not zeroed"


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_magnitude_prunes_the_references_set_less_its_threshold_weight(sparsity):
    """The deliberate difference, against the references' own magnitude rule (Wanda's prune_magnitude,
    SparseGPT's per-block mask): `thresh = sort(|W|)[int(numel * sparsity)]; prune |W| <= thresh` prunes k + 1
    weights of tie-free W; ours prunes the same set less the weight at the threshold."""
    W = torch.randn(16, 24, generator=torch.Generator().manual_seed(9))
    thresh = torch.sort(W.abs().flatten())[0][int(W.numel() * sparsity)]
    reference = W.abs() <= thresh
    ours = ~magnitude_mask(W, 1 - sparsity)
    assert n_diff(ours & ~reference, False) == 0, "we prune a weight the reference keeps"
    assert (reference & ~ours).nonzero().tolist() == (W.abs() == thresh).nonzero().tolist(), \
        f"the reference prunes {n_diff(reference & ~ours, False)} weights we keep; expected its threshold weight only"


def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude():
    g = torch.Generator().manual_seed(10)
    W, X = torch.randn(64, 128, generator=g), correlated_inputs(128, 2048)  # X (tokens, d_in)
    H, x_sqnorm = 2 * X.T @ X, (X ** 2).sum(dim=0)
    error = lambda W_hat: ((W - W_hat) @ X.T).pow(2).sum().item()
    errors = {"sparsegpt": error(sparsegpt_prune(W, H, 0.5)[0]),
              "wanda": error(W * wanda_mask(W, x_sqnorm, 0.5)),
              "magnitude": error(W * magnitude_mask(W, 0.5))}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], f"||(W - Ŵ) X||^2: {errors}"


def test_sparsegpt_rho_one_returns_w_unchanged():
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(11)).half()
    X = correlated_inputs(32, 64)
    W_pruned, keep = sparsegpt_prune(W, X.T @ X, 1.0)
    assert W_pruned.dtype == torch.float16, f"rho = 1 returned {W_pruned.dtype}, not W's float16"
    assert n_diff(W_pruned, W) == 0, f"rho = 1 changed {n_diff(W_pruned, W)} weights"
    assert keep.all(), "rho = 1 pruned something"


# -----------------------------------------------------------------------------
# Bad input


def test_bad_input_raises_clear_errors():
    W, H, x_sqnorm = torch.randn(8, 16), torch.eye(16), torch.ones(16)
    for rho in (0.0, -0.1, 1.5):
        with pytest.raises(UsageError, match="rho"):
            wanda_mask(W, x_sqnorm, rho)
        with pytest.raises(UsageError, match="rho"):
            magnitude_mask(W, rho)
        with pytest.raises(UsageError, match="rho"):
            sparsegpt_prune(W, H, rho)
    for nm in ((4, 4), (5, 4), (0, 4)):
        with pytest.raises(UsageError, match="N < M"):
            wanda_mask(W, x_sqnorm, 0.5, nm=nm)
    with pytest.raises(UsageError, match="divisible"):
        magnitude_mask(W, 0.5, nm=(2, 5))
    with pytest.raises(UsageError, match="x_sqnorm"):
        wanda_mask(W, torch.ones(8), 0.5)
    with pytest.raises(UsageError, match="H must"):
        sparsegpt_prune(W, torch.eye(8), 0.5)
    with pytest.raises(UsageError, match="percdamp"):
        sparsegpt_prune(W, -torch.eye(16), 0.5)  # negative definite: dampening cannot rescue it
    for bad in (math.inf, math.nan):  # what a float16 model's X^T X gives when its activations overflow
        H_bad = torch.eye(16)
        H_bad[3, 5] = bad
        with pytest.raises(UsageError, match="H has inf or NaN entries: the calibration activations overflowed"):
            sparsegpt_prune(W, H_bad, 0.5)
    with pytest.raises(UsageError, match="select"):
        wanda_mask(W, x_sqnorm, 0.5, select="heap")
    with pytest.raises(UsageError, match="blocksize"):
        sparsegpt_prune(W, H, 0.5, blocksize=6, nm=(2, 4))
    assert issubclass(UsageError, ValueError)


# -----------------------------------------------------------------------------
# The sequential driver on a tiny OPT


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory):
    """A three-block tiny OPT, its transformers twin (the oracle for hooked statistics) and 4 calibration windows."""
    directory = tmp_path_factory.mktemp("tiny-opt")
    hf = save_tiny_opt(directory, num_hidden_layers=3)
    calib_ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(12))
    return hf, directory, calib_ids


def kept_fraction(n_rows, n_cols, method, rho):
    if method == "wanda":
        return (n_cols - int(n_cols * (1 - rho))) / n_cols
    return (n_rows * n_cols - int(n_rows * n_cols * (1 - rho))) / (n_rows * n_cols)  # one matrix / one block


@pytest.mark.parametrize("method", pruners.METHODS)
def test_prune_model_kept_fractions_and_dense_rest(tiny_opt, method):
    _, directory, calib_ids = tiny_opt
    model = load_model(directory)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rho = 0.4
    report = prune_model(model, None if method == "magnitude" else calib_ids, method, rho, progress=False)
    assert len(report) == 3 * 6, f"report has {len(report)} entries, expected 18"
    state = model.state_dict()
    for name, W in state.items():
        key = name.removesuffix(".weight")
        if key in report:
            expected = kept_fraction(*W.shape, method, rho)
            assert report[key] == expected, f"{method} {key}: kept {report[key]}, promised {expected}"
            nonzero = (W != 0).sum().item() / W.numel()  # random weights hold no zeros of their own
            if method == "sparsegpt":  # its dead inputs' weights are zeroed too, kept or not
                assert nonzero <= expected, f"{method} {key}: {nonzero} nonzero, more than the {expected} kept"
            else:
                assert nonzero == expected, f"{method} {key}: {nonzero} nonzero, but {expected} kept"
        else:  # embeddings, positions, LayerNorms, biases, lm_head
            assert n_diff(W, before[name]) == 0, f"{method} changed {name}, which must stay dense"


def tokens_by_features(x):
    return x.reshape(-1, x.shape[-1])  # transformers' OPT feeds fc1/fc2 (T, d), the projections (1, T, d)


@pytest.mark.parametrize("method", ("wanda", "sparsegpt"))
def test_prune_model_equals_pruners_on_hooked_statistics(tiny_opt, method):
    hf, directory, calib_ids = tiny_opt
    hf = copy.deepcopy(hf)
    model = load_model(directory)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    prune_model(model, calib_ids, method, 0.5, progress=False)
    pruned = model.state_dict()
    for b in range(3):
        stats = hooked_statistics(hf, hf.model.decoder.layers[b], ["self_attn.q_proj", "self_attn.k_proj",
                                  "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"], calib_ids)
        for name, (x_sqnorm, H) in stats.items():
            key = f"decoder.layers.{b}.{name}.weight"
            if method == "wanda":
                expected = original[key] * wanda_mask(original[key], x_sqnorm, 0.5)
            else:
                expected = sparsegpt_prune(original[key], H, 0.5)[0]
            zeros_diff, maxdiff = n_diff(pruned[key] == 0, expected == 0), (pruned[key] - expected).abs().max().item()
            assert zeros_diff == 0 and maxdiff <= 1e-4, (f"{method} block {b} {name}: {zeros_diff} zeros differ, "
                                                         f"max |Δ| {maxdiff:.3g} from pruners on hooked statistics")
            # block b + 1 must see the outputs of the *pruned* block b: prune the oracle the same way
            hf.model.get_parameter(key).data.copy_(pruned[key])


def test_prune_model_bad_input(tiny_opt):
    _, directory, calib_ids = tiny_opt
    model = load_model(directory)
    with pytest.raises(UsageError, match="method"):
        prune_model(model, calib_ids, "obs", 0.5, progress=False)
    with pytest.raises(UsageError, match="calib_ids"):
        prune_model(model, calib_ids[0], "wanda", 0.5, progress=False)  # (seqlen,) instead of (N, seqlen)
    with pytest.raises(UsageError, match="calib_ids"):
        prune_model(model, None, "sparsegpt", 0.5, progress=False)
    with pytest.raises(UsageError, match="rho"):
        prune_model(model, calib_ids, "wanda", 0.0, progress=False)


@pytest.mark.parametrize("method", ("wanda", "sparsegpt"))
def test_prune_model_on_embedded_prompts_equals_token_windows(tiny_opt, method):
    """A vision-language model calibrates on prompts it embeds itself: the same windows handed over embedded
    (and of unequal lengths: a shorter copy of one more) must prune exactly as from their token ids."""
    _, directory, calib_ids = tiny_opt
    from_ids, from_embeds = load_model(directory), load_model(directory)
    prune_model(from_ids, calib_ids, method, 0.5, progress=False)
    prune_model(from_embeds, [from_embeds.embed(ids[None]) for ids in calib_ids], method, 0.5, progress=False)
    for (name, a), b in zip(from_ids.state_dict().items(), from_embeds.state_dict().values()):
        assert torch.equal(a, b), f"{method}: {name} differs between token windows and embedded prompts"
    with pytest.raises(UsageError, match="calib_ids"):
        prune_model(from_embeds, [calib_ids[0]], method, 0.5, progress=False)  # token ids in a list: not embedded


def record_pruner_calls(monkeypatch) -> list[dict]:
    """What prune_model hands each pruner and gets back, call by call: W before, the statistic, the mask."""
    calls = []

    def recording(name):
        real = getattr(pruners, name)

        def pruner(W, *args, **kwargs):
            out = real(W, *args, **kwargs)
            W_pruned, keep = out if name == "sparsegpt_prune" else (None, out)
            calls.append(dict(W=W.clone(), stat=args[0] if name != "magnitude_mask" else None, keep=keep,
                              W_pruned=W_pruned))
            return out

        monkeypatch.setattr(pruners, name, pruner)

    for name in ("magnitude_mask", "wanda_mask", "sparsegpt_prune"):
        recording(name)
    return calls


def linear_inputs(block, hidden: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Each Linear's input (T, d_in) in every window of `hidden`, by name, from a dense pass of `block`: our own
    model's numbers (hooked_statistics hooks the oracle, whose half-precision activations round differently)."""
    inputs = {name: [] for name in block.linears()}
    name_of = {layer: name for name, layer in block.linears().items()}

    def noting_linear(layer, x):
        inputs[name_of[layer]].append(tokens_by_features(x))
        return layer(x)

    for h in hidden:
        block(h, noting_linear)
    return inputs


# Half-precision pruning vs float32 pruning: masks that differ in at most this fraction of a matrix (rounding
# reorders near ties). Measured on tiny_opt at rho = 0.5: float16 <= 0.2%, bfloat16 <= 0.4% (Wanda).
HALF_MASK_DIFF = 0.02
# float32 sums of the same products agree to rounding; summed in half precision they are off by 1e-4 (fp16), 1e-3 (bf16)
STATS_RTOL = 1e-6


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("method", pruners.METHODS)
def test_prune_model_in_half_precision(tiny_opt, monkeypatch, method, dtype):
    """A half-precision model stays so; each weight is zero exactly where its pruner's mask says and, kept, is W
    (magnitude, Wanda) or SparseGPT's update; the statistics are float32 sums of the half-precision inputs;
    the masks are nearly those of float32 pruning."""
    _, directory, calib_ids = tiny_opt
    model, in_float32 = load_model(directory, dtype=dtype), load_model(directory)
    calib = None if method == "magnitude" else calib_ids
    prune_model(in_float32, calib, method, 0.5, progress=False)
    calls = record_pruner_calls(monkeypatch)
    report = prune_model(model, calib, method, 0.5, progress=False)
    monkeypatch.undo()
    assert len(calls) == len(report) == 18, f"{len(calls)} pruner calls for {len(report)} Linears"
    for (key, kept), call in zip(report.items(), calls):
        W, keep = model.get_parameter(key + ".weight"), call["keep"]
        assert W.dtype == dtype, f"{method} {key}: weight became {W.dtype}"
        assert kept == kept_fraction(*W.shape, method, 0.5), f"{method} {key}: kept {kept}"
        assert n_diff(W[~keep], 0) == 0, f"{method} {key}: {n_diff(W[~keep], 0)} pruned weights are not zero"
        if method == "sparsegpt":
            assert n_diff(W, call["W_pruned"]) == 0, f"{key}: the weights are not SparseGPT's result"
        else:
            assert n_diff(W[keep], call["W"][keep]) == 0, f"{method} {key}: {n_diff(W[keep], call['W'][keep])} " \
                                                          "kept weights changed"
        if call["stat"] is not None:
            assert call["stat"].dtype == torch.float32, f"{method} {key}: statistics in {call['stat'].dtype}"
        in_fp32 = in_float32.get_parameter(key + ".weight") == 0
        diff = n_diff(W == 0, in_fp32)
        assert diff <= HALF_MASK_DIFF * W.numel(), f"{method} {key}: {diff} of {W.numel()} zeros differ from float32"
    if method != "magnitude":  # block 0's statistics from its inputs, which are the same half-precision numbers
        fresh = load_model(directory, dtype=dtype)
        inputs = linear_inputs(fresh.decoder.layers[0], [fresh.embed(ids[None]) for ids in calib_ids])
        for (name, Xs), call in zip(inputs.items(), calls):
            Xs = [X.float() for X in Xs]
            n = len(Xs)
            expected = sum(X.square().sum(0) for X in Xs) / n if method == "wanda" else 2 / n * sum(X.T @ X for X in Xs)
            rel = ((call["stat"] - expected).abs().max() / expected.abs().max()).item()
            assert rel <= STATS_RTOL, f"{method} {name}: statistics off by {rel:.2e} (relative) from float32 sums"


@pytest.mark.parametrize("method, options", [("magnitude", dict(nm=(2, 4))), ("wanda", dict(nm=(2, 4))),
                                            ("sparsegpt", dict(nm=(2, 4))), ("magnitude", dict(group="row"))],
                         ids=["magnitude-2:4", "wanda-2:4", "sparsegpt-2:4", "magnitude-row"])
def test_prune_model_passes_nm_and_group_on(tiny_opt, monkeypatch, method, options):
    """The driver's nm and group reach the pruners: 2 zeros in every group of 4 consecutive weights of a row,
    or the same count in every row; magnitude's masks are those of the original weights, Linear by Linear."""
    _, directory, calib_ids = tiny_opt
    model = load_model(directory)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    calls = record_pruner_calls(monkeypatch)
    rho = 0.4
    report = prune_model(model, None if method == "magnitude" else calib_ids, method, rho, progress=False, **options)
    assert len(calls) == len(report) == 18, f"{len(calls)} pruner calls for {len(report)} Linears"
    for (key, kept), call in zip(report.items(), calls):
        keep, W = call["keep"], model.get_parameter(key + ".weight")
        d_out, d_in = W.shape
        if "nm" in options:
            per_group = (~keep).reshape(d_out, d_in // 4, 4).sum(dim=-1)
            assert (per_group == 2).all(), f"{method} {key}: pruned per group of 4 {per_group.unique().tolist()}"
            assert kept == 0.5, f"{method} {key}: kept {kept} with 2:4"
        else:
            per_row = (~keep).sum(dim=1)
            assert (per_row == pruners.prune_count(d_in, rho)).all(), \
                f"{key}: pruned per row {per_row.unique().tolist()}"
        assert n_diff(W[~keep], 0) == 0, f"{method} {key}: a pruned weight is not zero"
        if method == "magnitude":
            expected = magnitude_mask(original[key + ".weight"], rho, **options)
            assert n_diff(keep, expected) == 0, f"{key}: {n_diff(keep, expected)} entries differ from magnitude_mask"


@pytest.mark.parametrize("device", OFFLOAD_DEVICES)
@pytest.mark.parametrize("method", ("wanda", "sparsegpt"))
def test_prune_model_with_a_device_visits_it_block_by_block(tiny_opt, monkeypatch, method, device):
    """prune_model(device=...) on a model kept in CPU memory: each block goes there for its turn and comes back,
    and the weights are those of a run without offload (bit for bit on the CPU: the same kernels)."""
    _, directory, calib_ids = tiny_opt
    at_home, offloaded = load_model(directory), load_model(directory)
    prune_model(at_home, calib_ids, method, 0.5, progress=False)
    moves = record_moves(monkeypatch)
    prune_model(offloaded, calib_ids, method, 0.5, device=device, progress=False)
    monkeypatch.undo()
    blocks = {f"block {b}": block for b, block in enumerate(offloaded.decoder.layers)}
    assert_each_visits(blocks, moves, device, f"{method} offloaded to {device}")
    for key, W in at_home.state_dict().items():
        W_offloaded = offloaded.state_dict()[key]
        assert W_offloaded.device.type == "cpu", f"{key} is on {W_offloaded.device}"
        if device == "cpu":
            assert n_diff(W, W_offloaded) == 0, f"{method}: {key} differs in {n_diff(W, W_offloaded)} weights"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: checks partition's fallback and offload")
def test_cuda_selects_and_offload_match_cpu(tiny_opt):
    g = torch.Generator().manual_seed(13)
    W, x_sqnorm = torch.randint(-4, 5, (64, 128), generator=g).float(), torch.rand(128, generator=g)
    x_sqnorm[::5] = 0
    expected = wanda_mask(W, x_sqnorm, 0.5, "sort")
    for select in pruners.SELECTS:
        diff = n_diff(wanda_mask(W.cuda(), x_sqnorm.cuda(), 0.5, select).cpu(), expected)
        assert diff == 0, f"{select} on CUDA differs from the CPU sort in {diff} weights"
    _, directory, calib_ids = tiny_opt
    on_cpu, offloaded = load_model(directory), load_model(directory)
    report_cpu = prune_model(on_cpu, calib_ids, "wanda", 0.5, progress=False)
    report_offloaded = prune_model(offloaded, calib_ids, "wanda", 0.5, device="cuda", progress=False)
    assert next(offloaded.parameters()).device.type == "cpu", "offload left the model off the CPU"
    assert report_offloaded == report_cpu, "offloaded pruning kept other fractions"
    for key, W in on_cpu.state_dict().items():
        # CUDA and CPU kernels round differently, which may swap a near-tie pair now and then
        diff = n_diff(W == 0, offloaded.state_dict()[key] == 0)
        assert diff <= 0.01 * W.numel(), f"{key}: offloaded pruning differs from CPU pruning in {diff} zeros"


