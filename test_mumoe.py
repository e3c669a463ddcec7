"""Tests for mumoe: each one compares against a reference and can fail.

References: transformers' OPTForCausalLM (a test-only oracle) for the forward pass, the published SparseGPT
and Wanda algorithms for the pruners, the paper's table for MACs, the data README's token counts.
Tiny random OPT models are built and saved in the Hugging Face layout, so nothing is downloaded.
Tests that need the real text and tokenizer files in ../shared/data skip with the reason when absent.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

import opt_model
from opt_model import OPTConfig, UsageError, load_model, load_tokenizer

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"
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


def save_tiny_opt(directory: Path, seed=0, **overrides):
    """A random transformers OPTForCausalLM saved with save_pretrained; returns the reference model."""
    import transformers

    torch.manual_seed(seed)
    reference = transformers.OPTForCausalLM(tiny_hf_config(**overrides)).eval()
    with torch.no_grad():  # random LayerNorm affines too, so a swapped or skipped LayerNorm shows
        for name, p in reference.named_parameters():
            if "layer_norm" in name:
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


def test_greedy_generation_matches_transformers(tiny_checkpoint):
    directory, reference = tiny_checkpoint
    model = load_model(directory)
    ours = ref = torch.tensor([[2, 5, 17, 9]])
    with torch.no_grad():
        for _ in range(12):
            ours = torch.cat([ours, model(ours)[:, -1:].argmax(-1)], dim=1)
            ref = torch.cat([ref, reference(ref).logits[:, -1:].argmax(-1)], dim=1)
    assert ours.tolist() == ref.tolist()


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


@needs_shared_data
def test_tokenizer_matches_hf_opt_examples():
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    assert tokenizer.encode("Hello, my dog is cute") == [2, 31414, 6, 127, 2335, 16, 11962]
    assert tokenizer.encode("Hello world") == [2, 31414, 232]
    assert tokenizer.encode("\n\n") == [2, 50140]
    assert tokenizer.encode("a</s>b")[1:].count(2) == 1, "</s> in text is the special token, as in HF"
    assert tokenizer.decode(tokenizer.encode("Hello world")) == "Hello world"


@needs_shared_data
@pytest.mark.parametrize("rows, join, count", [("wikitext2.test.jsonl", "\n\n", 287_645),
                                                ("ptb.test.jsonl", " ", 97_722),
                                                ("c4.validation.jsonl", " ", 506_603)])
def test_tokenizer_reference_counts(rows, join, count):
    ids = load_tokenizer(TOKENIZER_DIR).encode(join.join(read_rows(rows)))
    assert (len(ids), ids[0]) == (count, 2)
