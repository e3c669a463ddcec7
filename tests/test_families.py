"""Tests for the newer LLaMA-family variants of llama_model.py, Qwen3 and Phi-3, and for the sliding window. Each
test can fail.

References: transformers' Qwen3ForCausalLM, Phi3ForCausalLM and MistralForCausalLM (test-only oracles) for the
forward pass, the KV cache and greedy generation, its fast tokenizer for the ids, and Wanda's and SparseGPT's
algorithms run on statistics gathered with plain hooks on the transformers model (kit.references' transcription). A
fused Phi-3 Linear is checked against its parts: the same weights split into a LLaMA's q/k/v and gate/up.
Tiny random models are built and saved in the Hugging Face layout here, so nothing is downloaded.
"""

import copy
import json
import random

import pytest
import torch

import llama_model
import models
import mumoe
from pruners import prune_model
from kit.checks import (assert_cached_logits_equal_the_full_forward, assert_close,
                         assert_greedy_generation_matches, n_diff)
from kit.data import random_ids, sentence
from kit.references import assert_pruned_as_the_algorithms
from kit.tiny_models import LLAMA_VOCAB
from kit.tiny_tokenizers import save_llama_tokenizer

# fp32, measured on these configs (AVX2, 1 thread, and ATEN_CPU_CAPABILITY=default): logits equal transformers'
# exactly (max |diff| 0); cached decoding vs the full forward 3.0e-7 to 4.8e-7. The bound leaves 20x room for other
# CPUs' kernels, far below what a bug moves (> 1e-2).
FP32_ATOL = 1e-5
# bf16 / fp16 logits of two implementations in the same dtype, measured max |diff| on these configs (AVX2 and
# default, 1 and 2 threads): bf16 3.9e-3 to 7.8e-3, fp16 4.9e-4 to 9.8e-4; the bounds are test_llama's, about 4x those
HALF_ATOL = {torch.bfloat16: 0.03, torch.float16: 0.004}
WINDOW = 16  # the tiny models' sliding window: shorter than the 40-token inputs, so that keys fall out of it

# name -> (transformers config class, overrides): Qwen3 tied with a head_dim of its own, Qwen3 untied with sliding
# layers from max_window_layers on and attention_bias (on q, k, v and o), Phi-3 with its window (Phi-3-mini-4k's is 2047), Phi-3 with partial RoPE
# (Phi-4-mini's 0.75), and Mistral, whose window is now modelled too
TINY = {
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=True, bos_token_id=None)),
    "qwen3_sliding": ("Qwen3Config", dict(num_key_value_heads=1, use_sliding_window=True, sliding_window=WINDOW,
                                          max_window_layers=1, rope_theta=1e6, attention_bias=True)),
    "phi3": ("Phi3Config", dict(num_key_value_heads=2, sliding_window=WINDOW, pad_token_id=0, eos_token_id=2)),
    "phi3_partial_rope": ("Phi3Config", dict(num_key_value_heads=4, partial_rotary_factor=0.75, pad_token_id=0,
                                             eos_token_id=2, tie_word_embeddings=True)),
    "mistral_window": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=WINDOW)),
}


def save_tiny(directory, kind: str, seed: int = 0, **overrides):
    """A random transformers model saved with save_pretrained (transformers 5's config layout), its RMSNorm weights
    and biases random too, so that a swapped or skipped one shows; returns it."""
    import transformers

    config_class, kw = TINY[kind]
    kw = {**dict(vocab_size=LLAMA_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64), **kw, **overrides}
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**kw)
    reference = getattr(transformers, config_class.replace("Config", "ForCausalLM"))(config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    reference.save_pretrained(directory)
    return reference


def hub_layout(config: dict) -> dict:
    """A transformers-5 config.json rewritten as the hub's files are: top-level rope_theta, rope_scaling None,
    Phi-3's partial_rotary_factor at the top, no layer_types (Qwen's follow from max_window_layers)."""
    hub = {k: v for k, v in config.items() if k not in ("rope_parameters", "layer_types", "dtype")}
    rope = dict(config["rope_parameters"])
    hub["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        hub["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    assert rope.pop("rope_type") == "default" and not rope, rope
    hub["rope_scaling"] = None
    hub["torch_dtype"] = config["dtype"]
    return hub


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, directory, save_tiny(directory, request.param)


# -----------------------------------------------------------------------------
# The forward pass, both config layouts, the KV cache and generation, with inputs longer than the window


@torch.no_grad()
def test_logits_match_transformers(tiny):
    kind, directory, reference = tiny
    model = models.load_model(directory)
    assert isinstance(model, llama_model.LlamaForCausalLM)
    ids = random_ids(2, 40, LLAMA_VOCAB)
    assert_close(model(ids), reference(ids).logits, FP32_ATOL, f"{kind} logits")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@torch.no_grad()
def test_half_precision_matches_transformers(tiny, dtype):
    kind, directory, reference = tiny
    model = models.load_model(directory, dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    ids = random_ids(2, 40, LLAMA_VOCAB)
    assert_close(model(ids), copy.deepcopy(reference).to(dtype)(ids).logits, HALF_ATOL[dtype], f"{kind} {dtype}")


@torch.no_grad()
def test_hub_config_layout_loads_the_same_model(tiny, tmp_path):
    kind, directory, _ = tiny
    (tmp_path / "model.safetensors").symlink_to(directory / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(hub_layout(config)))
    ours, theirs = models.load_model(directory), models.load_model(tmp_path)
    assert ours.config == theirs.config, f"{kind}: {ours.config} != {theirs.config}"
    ids = random_ids(1, 30, LLAMA_VOCAB)
    assert torch.equal(ours(ids), theirs(ids)), f"{kind}: the hub layout gives other logits"


def test_cached_logits_equal_the_full_forward(tiny):
    kind, directory, _ = tiny
    assert_cached_logits_equal_the_full_forward(models.load_model(directory), LLAMA_VOCAB, FP32_ATOL, kind)


def test_greedy_generation_matches_transformers(tiny):
    kind, directory, reference = tiny
    assert_greedy_generation_matches(models.load_model(directory), reference, LLAMA_VOCAB, kind)


def test_window_is_the_configs(tmp_path):
    """Which layers slide: every layer of Phi-3 and Mistral; Qwen's from max_window_layers on, or as layer_types
    lists them; none without use_sliding_window."""
    save_tiny(tmp_path, "qwen3_sliding")
    assert [b.self_attn.window for b in models.load_model(tmp_path).blocks] == [None, WINDOW]
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "use_sliding_window": False}))
    assert [b.self_attn.window for b in models.load_model(tmp_path).blocks] == [None, None]
    save_tiny(tmp_path / "phi3", "phi3")
    assert [b.self_attn.window for b in models.load_model(tmp_path / "phi3").blocks] == [WINDOW, WINDOW]


def test_phi3_long_context_rope_is_refused_by_name(tmp_path):
    save_tiny(tmp_path, "phi3")
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                                 "long_factor": [2.0] * 8, "partial_rotary_factor": 1.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(models.UsageError, match="rope_scaling type 'longrope' is not supported"):
        models.load_model(tmp_path)


# -----------------------------------------------------------------------------
# The tokenizers: ids as the checkpoint's fast tokenizer gives them (Qwen3: no BOS; Phi-3: <s>)


@pytest.mark.parametrize("bos", [None, "<s>"], ids=["qwen3", "phi3"])
def test_tokenizer_matches_hf_fast_tokenizer(tmp_path, bos):
    import transformers

    save_llama_tokenizer(tmp_path, bos)
    ours = models.llama_model.load_tokenizer(tmp_path)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    rng = random.Random(2)
    for text in ["Hello, my dog is cute", " two  spaces", "</s> in text", sentence(rng, 25)]:
        assert ours.encode(text) == theirs(text)["input_ids"], text


# -----------------------------------------------------------------------------
# A fused Linear is pruned by its rows: Phi-3's masks equal those of the same weights split as a LLaMA's


def split_twin(phi3: llama_model.LlamaForCausalLM) -> llama_model.LlamaForCausalLM:
    """The LLaMA with Phi-3's weights, qkv_proj split into q/k/v_proj and gate_up_proj into gate/up_proj."""
    c = phi3.config
    config = llama_model.LlamaConfig(**{**c.__dict__, "model_type": "llama", "fused": False})
    twin = llama_model.LlamaForCausalLM(config).requires_grad_(False).eval()
    state = {}
    for key, W in phi3.state_dict().items():
        if "qkv_proj" in key:
            q, k, v = W.split([c.num_attention_heads * c.head_dim] + [c.num_key_value_heads * c.head_dim] * 2)
            state.update({key.replace("qkv", name): part for name, part in zip("qkv", (q, k, v))})
        elif "gate_up_proj" in key:
            gate, up = W.chunk(2)
            state.update({key.replace("gate_up", "gate"): gate, key.replace("gate_up", "up"): up})
        else:
            state[key] = W
    twin.load_state_dict(state, strict=True)
    return twin


def fused_masks(model) -> list[torch.Tensor]:
    """Each block's four masks, q/k/v and gate/up stacked as Phi-3 fuses them, from the weights' zeros."""
    masks = []
    for block in model.blocks:
        linears = {name.split(".")[1]: layer.weight != 0 for name, layer in block.linears().items()}
        if "qkv_proj" not in linears:
            linears = {"qkv_proj": torch.cat([linears["q_proj"], linears["k_proj"], linears["v_proj"]]),
                       "o_proj": linears["o_proj"], "gate_up_proj": torch.cat([linears["gate_proj"],
                                                                               linears["up_proj"]]),
                       "down_proj": linears["down_proj"]}
        masks += [linears[name] for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")]
    return masks


@pytest.fixture(scope="module")
def phi3_and_twin(tmp_path_factory):
    directory = tmp_path_factory.mktemp("phi3-fused")
    save_tiny(directory, "phi3", sliding_window=None, num_hidden_layers=3)
    phi3 = models.load_model(directory)
    return phi3, split_twin(phi3)


@pytest.mark.parametrize("method, kwargs", [("wanda", {}), ("magnitude", dict(group="row")),
                                            ("sparsegpt", dict(nm=(2, 4)))], ids=["wanda", "magnitude-row",
                                                                                  "sparsegpt-2:4"])
def test_fused_linear_prunes_as_its_parts(phi3_and_twin, method, kwargs):
    phi3, twin = (copy.deepcopy(m) for m in phi3_and_twin)
    calib = random_ids(3, 24, LLAMA_VOCAB, seed=8)
    with torch.no_grad():
        assert_close(phi3(calib), twin(calib), FP32_ATOL, "the twin is the same model")
    prune_model(phi3, calib, method, 0.5, progress=False, **kwargs)
    prune_model(twin, calib, method, 0.5, progress=False, **kwargs)
    for i, (fused, parts) in enumerate(zip(fused_masks(phi3), fused_masks(twin))):
        assert n_diff(fused, parts) == 0, f"{method}: Linear {i}: {n_diff(fused, parts)} mask entries differ"
        assert fused.float().mean() < 0.9, f"{method}: Linear {i} was not pruned"


@pytest.mark.parametrize("routing", mumoe.ROUTINGS)
@torch.no_grad()
def test_fused_linear_routes_as_its_parts(phi3_and_twin, routing):
    phi3, twin = phi3_and_twin
    ids, moe = random_ids(2, 20, LLAMA_VOCAB, seed=9), mumoe.MuMoE(0.5, routing=routing)
    chosen_fused, chosen_parts = {}, {}
    fused = mumoe.mumoe_logits(phi3, ids, moe, chosen=chosen_fused)
    parts = mumoe.mumoe_logits(twin, ids, moe, chosen=chosen_parts)
    assert_close(fused, parts, FP32_ATOL, f"{routing}: μ-MoE logits of Phi-3 vs its split twin")
    for b in range(2):
        for model, chosen in ((phi3, chosen_fused), (twin, chosen_parts)):
            for layer in mumoe.linear_names(model):
                layer.weight.data, kept = chosen[layer][b], layer.weight.data  # prompt b's experts, for a moment
                chosen[layer][b] = kept
        masks = list(zip(fused_masks(phi3), fused_masks(twin)))
        for model, chosen in ((phi3, chosen_fused), (twin, chosen_parts)):  # the dense weights back
            for layer in mumoe.linear_names(model):
                layer.weight.data, chosen[layer][b] = chosen[layer][b], layer.weight.data
        for i, (a, c) in enumerate(masks):
            assert n_diff(a, c) == 0, f"{routing}: prompt {b}, Linear {i}: {n_diff(a, c)} expert entries differ"
            assert a.float().mean() < 0.9, f"{routing}: Linear {i} kept everything"


# -----------------------------------------------------------------------------
# The pruners on Qwen3 and Phi-3 against the published algorithms on hooked statistics


@pytest.mark.parametrize("kind", ["qwen3", "phi3"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_prune_model_equals_the_algorithms_on_hooked_statistics(tmp_path, kind, method):
    reference = save_tiny(tmp_path, kind)
    model, calib_ids = models.load_model(tmp_path), random_ids(4, 24, LLAMA_VOCAB, seed=12)  # 24 > the window
    original = {k: v.clone() for k, v in model.state_dict().items()}
    prune_model(model, calib_ids, method, 0.5, progress=False)
    assert_pruned_as_the_algorithms(original, model.state_dict(), reference, calib_ids, method, 0.5,
                                    list(model.blocks[0].linears()), kind)
