"""LLaMA, self-contained: config, decoder, loading and tokenizer (Llama 1/2/3, Vicuna, Mistral, Qwen2, Qwen3, Phi-3).

This file owns the LLaMA family, a from-scratch re-implementation of Meta's LLaMA decoder (Touvron et al.,
2023) that reproduces Hugging Face's `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`,
`Qwen3ForCausalLM` and `Phi3ForCausalLM` logits on the same weights, without importing transformers. It offers the
interface of `checkpoint.py`, as `opt_model.py` does, so that the pruners and μ-MoE run on it unchanged.

    embed:  h = embed_tokens(ids)                                 (no learned positions: RoPE, below)
    block:  h = h + o_proj(attn(RMSNorm(h)))                      q, k rotated by their position
            h = h + down_proj(silu(gate_proj(RMSNorm(h))) * up_proj(RMSNorm(h)))       the SwiGLU MLP
    head:   logits = lm_head(RMSNorm(h))                          (tied to embed_tokens in small Qwen2s)

    RMSNorm(x) = weight * x / sqrt(mean(x²) + eps), computed in float32
    RoPE       (Su et al. 2021) the pair (x_i, x_{i + hs/2}) of each head at position p turns by the angle
               p * theta^(-2i / hs), i < hs/2 -- the rotate-half layout of the hub's checkpoints; `rope_scaling`
               "linear" divides every frequency by `factor`, "llama3" (Llama 3.1) divides the low ones only
    GQA        (Ainslie et al. 2023) num_key_value_heads <= num_attention_heads: each k/v head serves
               n_head / n_kv query heads

The families differ only in their config:

    Qwen2      biases on q, k and v
    Qwen3      no biases (but where attention_bias says); an RMSNorm over each head's features of q and of k (q_norm, k_norm) before RoPE;
               head_dim independent of hidden_size / heads
    Phi-3      q, k, v fused in one Linear `qkv_proj` (rows: nh*hs of q, then n_kv*hs of k, then of v) and gate,
               up in `gate_up_proj` (rows: f of gate, then f of up), kept fused as the checkpoint has them and
               split in the forward; RoPE on the first `partial_rotary_factor` of each head's features (Phi-4-mini
               0.75); its long-context `rope_scaling` (longrope, su) is refused by name
    Mistral    v0.1 and Phi-3 attend within a sliding window (`sliding_window` keys: a token at position p sees the
               keys p - window + 1 ... p); Qwen2/3 only where `use_sliding_window` says, on the layers from
               `max_window_layers` on (`layer_types` where the file lists them)

A fused Linear is one Linear to every method, as it is to the references (which hook every nn.Linear):
`block.linears()` returns the checkpoint's modules. Where a method scores and selects each row on its own --
Wanda and μ-MoE (|W_ij| * ||X_j||, a per-row top-k), magnitude with per-row groups, SparseGPT with N:M (the rows
share one H, their updates are row-local) -- a fused Linear's mask is its parts' masks stacked (test_families
checks it). Magnitude's per-matrix threshold and unstructured SparseGPT's per-column-block threshold span all rows
of the Linear, so there a fused Linear's mask differs from its parts', as it does in the references. Llama 3,
Qwen2/3 and Phi-3 have other tokenizers. `config.json` comes in two layouts, both read: the hub's (top-level
`rope_theta` and `rope_scaling`, older files without `rope_theta`) and the one transformers 5 writes
(`rope_parameters`).
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import (KVCache, LinearFn, Tokenizer, UsageError, check_device, check_dtype, dense_linear,
                        empty_modules, load_weights, read_config_json, resolve_checkpoint, shifted_causal_mask)

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
ROPE_TYPES = ("default", "linear", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
DEFAULT_ROPE_THETA = 10000.0  # LLaMA-1's and Llama-2's, which their config.json files leave out
ACTIVATIONS = {"silu": F.silu}


# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class LlamaConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = DEFAULT_ROPE_THETA
    rope_scaling: tuple = ()  # ((key, value), ...) of the rope_scaling dict, rope_type first; () for none
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: True
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral v0.1: 4096; Phi-3-mini-4k: 2047
    layer_types: tuple = ()  # "sliding_attention" / "full_attention" per layer; () with a window: every layer slides
    qk_norm: bool = False  # Qwen3: q_norm, k_norm
    fused: bool = False  # Phi-3: qkv_proj, gate_up_proj
    partial_rotary_factor: float = 1.0  # the share of each head's features that RoPE turns (Phi-4-mini: 0.75)
    bos_token_id: int | None = 1
    eos_token_id: int | tuple | None = 2  # Llama 3 instruct lists several

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise UsageError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise UsageError(f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        if self.rotary_dim % 2:
            raise UsageError(f"the rotary dimension {self.rotary_dim} is odd: rotary embeddings turn pairs of features")
        if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
            raise UsageError(f"layer_types lists {len(self.layer_types)} layers, num_hidden_layers is "
                             f"{self.num_hidden_layers}")
        scaling = dict(self.rope_scaling)
        if scaling and scaling["rope_type"] not in ROPE_TYPES:
            raise UsageError(f"rope_scaling type {scaling['rope_type']!r} is not supported "
                             f"(supported: {', '.join(ROPE_TYPES)})")
        needed = {"linear": ("factor",), "llama3": LLAMA3_ROPE_KEYS}.get(scaling.get("rope_type"), ())
        for key in needed:
            if key not in scaling:
                raise UsageError(f"rope_scaling of type {scaling['rope_type']!r} needs {key!r}")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def window(self, layer: int) -> int | None:
        """The sliding attention window of layer `layer`, None where it attends to every earlier token."""
        if self.sliding_window is None or (self.layer_types and self.layer_types[layer] != "sliding_attention"):
            return None
        return self.sliding_window

    @classmethod
    def from_json(cls, path) -> "LlamaConfig":
        """Read a Hugging Face `config.json` of either layout; keys we do not model (dropout, init) are ignored."""
        return cls.from_dict(read_config_json(path), path)

    @classmethod
    def from_dict(cls, raw: dict, path) -> "LlamaConfig":
        """The config of a `config.json`'s dict (`path` names it in errors); LLaVA's text_config is one."""
        model_type = raw.get("model_type")
        if model_type not in MODEL_TYPES:
            raise UsageError(f"{path} describes a {model_type!r} model, not one of {', '.join(MODEL_TYPES)}")
        heads = raw["num_attention_heads"]
        if "rope_parameters" in raw:  # transformers 5: {"rope_type": ..., "rope_theta": ..., "factor": ...}
            rope = dict(raw["rope_parameters"] or {})
            theta = rope.pop("rope_theta", DEFAULT_ROPE_THETA)
        else:  # the hub: top-level rope_theta (absent in LLaMA-1/2 files), rope_scaling None or a dict
            rope, theta = dict(raw.get("rope_scaling") or {}), raw.get("rope_theta", DEFAULT_ROPE_THETA)
        partial = rope.pop("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))  # Phi-3: 5 moves it
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))  # older files say "type"
        rope_scaling = () if rope_type == "default" else (("rope_type", rope_type), *sorted(rope.items()))
        layers, layer_types = raw["num_hidden_layers"], tuple(raw.get("layer_types") or ())
        if model_type in ("qwen2", "qwen3"):  # a window only with use_sliding_window, from max_window_layers on
            qkv_bias = o_bias = raw.get("attention_bias", False)  # Qwen3: all four or none
            if model_type == "qwen2":  # biases on q, k, v only
                qkv_bias, o_bias = True, False
            window = raw.get("sliding_window") if raw.get("use_sliding_window") else None
            if window is not None and not layer_types:
                first = raw.get("max_window_layers", layers)
                layer_types = tuple("sliding_attention" if i >= first else "full_attention" for i in range(layers))
        else:
            qkv_bias = o_bias = raw.get("attention_bias", False)
            window = raw.get("sliding_window") if model_type in ("mistral", "phi3") else None
        if window is None:  # transformers 5 lists "full_attention" for every layer: the same as none listed
            layer_types = ()
        eos = raw.get("eos_token_id", 2)
        return cls(model_type=model_type, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
                   intermediate_size=raw["intermediate_size"], num_hidden_layers=raw["num_hidden_layers"],
                   num_attention_heads=heads, num_key_value_heads=raw.get("num_key_value_heads") or heads,
                   head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
                   hidden_act=raw.get("hidden_act", "silu"),
                   max_position_embeddings=raw["max_position_embeddings"],
                   rms_norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=rope_scaling,
                   tie_word_embeddings=raw.get("tie_word_embeddings", False), qkv_bias=qkv_bias, o_bias=o_bias,
                   mlp_bias=raw.get("mlp_bias", False), sliding_window=window, layer_types=layer_types,
                   qk_norm=model_type == "qwen3", fused=model_type == "phi3", partial_rotary_factor=float(partial),
                   bos_token_id=raw.get("bos_token_id"), eos_token_id=tuple(eos) if isinstance(eos, list) else eos)


# -----------------------------------------------------------------------------
# Rotary position embeddings


def rope_frequencies(config: LlamaConfig) -> torch.Tensor:
    """The hs/2 angular frequencies theta^(-2i / hs) of the rotary embedding, rescaled as `rope_scaling` says
    (hs: the rotary dimension, head_dim but where `partial_rotary_factor` turns fewer features)."""
    return inverse_frequencies(config.rotary_dim, config.rope_theta, dict(config.rope_scaling))


def inverse_frequencies(hs: int, theta: float, scaling: dict) -> torch.Tensor:
    """theta^(-2i / hs), i < hs/2, rescaled as the `rope_scaling` dict says (gemma_model.py's layers too)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, hs, 2, dtype=torch.float, device="cpu") / hs)
    if scaling.get("rope_type") == "linear":  # positions p / factor: every frequency slowed alike
        return inv_freq / scaling["factor"]
    if scaling.get("rope_type") == "llama3":
        # Llama 3.1: wavelengths longer than the pre-training context / low_freq_factor are slowed by `factor`,
        # shorter than context / high_freq_factor kept, and those between interpolated smoothly
        factor, context = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * torch.pi / inv_freq
        slowed = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelen - low) / (high - low)
        between = ~(wavelen < context / high) & ~(wavelen > context / low)
        return torch.where(between, (1 - smooth) * slowed / factor + smooth * slowed, slowed)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hs) rotated by the angles of its positions: cos, sin (T, rd); the features past the rotary
    dimension rd (Phi-3's partial_rotary_factor < 1) pass unturned."""
    rd = cos.shape[-1]
    if rd < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :rd], cos, sin), x[..., rd:]), dim=-1)
    return x * cos + rotate_half(x) * sin


# -----------------------------------------------------------------------------
# Model


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # the mean square in float32 whatever the model's dtype, as the reference does
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int = 0):
        super().__init__()
        d, hs = config.hidden_size, config.head_dim
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hs
        self.window = config.window(layer)
        if config.fused:  # Phi-3: one Linear, its rows q's, then k's, then v's
            self.qkv_proj = nn.Linear(d, (self.n_head + 2 * self.n_kv) * hs, bias=config.qkv_bias)
        else:
            self.q_proj = nn.Linear(d, self.n_head * hs, bias=config.qkv_bias)
            self.k_proj = nn.Linear(d, self.n_kv * hs, bias=config.qkv_bias)
            self.v_proj = nn.Linear(d, self.n_kv * hs, bias=config.qkv_bias)
        if config.qk_norm:  # Qwen3: each head's q and k features normed, one weight shared by the heads
            self.q_norm = RMSNorm(hs, config.rms_norm_eps)
            self.k_norm = RMSNorm(hs, config.rms_norm_eps)
        self.o_proj = nn.Linear(self.n_head * hs, d, bias=config.o_bias)
        # computed from the config, never loaded; float32 whatever the model's dtype, and moved with the block
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)

    def rotary(self, start: int, T: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, hs) of the angles p * inv_freq at positions start ... start + T - 1."""
        positions = torch.arange(start, start + T, device=self.inv_freq.device, dtype=torch.float)
        angles = positions[:, None] * self.inv_freq  # (T, hs/2), in float32
        angles = torch.cat((angles, angles), dim=-1)  # (T, hs): the rotate-half layout pairs i with i + hs/2
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, x: torch.Tensor, linear: LinearFn = dense_linear, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        hs = self.head_dim
        if hasattr(self, "qkv_proj"):
            q, k, v = linear(self.qkv_proj, x).split([self.n_head * hs, self.n_kv * hs, self.n_kv * hs], dim=-1)
        else:
            q, k, v = linear(self.q_proj, x), linear(self.k_proj, x), linear(self.v_proj, x)
        q, k = q.view(B, T, self.n_head, hs), k.view(B, T, self.n_kv, hs)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hs), (B, n_kv, T, hs)
        v = v.view(B, T, self.n_kv, hs).transpose(1, 2)
        start = cache.length if cache is not None else 0  # tokens before these, whose keys and values are cached
        cos, sin = self.rotary(start, T, x.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, n_kv, start + T, hs): the earlier tokens' keys and values too
        # y = softmax(q k^T / sqrt(hs) + mask) v, each k/v head shared by n_head / n_kv query heads; the mask -inf
        # where a key comes after its query, or `window` or more positions before it (checkpoint.shifted_causal_mask)
        mask = shifted_causal_mask(T, start, q.device, self.window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv != self.n_head)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * hs)  # (B, T, nh * hs)
        return linear(self.o_proj, y)


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        if config.fused:  # Phi-3: one Linear, its rows gate's, then up's
            self.gate_up_proj = nn.Linear(d, 2 * f, bias=bias)
        else:
            self.gate_proj = nn.Linear(d, f, bias=bias)
            self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        self.activation = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor, linear: LinearFn = dense_linear) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = linear(self.gate_up_proj, x).chunk(2, dim=-1)
        else:
            gate, up = linear(self.gate_proj, x), linear(self.up_proj, x)
        return linear(self.down_proj, self.activation(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int = 0):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def linears(self) -> dict[str, nn.Linear]:
        """The prunable Linears, by checkpoint name, in the order the forward pass uses them: seven, or Phi-3's four
        (qkv_proj, o_proj, gate_up_proj, down_proj), each fused Linear one Linear to the methods, pruned by rows."""
        attn, mlp = self.self_attn, self.mlp
        if hasattr(attn, "qkv_proj"):
            return {"self_attn.qkv_proj": attn.qkv_proj, "self_attn.o_proj": attn.o_proj,
                    "mlp.gate_up_proj": mlp.gate_up_proj, "mlp.down_proj": mlp.down_proj}
        return {"self_attn.q_proj": attn.q_proj, "self_attn.k_proj": attn.k_proj, "self_attn.v_proj": attn.v_proj,
                "self_attn.o_proj": attn.o_proj, "mlp.gate_proj": mlp.gate_proj, "mlp.up_proj": mlp.up_proj,
                "mlp.down_proj": mlp.down_proj}

    def forward(self, x: torch.Tensor, linear: LinearFn = dense_linear, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), linear, cache)
        return x + self.mlp(self.post_attention_layernorm(x), linear)


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    blocks_key = "model.layers"  # the blocks' name in the checkpoint

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def outer_modules(self) -> list[nn.Module]:
        """Everything but the decoder blocks: embeddings, the final RMSNorm, lm_head."""
        return [self.model.embed_tokens, self.model.norm, self.lm_head]

    def embed(self, input_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Token ids (B, T) at positions start ... start + T - 1 -> hidden states (B, T, hidden) entering the first
        block. The positions enter each block's attention (RoPE), from its cache's length; here they are checked."""
        self.check_length(start + input_ids.shape[1])
        return self.model.embed_tokens(input_ids)

    def check_length(self, tokens: int) -> None:
        c = self.config
        if tokens > c.max_position_embeddings:
            raise UsageError(f"{tokens} tokens exceed max_position_embeddings={c.max_position_embeddings}")

    def head(self, x: torch.Tensor, linear: LinearFn = dense_linear) -> torch.Tensor:
        """Hidden states (B, T, hidden) leaving the last block -> logits (B, T, vocab), lm_head run by `linear`."""
        return linear(self.lm_head, self.model.norm(x))

    def new_cache(self, capacity: int, batch: int = 1) -> list[KVCache]:
        """An empty KV cache for up to `capacity` tokens per sequence: one KVCache per block."""
        self.check_length(capacity)
        c, W = self.config, self.lm_head.weight
        return [KVCache(batch, c.num_key_value_heads, capacity, c.head_dim, W.device, W.dtype) for _ in self.blocks]

    def forward(self, input_ids: torch.Tensor, linear: LinearFn = dense_linear,
                cache: list[KVCache] | None = None, head_linear: LinearFn = dense_linear) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab). With a cache (`new_cache`), input_ids are the tokens that
        follow the cached ones (all of the prompt first, then one token per call) and join the cache. `linear` runs
        the blocks' Linears, `head_linear` lm_head (dense either way unless given)."""
        x = self.embed(input_ids, cache[0].length if cache else 0)
        for i, block in enumerate(self.blocks):
            x = block(x, linear, cache[i] if cache else None)
        return self.head(x, head_linear)


# -----------------------------------------------------------------------------
# Loading

FAMILY, CONFIG_CLASS, MODEL_CLASS = "llama", LlamaConfig, LlamaForCausalLM  # what models.py builds for MODEL_TYPES
read_config = LlamaConfig.from_json


def checkpoint_name(key: str) -> str | None:
    """A checkpoint key -> the model's; None for the rotary inv_freq that older .bin conversions stored (the
    model computes it from the config)."""
    return None if key.endswith("rotary_emb.inv_freq") else key


def load_model(name_or_path, device="cpu", dtype=torch.float32) -> LlamaForCausalLM:
    """Build a LLaMA-family model from a checkpoint, strictly: every key is used, none is missing, every shape
    matches. Built on the meta device, the checkpoint's tensors assigned straight into it."""
    device = check_device(device)
    check_dtype(dtype)
    directory = resolve_checkpoint(str(name_or_path))
    config = LlamaConfig.from_json(directory / "config.json")
    with empty_modules():
        model = LlamaForCausalLM(config)
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if config.tie_word_embeddings else {}
    load_weights(model, directory, checkpoint_name, device, dtype, tied)
    return model.to(device)  # the rotary frequencies, computed on the CPU, join the weights


def load_tokenizer(name_or_path) -> Tokenizer:
    """The checkpoint's tokenizer.json, BOS added by its own post-processor exactly as Hugging Face's fast
    tokenizer adds it (Llama 2 and Mistral `<s>`, Llama 3 `<|begin_of_text|>`, Qwen2 none)."""
    from tokenizers import Tokenizer as BPE

    path = Path(name_or_path).expanduser()
    directory = path if path.is_dir() else resolve_checkpoint(str(name_or_path))
    if not (directory / "tokenizer.json").is_file():
        raise UsageError(f"{directory} has no tokenizer: expected tokenizer.json (a sentencepiece tokenizer.model "
                         "alone is not read; transformers' LlamaTokenizerFast can convert it and save tokenizer.json)")
    return Tokenizer(BPE.from_file(str(directory / "tokenizer.json")))
