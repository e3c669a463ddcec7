"""OPT, self-contained: config, decoder, safetensors loading and the BPE tokenizer.

This file owns the dense model that every other file prunes. It is a from-scratch re-implementation of
Meta's OPT decoder (Zhang et al., 2022, "OPT: Open Pre-trained Transformer Language Models") that
reproduces Hugging Face's `OPTForCausalLM` logits on the same weights, without importing transformers.

    embed:  h = embed_tokens(ids) [-> project_in] + embed_positions(pos + 2)
    block:  h = h + out_proj(attn(LN(h)))        (pre-LN: 125m, 1.3b ... 66b)
            h = h + fc2(relu(fc1(LN(h))))
            (350m is post-LN: LN is applied after each residual sum instead)
    head:   logits = [final_layer_norm] [-> project_out] h @ embed_tokens.weight^T

Every Linear inside a block is called through `linear(layer, x)`, a function the caller may replace:
the pruners use it to gather calibration statistics, μ-MoE uses it to route each prompt to its own
micro-experts. The dense default is `dense_linear`.

Decoding: a `KVCache` per block keeps the keys and values of every token seen so far, so that each new
token computes only its own row of every product: `model(prompt, cache=cache)`, then
`model(next_token, cache=cache)`, its position continuing where the cache ends.

The interface every model family offers (embed, blocks, head, new_cache, ...) and the loading code the
families share live in `checkpoint.py`, below this file.
"""

from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import (KVCache, LinearFn, Tokenizer, UsageError, check_device, check_dtype, dense_linear,
                        empty_modules, load_weights, read_config_json, resolve_checkpoint, shifted_causal_mask)


# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class OPTConfig:
    hidden_size: int = 768
    ffn_dim: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    vocab_size: int = 50272
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int = 768  # 350m embeds in 512 dims and projects in/out of its 1024 hidden
    do_layer_norm_before: bool = True  # False only for 350m (post-LN)
    _remove_final_layer_norm: bool = False  # legacy metaseq checkpoints fine-tuned before transformers 4.20.1
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation_function: str = "relu"
    bos_token_id: int = 2
    eos_token_id: int = 2  # </s> is both
    pad_token_id: int = 1

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise UsageError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.activation_function not in ACTIVATIONS:
            raise UsageError(f"activation_function {self.activation_function!r} is not one of {sorted(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self._remove_final_layer_norm

    @property
    def projects_embeddings(self) -> bool:
        return self.word_embed_proj_dim != self.hidden_size

    @classmethod
    def from_json(cls, path) -> "OPTConfig":
        """Read a Hugging Face `config.json`; keys we do not model (dropout, init_std, ...) are ignored."""
        raw = read_config_json(path)
        if raw.get("model_type", "opt") != "opt":
            raise UsageError(f"{path} describes a {raw['model_type']!r} model, not OPT")
        known = {f.name for f in fields(cls)}
        if "word_embed_proj_dim" not in raw and "hidden_size" in raw:  # HF defaults it to hidden_size
            raw["word_embed_proj_dim"] = raw["hidden_size"]
        return cls(**{k: v for k, v in raw.items() if k in known})


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}

# OPT's learned positions were trained with fairseq's padding offset: position p is row p + 2.
POSITION_OFFSET = 2


# -----------------------------------------------------------------------------
# Model

class OPTAttention(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        d = config.hidden_size
        self.n_head = config.num_attention_heads
        self.scaling = config.head_dim ** -0.5
        self.k_proj = nn.Linear(d, d, bias=config.enable_bias)
        self.v_proj = nn.Linear(d, d, bias=config.enable_bias)
        self.q_proj = nn.Linear(d, d, bias=config.enable_bias)
        self.out_proj = nn.Linear(d, d, bias=config.enable_bias)

    def forward(self, x: torch.Tensor, linear: LinearFn = dense_linear, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        # OPT scales q before the dot product (not the scores), as metaseq and transformers do
        q = linear(self.q_proj, x) * self.scaling
        k = linear(self.k_proj, x)
        v = linear(self.v_proj, x)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        start = 0  # tokens before these, whose keys and values wait in the cache
        if cache is not None:
            start = cache.length
            k, v = cache.append(k, v)  # (B, nh, start + T, hs): the earlier tokens' keys and values too
        # y = softmax(q k^T + mask) v, the mask -inf where a key comes after its query (checkpoint.shifted_causal_mask)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=shifted_causal_mask(T, start, q.device),
                                           is_causal=T > 1 and not start, scale=1.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return linear(self.out_proj, y)


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        d, affine = config.hidden_size, config.layer_norm_elementwise_affine
        self.pre_ln = config.do_layer_norm_before
        self.activation = ACTIVATIONS[config.activation_function]
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)
        self.fc1 = nn.Linear(d, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = nn.Linear(config.ffn_dim, d, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)

    def linears(self) -> dict[str, nn.Linear]:
        """The six prunable Linears, by checkpoint name, in the order the forward pass uses them."""
        return {"self_attn.q_proj": self.self_attn.q_proj, "self_attn.k_proj": self.self_attn.k_proj,
                "self_attn.v_proj": self.self_attn.v_proj, "self_attn.out_proj": self.self_attn.out_proj,
                "fc1": self.fc1, "fc2": self.fc2}

    def forward(self, x: torch.Tensor, linear: LinearFn = dense_linear, cache: KVCache | None = None) -> torch.Tensor:
        ln1, ln2 = self.self_attn_layer_norm, self.final_layer_norm
        if self.pre_ln:
            x = x + self.self_attn(ln1(x), linear, cache)
            x = x + linear(self.fc2, self.activation(linear(self.fc1, ln2(x))))
        else:
            x = ln1(x + self.self_attn(x, linear, cache))
            x = ln2(x + linear(self.fc2, self.activation(linear(self.fc1, x))))
        return x


class OPTDecoder(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.word_embed_proj_dim)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, config.hidden_size)
        if config.projects_embeddings:
            self.project_in = nn.Linear(config.word_embed_proj_dim, config.hidden_size, bias=False)
            self.project_out = nn.Linear(config.hidden_size, config.word_embed_proj_dim, bias=False)
        if config.has_final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(config.hidden_size,
                                                 elementwise_affine=config.layer_norm_elementwise_affine)
        self.layers = nn.ModuleList(OPTDecoderLayer(config) for _ in range(config.num_hidden_layers))


class OPTForCausalLM(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        self.config = config
        self.decoder = OPTDecoder(config)
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        self.lm_head.weight = self.decoder.embed_tokens.weight  # tied, as in every OPT checkpoint

    blocks_key = "decoder.layers"  # the blocks' name in the checkpoint

    @property
    def blocks(self) -> nn.ModuleList:
        return self.decoder.layers

    def outer_modules(self) -> list[nn.Module]:
        """Everything but the decoder blocks: embeddings, projections, final LayerNorm, lm_head (tied to embed_tokens)."""
        dec = self.decoder
        names = ("embed_tokens", "embed_positions", "project_in", "project_out", "final_layer_norm")
        return [getattr(dec, n) for n in names if hasattr(dec, n)] + [self.lm_head]

    def embed(self, input_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Token ids (B, T) at positions start ... start + T - 1 -> hidden states (B, T, hidden) entering the
        first block. `start` is the number of tokens before these: the cache's length when decoding."""
        T = input_ids.shape[1]
        if start + T > self.config.max_position_embeddings:
            raise UsageError(f"{start + T} tokens exceed max_position_embeddings={self.config.max_position_embeddings}")
        dec = self.decoder
        x = dec.embed_tokens(input_ids)
        if self.config.projects_embeddings:
            x = dec.project_in(x)
        positions = torch.arange(start, start + T, device=input_ids.device) + POSITION_OFFSET
        return x + dec.embed_positions(positions)

    def head(self, x: torch.Tensor, linear: LinearFn = dense_linear) -> torch.Tensor:
        """Hidden states (B, T, hidden) leaving the last block -> logits (B, T, vocab), project_out and lm_head run
        by `linear`."""
        if self.config.has_final_layer_norm:
            x = self.decoder.final_layer_norm(x)
        if self.config.projects_embeddings:
            x = linear(self.decoder.project_out, x)
        return linear(self.lm_head, x)

    def new_cache(self, capacity: int, batch: int = 1) -> list[KVCache]:
        """An empty KV cache for up to `capacity` tokens per sequence: one KVCache per block."""
        if capacity > self.config.max_position_embeddings:
            raise UsageError(f"{capacity} tokens exceed max_position_embeddings={self.config.max_position_embeddings}")
        c, W = self.config, self.lm_head.weight
        return [KVCache(batch, c.num_attention_heads, capacity, c.head_dim, W.device, W.dtype) for _ in self.blocks]

    def forward(self, input_ids: torch.Tensor, linear: LinearFn = dense_linear,
                cache: list[KVCache] | None = None, head_linear: LinearFn = dense_linear) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab). With a cache (`new_cache`), input_ids are the tokens that
        follow the cached ones (the prompt first, then one or more tokens per call) and join the cache. `linear` runs
        the blocks' Linears, `head_linear` the head's (dense either way unless given)."""
        start = cache[0].length if cache else 0
        x = self.embed(input_ids, start)
        for i, block in enumerate(self.blocks):
            x = block(x, linear, cache[i] if cache else None)
        return self.head(x, head_linear)


# -----------------------------------------------------------------------------
# Loading

FAMILY, CONFIG_CLASS, MODEL_CLASS = "opt", OPTConfig, OPTForCausalLM  # what models.py builds for model_type "opt"
read_config = OPTConfig.from_json


def load_model(name_or_path, device="cpu", dtype=torch.float32) -> OPTForCausalLM:
    """Build OPT from a checkpoint, strictly: every key is used, none is missing, every shape matches.

    The model is built on the meta device (no memory, no random init) and the checkpoint's tensors
    are assigned straight into it. lm_head is tied to embed_tokens unless the checkpoint stores its own.
    """
    device = check_device(device)
    check_dtype(dtype)
    directory = resolve_checkpoint(str(name_or_path))
    config = OPTConfig.from_json(directory / "config.json")
    with empty_modules():
        model = OPTForCausalLM(config)
    # transformers saves OPTForCausalLM as model.decoder.*, metaseq as decoder.*
    rename = lambda key: key.removeprefix("model.")
    return load_weights(model, directory, rename, device, dtype, tied={"lm_head.weight": "decoder.embed_tokens.weight"})


# -----------------------------------------------------------------------------
# Tokenizer: GPT-2 byte-level BPE with OPT's BOS


def load_tokenizer(name_or_path) -> Tokenizer:
    """Byte-level BPE that prepends BOS `</s>` (id 2) once, as Hugging Face's OPT tokenizer does; from a
    directory (or hub model) with tokenizer.json, or with vocab.json + merges.txt."""
    from tokenizers import Tokenizer as BPE
    from tokenizers.implementations import ByteLevelBPETokenizer

    path = Path(name_or_path).expanduser()
    directory = path if path.is_dir() else resolve_checkpoint(str(name_or_path))
    if (directory / "tokenizer.json").is_file():
        tokenizer = BPE.from_file(str(directory / "tokenizer.json"))
        tokenizer.post_processor = None  # we add BOS ourselves, exactly once
    elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        tokenizer = ByteLevelBPETokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    else:
        raise UsageError(f"{directory} has no tokenizer: expected tokenizer.json or vocab.json + merges.txt")
    # HF's OPT tokenizer never splits its special tokens (bos = eos = unk = </s>, pad = <pad>)
    tokenizer.add_special_tokens(["</s>", "<pad>"])
    return Tokenizer(tokenizer, bos_id=tokenizer.token_to_id("</s>"))
