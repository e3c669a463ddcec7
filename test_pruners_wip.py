"""Tests for pruners.py: exact counts, identical selections, reference parity and the sequential driver.

The SparseGPT reference is transcribed below from IST-DASLab/sparsegpt `sparsegpt.py` (fasterprune);
the model-level tests use transformers' OPTForCausalLM only as a test oracle (tiny random config).
"""

import copy

import pytest
import torch

import pruners
from opt_model import UsageError, load_model
from pruners import magnitude_mask, prune_lowest, prune_model, sparsegpt_prune, wanda_mask, wanda_score

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


def n_diff(a, b):
    """How many entries differ: a count reads better in a failure message than two tensor dumps."""
    return int((a != b).sum())


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
        keep = wanda_mask(W, x_sqnorm, rho, select)
        diff = (keep != reference).sum().item()
        assert diff == 0, f"{select} differs from the stable sort in {diff} weights at rho={rho}"


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
    magnitude_mask(W, 0.5), wanda_mask(W, x_sqnorm, 0.5), sparsegpt_prune(W, H, 0.5), sparsegpt_prune(W, H, 0.5, nm=(2, 4))
    for name, before, after in zip(("W", "H", "x_sqnorm"), copies, (W, H, x_sqnorm)):
        assert n_diff(before, after) == 0, f"{name} was modified in place"


# -----------------------------------------------------------------------------
# SparseGPT


def reference_fasterprune(W, H, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=.01):
    """IST-DASLab/sparsegpt fasterprune, line for line, less quantization and logging. One change:
    the reference's `thresh = sort(tmp)[int(numel * sparsity)]` with `tmp <= thresh` prunes k + 1 weights;
    here `[k - 1]` prunes exactly k, which is the same set as ours on inputs without ties."""
    W, H = W.clone().float(), H.clone()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity) - 1]  # reference: [int(...)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


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
    assert maxdiff <= 1e-5, f"max |W_ours - W_reference| = {maxdiff:.3g} ({nm=})"
    assert (W_pruned[:, 5] == 0).all(), "the dead input's weights were not zeroed"


def test_reference_threshold_prunes_one_more_than_ours():
    # documents the deliberate difference: `tmp <= sort(tmp)[k]` prunes k + 1 of a tie-free block
    tmp = torch.rand(16, 8, generator=torch.Generator().manual_seed(9))
    k = int(tmp.numel() * 0.5)
    assert (tmp <= torch.sort(tmp.flatten())[0][k]).sum() == k + 1
    assert prune_lowest(tmp.reshape(1, -1), k).sum() == k


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
    with pytest.raises(UsageError, match="select"):
        wanda_mask(W, x_sqnorm, 0.5, select="heap")
    assert issubclass(UsageError, ValueError)


# -----------------------------------------------------------------------------
# The sequential driver on a tiny OPT


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=3,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    hf = transformers.OPTForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("tiny-opt")
    hf.save_pretrained(directory)
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
    report = prune_model(model, calib_ids, method, rho, progress=False)
    assert len(report) == 3 * 6, f"report has {len(report)} entries, expected 18"
    state = model.state_dict()
    for name, W in state.items():
        key = name.removesuffix(".weight")
        if key in report:
            expected = kept_fraction(*W.shape, method, rho)
            assert report[key] == expected, f"{method} {key}: kept {report[key]}, promised {expected}"
            assert (W != 0).float().mean().item() <= expected, f"{method} {key}: more nonzeros than kept"
        else:  # embeddings, positions, LayerNorms, biases, lm_head
            assert n_diff(W, before[name]) == 0, f"{method} changed {name}, which must stay dense"


def tokens_by_features(x):
    return x.reshape(-1, x.shape[-1])  # transformers' OPT feeds fc1/fc2 (T, d), the projections (1, T, d)


def hf_block_stats(hf, block_index, calib_ids):
    """Per Linear of one block, gathered with plain forward hooks on the oracle, one window at a time:
    x_sqnorm = mean over windows of sum_t x_tj^2, and H = (2 / windows) sum_t x_t x_t^T."""
    block = hf.model.decoder.layers[block_index]
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")
    inputs = {name: [] for name in names}
    hooks = [block.get_submodule(name).register_forward_hook(
        lambda module, args, out, name=name: inputs[name].append(tokens_by_features(args[0])))
        for name in names]
    with torch.no_grad():
        for ids in calib_ids:
            hf(ids[None])
    for hook in hooks:
        hook.remove()
    n = len(calib_ids)
    return {name: (sum(X.pow(2).sum(0) for X in Xs) / n, 2 / n * sum(X.T @ X for X in Xs))
            for name, Xs in inputs.items()}


@pytest.mark.parametrize("method", ("wanda", "sparsegpt"))
def test_prune_model_equals_pruners_on_hooked_statistics(tiny_opt, method):
    hf, directory, calib_ids = tiny_opt
    hf = copy.deepcopy(hf)
    model = load_model(directory)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    prune_model(model, calib_ids, method, 0.5, progress=False)
    pruned = model.state_dict()
    for b in range(3):
        stats = hf_block_stats(hf, b, calib_ids)
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
