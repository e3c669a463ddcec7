"""Gemma 3, self-contained: config, decoder and loading of Google's Gemma 3 text models (`gemma3_text`), and of the
language model inside a `gemma3` (vision-language) checkpoint.

Gemma 3 (Gemma Team, 2025) is a LLaMA-like decoder that differs in its details; this file reproduces Hugging
Face's `Gemma3ForCausalLM` logits on the same weights, without importing transformers, and offers the interface of
`checkpoint.py` (as `llama_model.py` does), so that the pruners and μ-MoE run on it unchanged. What it shares with
the LLaMA family (the rotary frequencies and rotation, the tokenizer.json reader) is llama_model.py's.

    embed:  h = embed_tokens(ids) * sqrt(hidden)        the scale rounded to the model's dtype, as the reference
    block:  h = h + post_attention_layernorm(o_proj(attn(input_layernorm(h))))
            h = h + post_feedforward_layernorm(down_proj(gelu_tanh(gate_proj(g)) * up_proj(g))),
                g = pre_feedforward_layernorm(h)                                 four norms a block, GeGLU MLP
    head:   logits = lm_head(norm(h))                   tied to embed_tokens; cap * tanh(logits / cap) where
                                                        final_logit_softcapping is set

    RMSNorm(x) = x / sqrt(mean(x²) + eps) * (1 + weight), all in float32 (the checkpoint stores weight - 1)
    attn       q and k normed per head (q_norm, k_norm, RMSNorms as above over head_dim) before RoPE;
               softmax(q k^T * query_pre_attn_scalar^-1/2 + mask) v, grouped-query heads. Gemma 2's
               attn_logit_softcapping is null in every Gemma 3 file and transformers' Gemma3 ignores it: a file
               that sets it is refused rather than run two ways
    layers     `layer_types`: "sliding_attention" layers (5 of every 6) see the last `sliding_window` keys and
               turn by their own RoPE base (rope_local_base_freq, 10000); "full_attention" layers see every key
               and turn by rope_theta (1e6), with `rope_scaling` (linear, factor 8, in the 4B and larger models)

`config.json` comes in two layouts, both read: the hub's (top-level `rope_theta`, `rope_local_base_freq`,
`rope_scaling` for the full layers, `sliding_window_pattern` where `layer_types` is absent) and the one
transformers 5 writes (`rope_parameters` per layer type). A `gemma3` checkpoint's `text_config` is read, its
language model's weights loaded and its vision tower and projector skipped; `use_bidirectional_attention` (an
encoder's setting) is refused.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import llama_model
from checkpoint import (KVCache, LinearFn, UsageError, check_device, check_dtype, dense_linear, empty_modules,
                        load_weights, read_config_json, resolve_checkpoint, shifted_causal_mask)
from llama_model import ROPE_TYPES, apply_rotary, inverse_frequencies

MODEL_TYPES = ("gemma3_text", "gemma3")
LAYER_TYPES = ("sliding_attention", "full_attention")
ACTIVATIONS = {"gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
SLIDING_WINDOW_PATTERN = 6  # older hub files: every 6th layer attends fully, the others slide
DEFAULT_ROPE_THETA = {"full_attention": 1e6, "sliding_attention": 1e4}  # Gemma 3's, where a file leaves them out


# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class Gemma3Config:
    model_type: str = "gemma3_text"
    vocab_size: int = 262208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256
    sliding_window: int = 4096
    layer_types: tuple = ()  # "sliding_attention" / "full_attention", one per layer
    rope: tuple = ()  # ((layer_type, rope_theta, rope_scaling), ...): rope_scaling as llama_model's, () for none
    final_logit_softcapping: float | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: int | tuple | None = 1

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise UsageError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.hidden_activation not in ACTIVATIONS:
            raise UsageError(f"hidden_activation {self.hidden_activation!r} is not one of {sorted(ACTIVATIONS)}")
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_TYPES):
            raise UsageError(f"layer_types {list(self.layer_types)} is not one of {LAYER_TYPES} for each of the "
                             f"{self.num_hidden_layers} layers")
        for layer_type, _, scaling in self.rope:
            rope_type = dict(scaling).get("rope_type", "default")
            if rope_type not in ROPE_TYPES:
                raise UsageError(f"rope_scaling type {rope_type!r} of the {layer_type} layers is not supported "
                                 f"(supported: {', '.join(ROPE_TYPES)})")

    @classmethod
    def from_json(cls, path) -> "Gemma3Config":
        return cls.from_dict(read_config_json(path), path)

    @classmethod
    def from_dict(cls, raw: dict, path) -> "Gemma3Config":
        """The config of a `config.json`'s dict, of either layout; a `gemma3` checkpoint's text_config."""
        if raw.get("model_type") == "gemma3":
            if not isinstance(raw.get("text_config"), dict):
                raise UsageError(f"{path} is a gemma3 checkpoint without a text_config: no language model to run")
            raw = {"model_type": "gemma3_text", **raw["text_config"]}
        if raw.get("model_type") != "gemma3_text":
            raise UsageError(f"{path} describes a {raw.get('model_type')!r} model, not one of {', '.join(MODEL_TYPES)}")
        if raw.get("attn_logit_softcapping") is not None:
            raise UsageError(f"{path}: attn_logit_softcapping {raw['attn_logit_softcapping']} is not supported "
                             "(Gemma 3's is null; transformers' Gemma3 ignores it)")
        if raw.get("use_bidirectional_attention"):
            raise UsageError(f"{path}: use_bidirectional_attention (an encoder's attention) is not supported")
        layers = raw["num_hidden_layers"]
        pattern = raw.get("sliding_window_pattern", SLIDING_WINDOW_PATTERN)
        layer_types = raw.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                                 for i in range(layers)]
        if "rope_parameters" in raw:  # transformers 5: {layer_type: {"rope_type": ..., "rope_theta": ...}}
            params = {t: dict(raw["rope_parameters"].get(t) or {}) for t in LAYER_TYPES}
        else:  # the hub: rope_scaling and rope_theta for the full layers, rope_local_base_freq for the sliding ones
            params = {"full_attention": {**(raw.get("rope_scaling") or {}), "rope_theta": raw.get("rope_theta")},
                      "sliding_attention": {"rope_theta": raw.get("rope_local_base_freq")}}
        rope = []
        for layer_type in LAYER_TYPES:
            p = params[layer_type]
            theta = p.pop("rope_theta", None) or DEFAULT_ROPE_THETA[layer_type]
            rope_type = p.pop("rope_type", p.pop("type", "default"))
            scaling = () if rope_type == "default" else (("rope_type", rope_type), *sorted(p.items()))
            rope.append((layer_type, float(theta), scaling))
        heads, eos = raw["num_attention_heads"], raw.get("eos_token_id", 1)
        return cls(vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
                   intermediate_size=raw["intermediate_size"], num_hidden_layers=layers, num_attention_heads=heads,
                   num_key_value_heads=raw.get("num_key_value_heads") or heads, head_dim=raw.get("head_dim", 256),
                   hidden_activation=raw.get("hidden_activation", "gelu_pytorch_tanh"),
                   max_position_embeddings=raw.get("max_position_embeddings", 131072),
                   rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
                   query_pre_attn_scalar=raw.get("query_pre_attn_scalar", 256),
                   sliding_window=raw.get("sliding_window", 4096), layer_types=tuple(layer_types), rope=tuple(rope),
                   final_logit_softcapping=raw.get("final_logit_softcapping"),
                   attention_bias=raw.get("attention_bias", False),
                   tie_word_embeddings=raw.get("tie_word_embeddings", True), bos_token_id=raw.get("bos_token_id"),
                   eos_token_id=tuple(eos) if isinstance(eos, list) else eos)


# -----------------------------------------------------------------------------
# Model


class Gemma3RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # (1 + weight) applied in float32 too, then rounded once: Llama rounds before the weight
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap): x squashed smoothly into (-cap, cap); x itself where cap is None."""
    return x if cap is None else cap * torch.tanh(x / cap)


class Gemma3Attention(nn.Module):
    def __init__(self, config: Gemma3Config, layer: int):
        super().__init__()
        d, hs, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hs
        layer_type = config.layer_types[layer]
        self.window = config.sliding_window if layer_type == "sliding_attention" else None
        self.scale = config.query_pre_attn_scalar ** -0.5
        self.q_proj = nn.Linear(d, self.n_head * hs, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * hs, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * hs, bias=bias)
        self.o_proj = nn.Linear(self.n_head * hs, d, bias=bias)
        self.q_norm = Gemma3RMSNorm(hs, config.rms_norm_eps)
        self.k_norm = Gemma3RMSNorm(hs, config.rms_norm_eps)
        _, theta, scaling = next(r for r in config.rope if r[0] == layer_type)  # this layer type's RoPE
        self.register_buffer("inv_freq", inverse_frequencies(hs, theta, dict(scaling)), persistent=False)

    rotary = llama_model.LlamaAttention.rotary  # cos, sin (T, hs) at positions start ... start + T - 1

    def forward(self, x: torch.Tensor, linear: LinearFn = dense_linear, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        hs = self.head_dim
        q = self.q_norm(linear(self.q_proj, x).view(B, T, self.n_head, hs)).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_norm(linear(self.k_proj, x).view(B, T, self.n_kv, hs)).transpose(1, 2)  # (B, n_kv, T, hs)
        v = linear(self.v_proj, x).view(B, T, self.n_kv, hs).transpose(1, 2)
        start = cache.length if cache is not None else 0
        cos, sin = self.rotary(start, T, x.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, n_kv, start + T, hs)
        # y = softmax(q k^T * scale + mask) v, the mask -inf where a key comes after its query or, in a sliding
        # layer, `window` or more positions before it
        mask = shifted_causal_mask(T, start, q.device, self.window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           scale=self.scale, enable_gqa=self.n_kv != self.n_head)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * hs)  # (B, T, nh * hs)
        return linear(self.o_proj, y)


class Gemma3MLP(nn.Module):
    def __init__(self, config: Gemma3Config):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.activation = ACTIVATIONS[config.hidden_activation]

    def forward(self, x: torch.Tensor, linear: LinearFn = dense_linear) -> torch.Tensor:
        return linear(self.down_proj, self.activation(linear(self.gate_proj, x)) * linear(self.up_proj, x))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: Gemma3Config, layer: int):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Gemma3Attention(config, layer)
        self.mlp = Gemma3MLP(config)
        self.input_layernorm = Gemma3RMSNorm(d, eps)
        self.post_attention_layernorm = Gemma3RMSNorm(d, eps)
        self.pre_feedforward_layernorm = Gemma3RMSNorm(d, eps)
        self.post_feedforward_layernorm = Gemma3RMSNorm(d, eps)

    linears = llama_model.LlamaDecoderLayer.linears  # the seven Linears, named as LLaMA's

    def forward(self, x: torch.Tensor, linear: LinearFn = dense_linear, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), linear, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), linear))


class Gemma3TextModel(nn.Module):
    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Gemma3RMSNorm(config.hidden_size, config.rms_norm_eps)


class Gemma3ForCausalLM(nn.Module):
    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.config = config
        self.model = Gemma3TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    blocks_key = "model.layers"
    blocks = llama_model.LlamaForCausalLM.blocks
    outer_modules = llama_model.LlamaForCausalLM.outer_modules
    check_length = llama_model.LlamaForCausalLM.check_length
    new_cache = llama_model.LlamaForCausalLM.new_cache
    forward = llama_model.LlamaForCausalLM.forward

    def embed(self, input_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Token ids (B, T) at positions start ... -> hidden states (B, T, hidden), scaled by sqrt(hidden) rounded to
        the weights' dtype (in bfloat16 sqrt(2304) = 48 exactly, sqrt(3072) = 55.5, not 55.4256), as the reference."""
        self.check_length(start + input_ids.shape[1])
        W = self.model.embed_tokens.weight
        return self.model.embed_tokens(input_ids) * torch.tensor(self.config.hidden_size ** 0.5, dtype=W.dtype)

    def head(self, x: torch.Tensor, linear: LinearFn = dense_linear) -> torch.Tensor:
        return softcap(linear(self.lm_head, self.model.norm(x)), self.config.final_logit_softcapping)


# -----------------------------------------------------------------------------
# Loading

FAMILY, CONFIG_CLASS, MODEL_CLASS = "llama", Gemma3Config, Gemma3ForCausalLM  # the LLaMA protocol's defaults
read_config = Gemma3Config.from_json
load_tokenizer = llama_model.load_tokenizer  # tokenizer.json; its post-processor adds <bos>
LANGUAGE_MODEL_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",  # gemma3 layouts
                           "language_model.lm_head.": "lm_head."}
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def checkpoint_name(key: str) -> str | None:
    """A checkpoint key -> the model's: a `gemma3` checkpoint's language model keys renamed (transformers 4's
    `language_model.model.*`, 5's `model.language_model.*`), its vision tower and projector skipped (None)."""
    if key.startswith(VISION_PREFIXES):
        return None
    for prefix, ours in LANGUAGE_MODEL_PREFIXES.items():
        if key.startswith(prefix):
            return ours + key.removeprefix(prefix)
    return key


def load_model(name_or_path, device="cpu", dtype=torch.float32) -> Gemma3ForCausalLM:
    """Build a Gemma 3 text model from a checkpoint, strictly (every key used, none missing, every shape checked)."""
    device = check_device(device)
    check_dtype(dtype)
    directory = resolve_checkpoint(str(name_or_path))
    config = Gemma3Config.from_json(directory / "config.json")
    with empty_modules():
        model = Gemma3ForCausalLM(config)
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if config.tie_word_embeddings else {}
    load_weights(model, directory, checkpoint_name, device, dtype, tied)
    return model.to(device)
