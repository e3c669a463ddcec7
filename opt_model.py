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

Imports: torch, safetensors, tokenizers, and huggingface_hub (only to download a named model).
"""

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class UsageError(ValueError):
    """An error the user can cause and fix (bad argument, missing file); the CLIs print it in one line."""


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
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"{path} not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"{path} is not valid JSON ({e})") from None
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

LinearFn = Callable[[nn.Linear, torch.Tensor], torch.Tensor]


def dense_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return layer(x)


# How a loop over blocks runs one block: dense, or routed per prompt (mumoe.routed_block)
BlockFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def dense_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return block(x)


class KVCache:
    """One block's keys and values of the tokens seen so far, for decoding: a new token attends to them all.

    The buffers (B, nh, capacity, hs) are allocated once and filled in place, so a decoding step copies
    only its own keys and values (a torch.cat per step would copy the whole cache every time).
    """

    def __init__(self, config: OPTConfig, batch: int, capacity: int, device=None, dtype=None):
        shape = (batch, config.num_attention_heads, capacity, config.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0  # tokens cached so far: the next token's position

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' k, v (B, nh, T, hs); return the keys and values of every token so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"{end} tokens overflow a KV cache allocated for {self.k.shape[2]}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, nh, end, hs)


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
        # y = softmax(q k^T + mask) v, the mask -inf where a key comes after its query: new token i, at position
        # start + i, sees keys 0 ... start + i. Over a prompt that is SDPA's causal mask; SDPA aligns it top-left,
        # so T tokens after cached ones get it shifted right by `start`; one new token may see every key.
        shifted = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(start) if T > 1 and start else None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=shifted, is_causal=T > 1 and not start, scale=1.0)
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

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, hidden) leaving the last block -> logits (B, T, vocab)."""
        if self.config.has_final_layer_norm:
            x = self.decoder.final_layer_norm(x)
        if self.config.projects_embeddings:
            x = self.decoder.project_out(x)
        return self.lm_head(x)

    def new_cache(self, capacity: int, batch: int = 1) -> list[KVCache]:
        """An empty KV cache for up to `capacity` tokens per sequence: one KVCache per block."""
        if capacity > self.config.max_position_embeddings:
            raise UsageError(f"{capacity} tokens exceed max_position_embeddings={self.config.max_position_embeddings}")
        W = self.lm_head.weight
        return [KVCache(self.config, batch, capacity, W.device, W.dtype) for _ in self.decoder.layers]

    def forward(self, input_ids: torch.Tensor, linear: LinearFn = dense_linear,
                cache: list[KVCache] | None = None) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab). With a cache (`new_cache`), input_ids are the tokens that
        follow the cached ones (the prompt first, then one or more tokens per call) and join the cache."""
        start = cache[0].length if cache else 0
        x = self.embed(input_ids, start)
        for i, block in enumerate(self.decoder.layers):
            x = block(x, linear, cache[i] if cache else None)
        return self.head(x)


# -----------------------------------------------------------------------------
# Finding a checkpoint: a local directory, or a Hugging Face hub repo downloaded into the standard cache

OPT_SIZES = ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b")
CHECKPOINT_FILES = ["config.json", "vocab.json", "merges.txt", "tokenizer.json",
                    "*.safetensors", "model.safetensors.index.json"]
PYTORCH_BIN_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


def hub_repo_id(name: str) -> str | None:
    """'opt-125m' -> 'facebook/opt-125m'; 'owner/name' stays; anything else is not a hub id."""
    if name.removeprefix("facebook/") in {f"opt-{size}" for size in OPT_SIZES}:
        return "facebook/" + name.removeprefix("facebook/")
    parts = name.split("/")
    if len(parts) == 2 and all(p and not p.startswith(".") for p in parts):
        return name
    return None


def resolve_checkpoint(name_or_path: str) -> Path:
    """A directory holding config.json and safetensors weights: the local one given, or a hub download."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{path} is not a model directory: it has no config.json")
        return path
    repo_id = hub_repo_id(str(name_or_path))
    if repo_id is None:
        raise UsageError(f"unknown model {name_or_path!r}: give opt-125m ... opt-66b "
                         f"({', '.join(OPT_SIZES)}), a hub id such as facebook/opt-125m, "
                         "or a local directory with config.json and model.safetensors")
    return download_checkpoint(repo_id)


def download_checkpoint(repo_id: str) -> Path:
    """Download (or find in the Hugging Face cache) config, tokenizer files and safetensors weights.

    The facebook/opt-* repos hold only pytorch_model*.bin: those are converted once to safetensors
    beside the hub cache, so a second run reads the converted copy and downloads nothing.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=CHECKPOINT_FILES))
        if any(snapshot.glob("*.safetensors")):
            return snapshot
        converted = converted_dir(snapshot)
        if not (converted / "config.json").is_file():
            snapshot = Path(snapshot_download(repo_id, allow_patterns=CHECKPOINT_FILES + PYTORCH_BIN_FILES))
            convert_to_safetensors(snapshot, converted)
        return converted
    except RepositoryNotFoundError:
        raise UsageError(f"model {repo_id!r} not found on the Hugging Face hub") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise UsageError(f"could not download {repo_id!r} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         "offline, pass a local directory with config.json and model.safetensors") from None


def converted_dir(snapshot: Path) -> Path:
    """hub/models--facebook--opt-125m/snapshots/<commit> -> mumoe-safetensors/models--facebook--opt-125m/<commit>"""
    repo_folder, commit = snapshot.parent.parent.name, snapshot.name
    return snapshot.parent.parent.parent.parent / "mumoe-safetensors" / repo_folder / commit


def convert_to_safetensors(src: Path, dst: Path) -> None:
    """Rewrite each pytorch_model*.bin in `src` as a .safetensors shard in `dst` (tied copies dropped)."""
    from safetensors.torch import save_file

    bins = sorted(src.glob("pytorch_model*.bin"))
    if not bins:
        raise UsageError(f"{src} holds neither *.safetensors nor pytorch_model*.bin weights")
    dst.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, bin_path in enumerate(bins):
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
        seen, shard = set(), {}
        for key, tensor in state.items():
            if tensor.data_ptr() in seen:  # a tied tensor (lm_head = embed_tokens): safetensors stores it once
                continue
            seen.add(tensor.data_ptr())
            shard[key] = tensor.contiguous()
        name = "model.safetensors" if len(bins) == 1 else f"model-{i + 1:05d}-of-{len(bins):05d}.safetensors"
        save_file(shard, dst / (name + ".partial"), metadata={"format": "pt"})
        (dst / (name + ".partial")).rename(dst / name)
        weight_map.update({key: name for key in shard})
    if len(bins) > 1:
        (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=2))
    for extra in ("vocab.json", "merges.txt", "tokenizer.json", "config.json"):  # config last: marks completion
        if (src / extra).is_file():
            (dst / extra).write_bytes((src / extra).read_bytes())


# -----------------------------------------------------------------------------
# Loading weights


def checkpoint_shards(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / "model.safetensors"
    if not single.is_file():
        raise UsageError(f"{directory} has no model.safetensors (nor model.safetensors.index.json)")
    return [single]


def read_checkpoint(directory: Path):
    """Yield (key, tensor) for every tensor of every shard, one at a time."""
    from safetensors import SafetensorError, safe_open

    for shard in checkpoint_shards(directory):
        if not shard.is_file():
            raise UsageError(f"checkpoint shard {shard} is missing")
        try:
            with safe_open(shard, framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except SafetensorError as e:
            raise UsageError(f"{shard} is not a readable safetensors file ({e})") from None


# the dtypes the command lines offer, by name
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError as e:  # torch.device("gpu") and the like
        raise UsageError(f"unknown device {device!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device} was asked for, but CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {device} was asked for, but MPS is not available here")
    return device


def load_model(name_or_path, device="cpu", dtype=torch.float32) -> OPTForCausalLM:
    """Build OPT from a checkpoint, strictly: every key is used, none is missing, every shape matches.

    The model is built on the meta device (no memory, no random init) and the checkpoint's tensors
    are assigned straight into it, so loading needs the model's memory once, not twice.
    """
    device = check_device(device)
    if not dtype.is_floating_point:
        raise UsageError(f"dtype {dtype} is not a floating-point type")
    directory = resolve_checkpoint(str(name_or_path))
    config = OPTConfig.from_json(directory / "config.json")
    with torch.device("meta"):
        model = OPTForCausalLM(config)
    expected = {key: p.shape for key, p in model.state_dict().items()}
    state = {}
    for key, tensor in read_checkpoint(directory):
        name = key.removeprefix("model.")  # transformers saves OPTForCausalLM as model.decoder.*, metaseq as decoder.*
        if name not in expected:
            raise UsageError(f"unexpected key {key!r} in checkpoint {directory}")
        if tensor.shape != expected[name]:
            raise UsageError(f"{key!r} has shape {tuple(tensor.shape)} in the checkpoint, "
                             f"config.json implies {tuple(expected[name])}")
        state[name] = tensor.to(device=device, dtype=dtype)
    missing = sorted(expected.keys() - state.keys() - {"lm_head.weight"})
    if missing:
        raise UsageError(f"checkpoint {directory} lacks {missing[0]!r}" +
                         (f" and {len(missing) - 1} more keys" if len(missing) > 1 else ""))
    tied = "lm_head.weight" not in state
    if tied:
        state["lm_head.weight"] = state["decoder.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.decoder.embed_tokens.weight
    return model.requires_grad_(False).eval()


# -----------------------------------------------------------------------------
# Tokenizer: GPT-2 byte-level BPE with OPT's BOS


class OPTTokenizer:
    """Byte-level BPE that prepends BOS `</s>` (id 2) once, as Hugging Face's OPT tokenizer does."""

    def __init__(self, tokenizer, bos_id: int):
        self.tokenizer = tokenizer
        self.bos_id = bos_id

    def encode(self, text: str) -> list[int]:
        return [self.bos_id] + self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(name_or_path) -> OPTTokenizer:
    """From a directory (or hub model) with tokenizer.json, or with vocab.json + merges.txt."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import ByteLevelBPETokenizer

    path = Path(name_or_path).expanduser()
    directory = path if path.is_dir() else resolve_checkpoint(str(name_or_path))
    if (directory / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        tokenizer.post_processor = None  # we add BOS ourselves, exactly once
    elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        tokenizer = ByteLevelBPETokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    else:
        raise UsageError(f"{directory} has no tokenizer: expected tokenizer.json or vocab.json + merges.txt")
    # HF's OPT tokenizer never splits its special tokens (bos = eos = unk = </s>, pad = <pad>)
    tokenizer.add_special_tokens(["</s>", "<pad>"])
    return OPTTokenizer(tokenizer, bos_id=tokenizer.token_to_id("</s>"))
