"""Tests for Gemma 3 (gemma_model.py) and for the methods on it. Each test can fail.

References: transformers' Gemma3ForCausalLM and Gemma3ForConditionalGeneration (test-only oracles) for the forward
pass, the KV cache and greedy generation, with inputs longer than the sliding window, and Wanda's and SparseGPT's
algorithms on statistics gathered with plain hooks on the transformers model (kit.references' transcription). Tiny random
models are built and saved in the Hugging Face layout here, so nothing is downloaded.
"""

import json

import pytest
import torch

import gemma_model
import models
import mumoe
from checkpoint import UsageError
from pruners import prune_model
from kit.checks import (assert_cached_logits_equal_the_full_forward, assert_close,
                         assert_greedy_generation_matches)
from kit.data import random_ids
from kit.references import assert_pruned_as_the_algorithms
from kit.tiny_models import LLAMA_VOCAB

# fp32, measured on these configs (AVX2 and ATEN_CPU_CAPABILITY=default, 1 and 2 threads): logits equal
# transformers' exactly (max |diff| 0); cached decoding vs the full forward up to 1.05e-6. The bound leaves about 10x
# room for other CPUs' kernels, far below what a bug moves (> 1e-2).
FP32_ATOL = 1e-5
# bf16 / fp16, measured the same way: bf16 1.17e-2 to 1.46e-2, fp16 1.28e-3 to 1.89e-3 (four norms a block, each
# rounding once); the bounds are about 4x those
HALF_ATOL = {torch.bfloat16: 0.06, torch.float16: 0.008}
WINDOW = 16  # shorter than the 40-token inputs: keys fall out of the sliding layers' window
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
LINEAR_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}

# name -> overrides of the tiny Gemma3TextConfig: the plain one (query_pre_attn_scalar apart from head_dim, its
# sliding and full layers interleaved), and the 4B-and-larger one (linear RoPE scaling on the full layers, untied
# head, GQA 4:1) with a final logit softcap
TINY = {
    "gemma3": dict(),
    "gemma3_scaled_softcap": dict(rope_parameters=LINEAR_ROPE, final_logit_softcapping=3.0, tie_word_embeddings=False,
                                  num_key_value_heads=1),
}


def save_tiny_gemma(directory, kind: str = "gemma3", seed: int = 0, **overrides):
    """A random transformers Gemma3ForCausalLM saved with save_pretrained, its norm weights random (zero is the
    identity of a (1 + w) norm, so a skipped one would not show); returns it."""
    import transformers

    kw = {**dict(vocab_size=LLAMA_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=20,
                 max_position_embeddings=128, sliding_window=WINDOW, layer_types=LAYER_TYPES),
          **TINY[kind], **overrides}
    torch.manual_seed(seed)
    reference = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    reference.save_pretrained(directory)
    return reference


def hub_layout(config: dict) -> dict:
    """A transformers-5 config.json rewritten as the hub's Gemma 3 files are: rope_theta, rope_local_base_freq and
    rope_scaling (the full layers') at the top, sliding_window_pattern where the layers follow it."""
    hub = {k: v for k, v in config.items() if k not in ("rope_parameters", "layer_types", "dtype",
                                                        "_sliding_window_pattern")}
    full, sliding = (dict(config["rope_parameters"][t]) for t in ("full_attention", "sliding_attention"))
    hub["rope_theta"], hub["rope_local_base_freq"] = full.pop("rope_theta"), sliding.pop("rope_theta")
    hub["rope_scaling"] = None if full["rope_type"] == "default" else full
    pattern = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(config["num_hidden_layers"])]
    if config["layer_types"] == pattern:
        hub["sliding_window_pattern"] = 6
    else:
        hub["layer_types"] = config["layer_types"]
    hub["torch_dtype"] = config["dtype"]
    return hub


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, directory, save_tiny_gemma(directory, request.param)


# -----------------------------------------------------------------------------
# The forward pass, both config layouts, the KV cache and generation, longer than the window


@torch.no_grad()
def test_logits_match_transformers(tiny):
    kind, directory, reference = tiny
    model = models.load_model(directory)
    assert isinstance(model, gemma_model.Gemma3ForCausalLM)
    assert [b.self_attn.window for b in model.blocks] == [WINDOW, None, WINDOW, WINDOW]
    ids = random_ids(2, 40, LLAMA_VOCAB)
    assert_close(model(ids), reference(ids).logits, FP32_ATOL, f"{kind} logits")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@torch.no_grad()
def test_half_precision_matches_transformers(tiny, dtype):
    import copy

    kind, directory, reference = tiny
    model = models.load_model(directory, dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    ids = random_ids(2, 40, LLAMA_VOCAB)
    assert_close(model(ids), copy.deepcopy(reference).to(dtype)(ids).logits, HALF_ATOL[dtype], f"{kind} {dtype}")


@pytest.mark.parametrize("layer_types", [LAYER_TYPES, None], ids=["layer_types", "sliding_window_pattern"])
@torch.no_grad()
def test_hub_config_layout_loads_the_same_model(tmp_path, layer_types):
    overrides = dict(rope_parameters=LINEAR_ROPE)
    if layer_types is None:  # the layers of the default pattern: five sliding, one full, then sliding again
        overrides["layer_types"] = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(7)]
        overrides["num_hidden_layers"] = 7
    save_tiny_gemma(tmp_path / "t5", **overrides)
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "model.safetensors").symlink_to(tmp_path / "t5" / "model.safetensors")
    (hub / "config.json").write_text(json.dumps(hub_layout(json.loads((tmp_path / "t5" / "config.json").read_text()))))
    assert ('"sliding_window_pattern"' in (hub / "config.json").read_text()) == (layer_types is None)
    ours, theirs = models.load_model(tmp_path / "t5"), models.load_model(hub)
    assert ours.config == theirs.config, f"{ours.config} != {theirs.config}"
    ids = random_ids(1, 30, LLAMA_VOCAB)
    assert torch.equal(ours(ids), theirs(ids)), "the hub layout gives other logits"


def test_cached_logits_equal_the_full_forward(tiny):
    kind, directory, _ = tiny
    assert_cached_logits_equal_the_full_forward(models.load_model(directory), LLAMA_VOCAB, FP32_ATOL, kind)


def test_greedy_generation_matches_transformers(tiny):
    kind, directory, reference = tiny
    assert_greedy_generation_matches(models.load_model(directory), reference, LLAMA_VOCAB, kind)


@torch.no_grad()
def test_embedding_scale_is_rounded_to_the_dtype(tmp_path):
    """sqrt(hidden) in the weights' dtype, as the reference: in bfloat16 sqrt(72) = 8.485 is 8.5."""
    reference = save_tiny_gemma(tmp_path, hidden_size=72, num_hidden_layers=1, layer_types=["full_attention"])
    model = models.load_model(tmp_path, dtype=torch.bfloat16)
    ids = random_ids(1, 10, LLAMA_VOCAB)
    ref = reference.to(torch.bfloat16).model.embed_tokens(ids)
    assert torch.equal(model.embed(ids), ref), f"max |diff| {(model.embed(ids) - ref).abs().max():.3g}"


# -----------------------------------------------------------------------------
# A gemma3 (vision-language) checkpoint: its language model, for the text commands


@torch.no_grad()
def test_language_model_of_a_gemma3_checkpoint(tmp_path):
    import transformers

    text = transformers.Gemma3TextConfig(vocab_size=LLAMA_VOCAB, hidden_size=64, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, max_position_embeddings=128, sliding_window=WINDOW)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, image_size=28, patch_size=14)
    torch.manual_seed(0)
    reference = transformers.Gemma3ForConditionalGeneration(
        transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)).eval()
    for name, p in reference.named_parameters():
        if "norm" in name:
            p.data.copy_(torch.randn_like(p) * 0.3)
    reference.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gemma3"
    model = models.load_model(tmp_path)
    ids = random_ids(2, 40, LLAMA_VOCAB)
    assert_close(model(ids), reference(input_ids=ids).logits, FP32_ATOL, "a gemma3 checkpoint's language model")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "text_config"}))
    with pytest.raises(UsageError, match="gemma3 checkpoint without a text_config"):
        models.load_model(tmp_path)


@pytest.mark.parametrize("changes, message", [
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping 50.0 is not supported"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(hidden_activation="gelu"), "hidden_activation 'gelu' is not one of ['gelu_pytorch_tanh']"),
    (dict(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e6}}),
     "rope_scaling type 'yarn' of the full_attention layers is not supported"),
])
def test_bad_configs_are_refused_by_name(tmp_path, changes, message):
    save_tiny_gemma(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(UsageError) as error:
        models.load_model(tmp_path)
    assert message in str(error.value)


# -----------------------------------------------------------------------------
# The pruners and μ-MoE on Gemma 3


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_prune_model_equals_the_algorithms_on_hooked_statistics(tmp_path, method):
    reference = save_tiny_gemma(tmp_path)
    model, calib_ids = models.load_model(tmp_path), random_ids(3, 24, LLAMA_VOCAB, seed=12)  # 24 > the window
    original = {k: v.clone() for k, v in model.state_dict().items()}
    prune_model(model, calib_ids, method, 0.5, progress=False)
    assert_pruned_as_the_algorithms(original, model.state_dict(), reference, calib_ids, method, 0.5,
                                    list(model.blocks[0].linears()), "gemma3")


@torch.no_grad()
def test_block_routing_is_wanda_calibrated_on_the_window(tmp_path):
    import copy

    save_tiny_gemma(tmp_path)
    model, ids = models.load_model(tmp_path), random_ids(1, 32, LLAMA_VOCAB, seed=5)
    routed = mumoe.mumoe_logits(model, ids, mumoe.MuMoE(0.5))
    pruned = copy.deepcopy(model)
    prune_model(pruned, ids, "wanda", 0.5, progress=False)
    assert_close(routed, pruned(ids), 1e-5, "block routing vs Wanda calibrated on the window")
    assert (routed - model(ids)).abs().max() > 1e-2, "μ-MoE at rho 0.5 is the dense model"
