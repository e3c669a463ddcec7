"""Offline pruning baselines: magnitude, Wanda and SparseGPT, and the sequential driver that runs them.

This file owns the three one-shot pruners of the paper's tables, each a pure function of tensors
(W, its calibration statistics, rho) to a mask, and `prune_model`, which walks a model (OPT, LLaMA: any
model with checkpoint.py's interface) block by block as the references do. Throughout, `rho` is the *active-weight ratio*: rho = 0.4 keeps 40% of
each decoder Linear and prunes 60%. W is [d_out, d_in], as nn.Linear stores it; masks are bool, True = kept.

    magnitude   S_ij = |W_ij|                       (Han et al. 2015; one threshold per matrix)
    Wanda       S_ij = |W_ij| * ||X_j||_2           (Sun et al. 2023; compared within each output row)
    SparseGPT   OBS with H = 2 X X^T, column by column through the Cholesky factor of H^-1
                (Frantar & Alistarh 2023)

References: locuslab/wanda `lib/prune.py` and IST-DASLab/sparsegpt `sparsegpt.py`; every deliberate
difference from them is written next to the line it concerns.
"""

from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
import torch
from tqdm import tqdm

import distributed
from checkpoint import UsageError

SELECTS = ("sort", "topk", "kthvalue", "partition")
# The fastest exact selection on each device, as benchmarks/bench_pruners.py and bench_selection.py measure it
# (figures in docs/speed.md): numpy's partition (introselect) on a CPU; on CUDA kthvalue, the one-pass exact
# kernel, where partition would be a round trip to the host (unmeasured until a GPU runs benchmarks/gpu_check.py).
FASTEST_SELECT = {"cpu": "partition", "cuda": "kthvalue"}
# wanda_gated_weight's rows per step: 2^16 float32 scores (256 KB) and their copy fit a core's 1 MB L2 cache
FUSED_CHUNK_ELEMENTS = 1 << 16
# 1 - rho is computed in binary floating point (1 - 0.8 = 0.19999999999999996); rounding it to this
# many decimals gives the count the references get from the decimal sparsity the user typed.
SPARSITY_DECIMALS = 12


@cache
def cpu_threads() -> ThreadPoolExecutor:
    """One pool for the numpy kernels below, as wide as torch's intra-op pool (numpy releases the GIL)."""
    return ThreadPoolExecutor(torch.get_num_threads())


def default_select(device) -> str:
    return FASTEST_SELECT.get(torch.device(device).type, "kthvalue")


def prune_count(n: int, rho: float) -> int:
    """How many of n weights are pruned: int(n * (1 - rho)), as both references count."""
    return int(n * round(1.0 - rho, SPARSITY_DECIMALS))


def check_rho(rho: float) -> None:
    if not 0.0 < rho <= 1.0:
        raise UsageError(f"rho is the active-weight ratio and must lie in (0, 1], got {rho}")


def check_nm(nm, d_in: int) -> None:
    N, M = nm
    if not 0 < N < M:
        raise UsageError(f"an N:M pattern prunes N of every M weights and needs 0 < N < M, got {N}:{M}")
    if d_in % M:
        raise UsageError(f"N:M pruning needs d_in divisible by M, got d_in={d_in} and M={M}")


# -----------------------------------------------------------------------------
# Exact-k selection: the one rule every method uses


def kth_smallest(S: torch.Tensor, k: int, select: str) -> torch.Tensor:
    """The k-th smallest value of each row of S (rows, n) -> (rows,), by the kernel `select` names."""
    if select == "topk":
        return torch.topk(S, k, dim=1, largest=False, sorted=False).values.amax(dim=1)
    if select == "partition" and S.device.type == "cpu":
        # numpy's introselect, O(n) per row, on a host array (on CUDA we use kthvalue); it releases
        # the GIL, so the rows are split over as many threads as torch uses
        parts = np.array_split(S.detach().float().numpy(), torch.get_num_threads())
        kth = cpu_threads().map(lambda rows: np.partition(rows, k - 1, axis=1)[:, k - 1], parts)
        return torch.from_numpy(np.concatenate(list(kth))).to(S.dtype)
    return torch.kthvalue(S, k, dim=1).values


def prune_lowest(S: torch.Tensor, k: int, select: str = "sort") -> torch.Tensor:
    """Bool mask, True on the k smallest scores of each row of S (..., n), ties to the lower index.

    This is Wanda's own rule, `torch.sort(S, dim=-1, stable=True)[1][:, :k]`, and `select="sort"` runs it
    literally. The other selects find the k-th smallest value t instead and prune every S < t, then as
    many S == t as are still needed, lowest index first -- the same set as the stable sort, ties included.
    (A bare `S <= t` would prune every tie, e.g. all weights of an input column that was always zero.)
    """
    if select not in SELECTS:
        raise UsageError(f"select must be one of {SELECTS}, got {select!r}")
    shape = S.shape
    S = S.reshape(-1, shape[-1])  # (rows, n)
    if k == 0:
        return torch.zeros(shape, dtype=torch.bool, device=S.device)
    if select == "sort":
        order = torch.sort(S, dim=1, stable=True).indices[:, :k]
        return torch.zeros_like(S, dtype=torch.bool).scatter_(1, order, True).reshape(shape)
    t = kth_smallest(S, k, select)[:, None]  # (rows, 1)
    pruned = S <= t
    # every row has at least k scores <= t, so a total above rows * k means ties at t in some rows:
    # there, prune only as many of the tied scores as are needed, the lowest-index ones. (Only those
    # rows are redone: the cumsum is the slowest step here, and float scores rarely tie.)
    if torch.count_nonzero(pruned) > pruned.shape[0] * k:
        tied = (pruned.sum(dim=1, dtype=torch.int32) > k).nonzero()[:, 0]
        S_tied, t_tied = S[tied], t[tied]
        below, ties = S_tied < t_tied, S_tied == t_tied
        still_needed = k - below.sum(dim=1, keepdim=True)
        pruned[tied] = below | (ties & (ties.cumsum(dim=1) <= still_needed))
    return pruned.reshape(shape)


def keep_mask(S: torch.Tensor, k: int, select: str = "sort", nm=None) -> torch.Tensor:
    """Kept-weight mask of scores S (d_out, d_in): prune k per row, or N in every group of M columns."""
    if nm is not None:
        # a group is a tiny row of M scores; a stable sort of it is exact and cheap (the references'
        # topk(largest=False) leaves the order of ties unspecified)
        N, M = nm
        return ~prune_lowest(S.reshape(*S.shape[:-1], -1, M), N, "sort").reshape(S.shape)
    return ~prune_lowest(S, k, select)


# -----------------------------------------------------------------------------
# Magnitude and Wanda: a score, then the selection


def magnitude_mask(W: torch.Tensor, rho: float, group: str = "matrix", nm=None) -> torch.Tensor:
    """Keep the largest |W_ij|: the rho fraction of the whole matrix (`group="matrix"`, as SparseGPT's
    and Wanda's magnitude baselines) or of each output row (`group="row"`). With nm = (N, M), N of every
    M consecutive weights of a row are pruned instead and rho is not used.

    Difference from the references: their matrix rule is `thresh = sort(|W|)[k]; prune |W| <= thresh`,
    which prunes k + 1 weights (more with ties). We prune exactly k, ties to the lower flat index.
    """
    check_rho(rho)
    if group not in ("matrix", "row"):
        raise UsageError(f"magnitude group must be 'matrix' or 'row', got {group!r}")
    if nm is not None:
        check_nm(nm, W.shape[1])
    S = W.detach().abs().float()
    select = default_select(W.device)
    if group == "row" or nm is not None:
        return keep_mask(S, prune_count(W.shape[1], rho), select, nm)
    return keep_mask(S.reshape(1, -1), prune_count(W.numel(), rho), select).reshape(W.shape)


def wanda_score(W: torch.Tensor, x_sqnorm: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| * ||X_j||_2, with x_sqnorm_j = ||X_j||_2^2; float32 like the reference's product."""
    return W.detach().abs().float() * x_sqnorm.float().sqrt()  # (d_out, d_in) * (d_in,)


def wanda_mask(W: torch.Tensor, x_sqnorm: torch.Tensor, rho: float, select: str | None = None,
               nm=None) -> torch.Tensor:
    """Wanda: in each output row keep the rho fraction of the largest S_ij = |W_ij| * ||X_j||_2.

    x_sqnorm (d_in,) is sum_t X_tj^2 over a prompt's tokens (μ-MoE), or its mean over calibration windows
    (the reference's `scaler_row`). Exactly int(d_in * (1 - rho)) weights per row are pruned, ties to the
    lower column index; every `select` gives the identical mask, None picks the fastest on W's device.
    With nm = (N, M), N of every M consecutive weights of a row are pruned instead and rho is not used.
    """
    check_rho(rho)
    d_out, d_in = W.shape
    if x_sqnorm.shape != (d_in,):
        raise UsageError(f"x_sqnorm must have shape ({d_in},) for W of shape {tuple(W.shape)}, "
                         f"got {tuple(x_sqnorm.shape)}")
    if nm is not None:
        check_nm(nm, d_in)
    select = select or default_select(W.device)
    return keep_mask(wanda_score(W, x_sqnorm), prune_count(d_in, rho), select, nm)


def wanda_gated_weight(W: torch.Tensor, x_sqnorm: torch.Tensor, rho: float, select: str | None = None,
                       nm=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """W ⊙ M for Wanda's mask M of `wanda_mask` (same arguments), written into `out` if given (a tensor like
    W: reusing one spares the page faults of a fresh one), identical to `W * wanda_mask(W, x_sqnorm, rho,
    select, nm)`, which is what runs on every device but one.

    On the CPU, in float32 and with the partition select, μ-MoE pays this for every prompt and Linear,
    so it is fused: a few rows at a time, small enough to stay in a core's L2 cache, go from W to the
    scores, their k-th smallest t, and W ⊙ [S > t], and W and W ⊙ M cross main memory once each.
    """
    check_rho(rho)
    d_out, d_in = W.shape
    k, select = prune_count(d_in, rho), select or default_select(W.device)
    if (select != "partition" or nm is not None or k == 0 or W.device.type != "cpu" or W.dtype != torch.float32
            or x_sqnorm.shape != (d_in,)):
        return torch.mul(W, wanda_mask(W, x_sqnorm, rho, select, nm), out=out)  # the bool mask is promoted
    W_np, norms = W.detach().numpy(), np.sqrt(x_sqnorm.detach().float().cpu().numpy())  # the score's float32 ops
    out = torch.empty_like(W) if out is None else out
    out_np, kept = out.numpy(), d_in - k
    rows = max(1, FUSED_CHUNK_ELEMENTS // d_in)
    steps = [slice(r, min(r + rows, d_out)) for r in range(0, d_out, rows)]
    threads = min(torch.get_num_threads(), len(steps))
    # Scores are >= 0, and non-negative floats order as their bit patterns do: the selection runs on int32
    # keys (faster than on floats). A dead input (||X_j|| = 0) scores 0 in every row; when that many equal
    # keys crowd the k-th, the partition crawls through them, so then zero scores get distinct keys below
    # all others, in index order: exactly the rule's order. Other ties are rare: repaired afterwards.
    crowded = d_in - np.count_nonzero(norms) > k // 2
    zero_keys = np.iinfo(np.int32).min + np.arange(d_in, dtype=np.int32)
    norms = np.tile(norms, (rows, 1))  # (rows, d_in): a product of equal shapes runs as one loop, not one per row

    def fuse(first: int) -> None:
        keys, P = np.empty((2, rows, d_in), np.int32)  # keys of the scores, and a copy the partition reorders
        keep = np.empty((rows, d_in), bool)
        for step in steps[first::threads]:
            n = step.stop - step.start
            W_s, keys_s, P_s, keep_s = W_np[step], keys[:n], P[:n], keep[:n]
            S_s = keys_s.view(np.float32)
            np.multiply(np.abs(W_s, out=S_s), norms[:n], out=S_s)  # S_ij = |W_ij| * ||X_j||_2
            if crowded:
                np.copyto(keys_s, zero_keys, where=S_s == 0)
            np.positive(keys_s, out=P_s)  # a copy (np.copyto of this size can bypass the cache and crawl)
            P_s.partition(k - 1, axis=1)
            t = P_s[:, k - 1 : k]  # (n, 1): the key of the k-th smallest score of each row
            np.multiply(W_s, np.greater(keys_s, t, out=keep_s), out=out_np[step])
            if np.count_nonzero(keep_s) != n * kept:  # ties at t: the rows that tie are redone by the rule itself
                tied = np.flatnonzero(np.count_nonzero(keep_s, axis=1) != kept)  # (r,) row numbers
                keep_s[tied] = ~prune_lowest(torch.from_numpy(keys_s[tied]), k).numpy()  # keys order as scores do
                out_np[step.start + tied] = W_s[tied] * keep_s[tied]

    list(cpu_threads().map(fuse, range(threads)))
    return out


# -----------------------------------------------------------------------------
# SparseGPT


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, rho: float, blocksize: int = 128,
                    percdamp: float = 0.01, nm=None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: prune W column by column and let the surviving weights absorb each column's error.

    For the layer loss ||(W - Ŵ) X||^2, with X (d_in, tokens) and Hessian H = 2 X X^T, Optimal Brain
    Surgeon removes weight w_q at the cost w_q^2 / [H^-1]_qq and corrects the rest of its row by
    -w_q / [H^-1]_qq * H^-1_{q,:}. Eliminating columns left to right, the rows needed from each successive
    inverse are the rows of the upper Cholesky factor U of H^-1 (H^-1 = U^T U), so with d = U_ii:

        q = w with the pruned entries zeroed;   err = (w - q) / d;   W[:, i:] -= err ⊗ U[i, i:]

    Columns go in blocks of `blocksize`: the block's mask is chosen from the scores W^2 / diag(U)^2 over
    all rows x block columns, each column's error updates the rest of its block at once, and the block's
    errors update all later columns in one matmul (the "lazy batch" update). Weights of dead inputs
    (H_jj = 0) are zeroed first, as in the reference; scoring 0, they are the first the mask prunes.
    The scale of H does not matter (the damping is relative to its diagonal mean and the updates are
    scale-free): any multiple of sum X^T X gives the same result. Returns (W_pruned in W's dtype, mask).
    With nm = (N, M), N of every M consecutive weights of a row are pruned instead and rho is not used.

    Differences from the reference `fasterprune`: exactly k = int(numel_block * (1 - rho)) per block
    (the reference's `<= sort[k]` prunes k + 1), exactly N per group with ties to the lower index (the
    reference uses topk), and rho = 1 returns W untouched (the reference still zeroes dead columns).
    """
    check_rho(rho)
    d_out, d_in = W.shape
    if H.shape != (d_in, d_in):
        raise UsageError(f"H must have shape ({d_in}, {d_in}) for W of shape {tuple(W.shape)}, "
                         f"got {tuple(H.shape)}")
    if nm is not None:
        check_nm(nm, d_in)
        if blocksize % nm[1]:
            raise UsageError(f"blocksize {blocksize} must be a multiple of M={nm[1]} so no N:M group spans blocks")
    keep = torch.ones_like(W, dtype=torch.bool)
    if rho == 1.0 and nm is None:
        return W.detach().clone(), keep
    W_hat = W.detach().float().clone()
    H = H.detach().float().clone()
    if not torch.isfinite(H).all():
        raise UsageError("H has inf or NaN entries: the calibration activations overflowed "
                         "(a float16 model? run it in bfloat16 or float32)")

    dead = torch.diag(H) == 0  # inputs that were always zero: their weights can go for free
    H[dead, dead] = 1
    W_hat[:, dead] = 0
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))  # dampening relative to H's own scale
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # reference: Hinv
    except torch.linalg.LinAlgError:
        raise UsageError(f"SparseGPT: H is not positive definite after dampening with percdamp={percdamp}; "
                         "try a larger percdamp (e.g. 0.1) or more calibration samples") from None

    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        W1 = W_hat[:, i1:i2].clone()  # (d_out, count), updated as columns are pruned
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        if nm is None:  # one threshold over all rows x block columns, flattened row by row
            scores = (W1 ** 2 / d[None, :] ** 2).reshape(1, -1)
            pruned1 = prune_lowest(scores, prune_count(W1.numel(), rho), default_select(W1.device)).reshape(W1.shape)
        else:
            pruned1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:  # the group's mask is chosen from the *updated* weights
                N, M = nm
                pruned1[:, i:i + M] = prune_lowest(W1[:, i:i + M] ** 2 / d[None, i:i + M] ** 2, N)
            w = W1[:, i]
            q = w.masked_fill(pruned1[:, i], 0)
            err = (w - q) / d[i]
            W1[:, i:] -= torch.outer(err, U1[i, i:])
            Q1[:, i], Err1[:, i] = q, err
        W_hat[:, i1:i2] = Q1
        W_hat[:, i2:] -= Err1 @ U[i1:i2, i2:]
        keep[:, i1:i2] = ~pruned1
    return W_hat.to(W.dtype), keep


# -----------------------------------------------------------------------------
# The sequential driver: calibrate, prune and re-run one decoder block at a time

METHODS = ("magnitude", "wanda", "sparsegpt")


def gather_statistics(block, hidden: list[torch.Tensor], method: str) -> dict[str, torch.Tensor]:
    """One dense pass of `block` over every window; per Linear, a float32 statistic of what it reads.

        wanda      x_sqnorm = (1/N) sum_windows sum_t X_tj^2     (d_in,)       the reference's `scaler_row`
        sparsegpt  H = (2/N) sum_windows X^T X                   (d_in, d_in)  the reference's `H`

    with X the (T, d_in) input of one window and N the number of windows. (The references keep running
    averages over windows; the sums are the same up to float rounding.)

    Under torchrun `hidden` is this rank's share of the windows: the sums of all ranks are added up
    (all-reduced) before they are scaled, and N counts every rank's windows. The float32 sums then add
    in another order than one process's, which moves them by an ulp or so, and a score within an ulp of
    the threshold may swap sides. Measured on the trained opt-ptb-tiny, 32 PTB windows of 512 tokens on
    2 ranks: Wanda's masks all equal (3.1 M weights); SparseGPT's differ at 208 weights (0.007%), after
    which the updates of those rows differ too, and the perplexity moves by 1e-5 relative.
    """
    linears = block.linears()
    name_of = {layer: name for name, layer in linears.items()}
    d_in = {name: layer.weight.shape[1] for name, layer in linears.items()}
    shapes = {name: (d,) if method == "wanda" else (d, d) for name, d in d_in.items()}
    # zeros to add onto, not the first window's statistic: under torchrun a rank may have no window
    sums = {name: torch.zeros(shapes[name], device=layer.weight.device) for name, layer in linears.items()}
    last = {"input": None, "stat": None}  # q, k and v read one tensor: its statistic is computed once

    def dense_noting_input(layer, x):
        if x is not last["input"]:
            X = x.reshape(-1, x.shape[-1]).float()  # (T, d_in)
            last.update(input=x, stat=(X ** 2).sum(dim=0) if method == "wanda" else X.T @ X)
        sums[name_of[layer]] += last["stat"]
        return layer(x)

    for h in hidden:
        block(h, dense_noting_input)
    distributed.all_reduce_sum(*sums.values())  # under torchrun: the sums over every rank's windows
    scale = (1 if method == "wanda" else 2) / distributed.total(len(hidden))
    return {name: s * scale for name, s in sums.items()}


@torch.no_grad()
def prune_model(model, calib_ids, method: str, rho: float, nm=None,
                select: str | None = None, group: str = "matrix", blocksize: int = 128, percdamp: float = 0.01,
                device=None, progress: bool = True) -> dict[str, float]:
    """Prune every decoder Linear of `model` in place; return each one's kept fraction, by name.

    As the references run it: the calibration windows calib_ids (N, seqlen) are embedded; then, block by
    block, one dense pass over all windows gathers each Linear's statistics from the inputs it really
    sees, the block's Linears are pruned, and the *pruned* block is re-run to make the next block's inputs.
    Embeddings and lm_head stay dense. Windows go through one at a time to bound memory; statistics are
    float32 whatever the model's dtype. calib_ids may also be a list of prompts already embedded, each
    (1, T_i, hidden) (a vision-language model's prompts, image features spliced in). magnitude needs no
    calibration (calib_ids may be None) and uses `group`; wanda uses `select`. If `device` is given, each
    block is moved there for its turn and back (offload of a model kept on the CPU); the hidden states of
    the N windows live on `device`.
    Under torchrun each rank calibrates on its share of the samples and every rank prunes identically.
    """
    if method not in METHODS:
        raise UsageError(f"method must be one of {METHODS}, got {method!r}")
    check_rho(rho)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    calibrated = method != "magnitude"
    if calibrated:
        hidden = calibration_hidden(model, calib_ids, home, device)  # N x (1, T, hidden)

    report = {}
    for b, block in enumerate(tqdm(model.blocks, desc=f"{method} rho={rho}", disable=not progress)):
        block.to(device)
        if calibrated:
            stats = gather_statistics(block, hidden, method)
        for name, layer in block.linears().items():
            W = layer.weight
            if method == "magnitude":
                keep = magnitude_mask(W, rho, group, nm)
                W.mul_(keep)
            elif method == "wanda":
                keep = wanda_mask(W, stats[name], rho, select, nm)
                W.mul_(keep)
            else:
                W_pruned, keep = sparsegpt_prune(W, stats[name], rho, blocksize, percdamp, nm)
                W.copy_(W_pruned)
            report[f"{model.blocks_key}.{b}.{name}"] = keep.sum().item() / keep.numel()
        if calibrated:
            hidden = [block(h) for h in hidden]  # the pruned block makes the next block's inputs
        block.to(home)
    return report


def calibration_hidden(model, calib, home, device) -> list[torch.Tensor]:
    """The calibration samples as the first block's inputs on `device`: token windows (N, seqlen) embedded, or
    prompts embedded already (a list of (1, T_i, hidden) tensors), checked."""
    if isinstance(calib, (list, tuple)) and calib and all(torch.is_tensor(h) and h.is_floating_point() and
                                                          h.ndim == 3 and h.shape[0] == 1 for h in calib):
        return [h.to(device) for h in calib[distributed.shard(len(calib))]]  # under torchrun, this rank's share
    if not torch.is_tensor(calib) or calib.ndim != 2 or calib.dtype != torch.long:
        got = "None" if calib is None else (f"{calib.dtype} {tuple(calib.shape)}" if torch.is_tensor(calib)
                                            else type(calib).__name__)
        raise UsageError("calib_ids must be a (N, seqlen) LongTensor of token ids or a list of embedded "
                         f"(1, T, hidden) prompts, got {got}")
    return [model.embed(ids[None].to(home)).to(device) for ids in calib[distributed.shard(len(calib))]]
