"""opt_model: the forward pass against transformers' OPTForCausalLM (a test-only oracle) on tiny random
OPTs of both checkpoint layouts, strict loading, half precision, the KV cache, and the tokenizer against
transformers' and the reference token counts of ../shared/data/README.md (those tests skip without it)."""

import json
import random
import shutil

import pytest
import torch

from checkpoint import UsageError
from opt_model import OPTConfig, load_model, load_tokenizer
from kit.checks import assert_close
from kit.data import SHARED_DATA, TOKENIZER_DIR, sentence
from kit.marks import needs_shared_data
from kit.tiny_models import TINY_LAYOUTS, rewrite_checkpoint, save_tiny_opt
from kit.tiny_tokenizers import save_tiny_tokenizer

PARITY_ATOL = 1e-4  # fp32 logits of two implementations of the same arithmetic


@pytest.fixture(scope="module", params=sorted(TINY_LAYOUTS))
def tiny_checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    reference = save_tiny_opt(directory, **TINY_LAYOUTS[request.param])
    return directory, reference


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


@pytest.mark.cuda
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


