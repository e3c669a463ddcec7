"""The published algorithms transcribed as references: SparseGPT's `fasterprune` line for line, and the count
of rows whose k-th smallest score is tied (the rows an exact-k selection must redo).
"""

import torch

from kit.checks import n_diff


def reference_fasterprune(W, H, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=.01, exact=True):
    """IST-DASLab/sparsegpt fasterprune, line for line, less quantization and logging. One change, unless
    `exact=False`: the reference's `thresh = sort(tmp)[int(numel * sparsity)]` with `tmp <= thresh` prunes k + 1
    weights of a block (more with ties); `exact` takes `[k - 1]`, which prunes exactly k, the same set as ours on
    inputs without ties (random floats), where the reference's N:M topk also picks the same N as our stable sort."""
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
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity) - exact]  # reference: [int(...)]
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


def tied_rows(S: torch.Tensor, k: int) -> int:
    """Rows with more than k scores <= their k-th smallest: the rows the exact-k tie step redoes."""
    return int(((S <= torch.kthvalue(S, k, dim=1).values[:, None]).sum(dim=1) > k).sum())


def hooked_statistics(reference, block, names: list[str], calib_ids) -> dict:
    """Wanda's and SparseGPT's statistics of the Linears `names` of `block`, one of the transformers model
    `reference`'s blocks, written out independently: plain forward hooks, one window at a time, each input read as
    (tokens, features): x_sqnorm = mean over windows of sum_t x_tj^2, H = (2/N) sum X^T X."""
    inputs = {name: [] for name in names}
    hooks = [block.get_submodule(name).register_forward_hook(
        lambda module, args, out, name=name: inputs[name].append(args[0].reshape(-1, args[0].shape[-1])))
        for name in names]
    with torch.no_grad():
        for ids in calib_ids:
            reference(ids[None])
    for hook in hooks:
        hook.remove()
    n = len(calib_ids)
    return {name: (sum(X.pow(2).sum(0) for X in Xs) / n, 2 / n * sum(X.T @ X for X in Xs)) for name, Xs in inputs.items()}


def assert_pruned_as_the_algorithms(original: dict, pruned: dict, reference, calib_ids, method: str, rho: float,
                                    names: list[str], what: str) -> None:
    """Each decoder Linear of `pruned` (a state dict) is the published algorithm run on statistics hooked from
    `reference` (a transformers model of the `original` weights), block after block, each block's statistics taken
    with the blocks before it pruned: Wanda's lib/prune.py (|W| · sqrt(scaler_row), a stable sort per row) or
    SparseGPT's fasterprune. The same zeros, values within 1e-4."""
    for b in range(len(reference.model.layers)):
        for name, (x_sqnorm, H) in hooked_statistics(reference, reference.model.layers[b], names, calib_ids).items():
            key = f"model.layers.{b}.{name}.weight"
            W = original[key]
            if method == "wanda":
                S = W.abs() * x_sqnorm.sqrt()
                pruned_idx = torch.sort(S, dim=-1, stable=True)[1][:, : int(W.shape[1] * (1 - rho))]
                expected = W.clone().scatter_(1, pruned_idx, 0)
            else:
                expected = reference_fasterprune(W, H, 1 - rho)
            zeros = n_diff(pruned[key] == 0, expected == 0)
            worst = (pruned[key] - expected).abs().max().item()
            assert zeros == 0 and worst <= 1e-4, (f"{what} {method} block {b} {name}: {zeros} zeros differ, "
                                                  f"max |Δ| {worst:.3g} from the algorithm on hooked statistics")
            reference.get_parameter(key).data.copy_(pruned[key])  # block b + 1 sees the pruned block b
