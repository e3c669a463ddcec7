"""What every model family shares: errors and devices, the block interface, checkpoints, tokenizers.

This file is the bottom of the house. The model files (`opt_model.py`, `llama_model.py`) build on it, the
method files (`pruners.py`, `mumoe.py`) see models only through the interface written here, and nothing
here knows a model family:

    errors      UsageError: a mistake the user can fix; the commands print it in one line and exit 2
    interface   LinearFn / dense_linear: how a block calls each of its Linears (the pruners and μ-MoE
                replace it); BlockFn / dense_block: how a loop over blocks runs one block; KVCache and the
                causal mask of tokens that follow cached ones (shifted_causal_mask); offload (`offloaded`)
    finding     a local directory, or a Hugging Face hub repo downloaded into the standard cache
                (pytorch_model*.bin converted once to safetensors beside it), or a GGUF file (gguf_checkpoint.py);
                offline (`hub_offline`, asked once), the cache alone
    loading     `load_weights`: a checkpoint's tensors assigned into a model built on the meta device
                (`empty_modules`), strictly: every key used, none missing, every shape checked
    tokenizers  `Tokenizer`: a `tokenizers` BPE, BOS added as the checkpoint's own tokenizer adds it

Every language model offers the same interface, which is all that the method files and commands use:

    model.config            hidden_size, max_position_embeddings, num_hidden_layers, eos_token_id, ...
    model.embed(ids, start) token ids (B, T) at positions start.. -> hidden states (B, T, hidden)
    model.blocks            the decoder blocks (nn.ModuleList); model.blocks_key names them in the checkpoint
    block.linears()         the prunable Linears of a block, by checkpoint name, in the order they run
    block(x, linear, cache) one block over hidden states x (B, T, hidden); cache: that block's KVCache
    model.head(x, linear)   hidden states leaving the last block -> logits (B, T, vocab); `linear` runs lm_head
                            (dense_linear by default; a decode step's packed_experts.decode_linear)
    model(ids, linear, cache, head_linear)  embed, every block, head: the forward pass, or a decode step
    model.new_cache(n, B)   an empty KV cache (one KVCache per block) for n tokens of B sequences
    model.outer_modules()   every module but the blocks (embeddings, final norm, lm_head): what offload moves

and `offloaded(model, device)` runs any of it with the model in CPU memory and one block at a time on the device.
"""

import json
import os
import socket
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
import torch.nn as nn


class UsageError(ValueError):
    """An error the user can cause and fix (bad argument, missing file); the CLIs print it in one line."""


# -----------------------------------------------------------------------------
# Devices and dtypes, chosen once at the command line

# the dtypes the command lines offer, by name
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_device(device: str | None) -> torch.device:
    """--device, checked; every command's default (None): CUDA when present, else the CPU."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:  # torch.device("gpu") and the like
        raise UsageError(f"unknown device {device!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device} was asked for, but CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {device} was asked for, but MPS is not available here")
    return device


# -----------------------------------------------------------------------------
# The block interface

LinearFn = Callable[[nn.Linear, torch.Tensor], torch.Tensor]


def dense_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return layer(x)


# How a loop over blocks runs one block: dense, or routed per prompt (mumoe.routed_block)
BlockFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def dense_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return block(x)


class KVCache:
    """One block's keys and values of the tokens seen so far, for decoding: a new token attends to them all.

    The buffers (B, n_kv_heads, capacity, head_dim) are allocated once and filled in place, so a decoding
    step copies only its own keys and values (a torch.cat per step would copy the whole cache every time).
    """

    def __init__(self, batch: int, n_kv_heads: int, capacity: int, head_dim: int, device=None, dtype=None):
        shape = (batch, n_kv_heads, capacity, head_dim)
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


def shifted_causal_mask(T: int, start: int, device=None, window: int | None = None) -> torch.Tensor | None:
    """The attention mask of T new tokens after `start` cached ones, for F.scaled_dot_product_attention: True
    where new token i, at position start + i, may attend, keys 0 ... start + i; with a sliding `window`, only
    the last `window` of them, keys start + i - window + 1 ... start + i. None where SDPA needs none (no key
    falls out of the window): one new token sees every key, and a prompt (start = 0) takes SDPA's own
    is_causal, which aligns the mask top-left and so would be wrong after cached tokens:

        mask = shifted_causal_mask(T, start, q.device, window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
    """
    if window is not None and start + T > window:
        query = torch.arange(start, start + T, device=device)[:, None]
        key = torch.arange(start + T, device=device)[None, :]
        return (key <= query) & (key > query - window)  # (T, start + T)
    if T == 1 or start == 0:
        return None
    return torch.ones(T, start + T, dtype=torch.bool, device=device).tril(start)  # (T, start + T)


# -----------------------------------------------------------------------------
# Offload: a model kept in CPU memory runs with one block at a time on the device


def visit(block: nn.Module, device: torch.device) -> dict:
    """A block's turn begins: its weights and buffers copied to the device. Returns their CPU tensors, kept as they
    are (memory-mapped pages of the checkpoint stay shared, nothing is allocated in CPU memory)."""
    kept = {}
    for tensor in (*block.parameters(), *block.buffers()):
        kept[tensor] = tensor.data
        tensor.data = tensor.data.to(device)
    return kept


def leave(block: nn.Module, kept: dict) -> None:
    """A block's turn ends: its tensors are the CPU ones again and the device copies are dropped; nothing is copied
    back, as nothing changes a weight while the model runs offloaded."""
    for tensor, data in kept.items():
        tensor.data = data


@contextmanager
def offloaded(model, device):
    """Within the block, `model` (its weights in CPU memory) runs on `device` with one decoder block there at a time:
    model.outer_modules() move to `device` for the whole block, and each decoder block is copied there just before
    each of its forwards and dropped right after (forward hooks), whoever calls it: a perplexity loop, a generation
    through the KV cache (every new token visits every block), lm-eval's batches. The hidden states, the KV cache and
    the logits live on `device`. For runs that read the weights only (a pruned model is pruned before): a weight
    changed during a block's turn would be lost. On leaving, the whole model is in CPU memory, the hooks gone."""
    device = torch.device(device)
    turns = {}  # block -> its CPU tensors, while it is on the device

    def before(block, args) -> None:  # (a hook that returned something would replace the block's inputs)
        turns[block] = visit(block, device)

    def after(block, args, output) -> None:  # (...or its output)
        leave(block, turns.pop(block))

    hooks = [hook for block in model.blocks
             for hook in (block.register_forward_pre_hook(before), block.register_forward_hook(after))]
    for module in model.outer_modules():
        module.to(device)
    try:
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        for module in model.outer_modules():
            module.to("cpu")

# -----------------------------------------------------------------------------
# Finding a checkpoint: a local directory, or a Hugging Face hub repo downloaded into the standard cache

OPT_SIZES = ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b")
# short names a user may type for the papers' models; any other hub id is given as owner/name
SHORT_NAMES = {f"opt-{size}": f"facebook/opt-{size}" for size in OPT_SIZES}
SHORT_NAMES.update({"llava-1.5-7b": "llava-hf/llava-1.5-7b-hf", "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf"})
CHECKPOINT_FILES = ["config.json", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                    "*.safetensors", "model.safetensors.index.json"]
PYTORCH_BIN_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


def hub_repo_id(name: str) -> str | None:
    """'opt-125m' -> 'facebook/opt-125m'; 'owner/name' stays; anything else is not a hub id."""
    if name in SHORT_NAMES or name.removeprefix("facebook/") in SHORT_NAMES:
        return SHORT_NAMES[name.removeprefix("facebook/")]
    parts = name.split("/")
    if len(parts) == 2 and all(p and not p.startswith(".") for p in parts):
        return name
    return None


def resolve_checkpoint(name_or_path: str) -> Path:
    """A directory holding config.json and safetensors weights: the local one given, or a hub download; for a
    .gguf file, the directory gguf_checkpoint.unpack makes of it (config.json, tokenizer.json, a link to the file)."""
    path = Path(name_or_path).expanduser()
    if str(name_or_path).endswith(".gguf"):
        import gguf_checkpoint  # (it imports this file)

        return gguf_checkpoint.unpack(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{path} is not a model directory: it has no config.json")
        return path
    repo_id = hub_repo_id(str(name_or_path))
    if repo_id is None:
        raise UsageError(f"unknown model {name_or_path!r}: give a short name ({', '.join(SHORT_NAMES)}), "
                         "a hub id such as meta-llama/Llama-2-7b-hf, or a local directory with config.json "
                         "and model.safetensors")
    return download_checkpoint(repo_id)


HUB_TIMEOUT = 3.0  # seconds to wait for the hub's host before taking the machine to be offline
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")  # then only a download can tell


@cache
def hub_offline() -> str | None:
    """None where the Hugging Face hub can be reached; else one line saying why not.

    Asked once per process, in HUB_TIMEOUT seconds at most. Offline, every download reads the local Hugging Face
    cache only (`local_files_only`), instead of retrying for a minute and failing in a traceback."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=HUB_TIMEOUT).close()
    except OSError as e:
        return f"{url.hostname} cannot be reached: {e.strerror or type(e).__name__}"
    return None


def offline_hint(what: str, offline: str, instead: str) -> UsageError:
    """The one line for a download that offline mode could not serve from the cache."""
    return UsageError(f"{what} is not in the local Hugging Face cache, and the hub is offline ({offline}): {instead}")


def download_checkpoint(repo_id: str) -> Path:
    """Download (or find in the Hugging Face cache) config, tokenizer files and safetensors weights.

    Repos that hold only pytorch_model*.bin (the facebook/opt-* ones) are converted once to safetensors
    beside the hub cache, so a second run reads the converted copy and downloads nothing.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    offline = hub_offline()
    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=CHECKPOINT_FILES, local_files_only=bool(offline)))
        if any(snapshot.glob("*.safetensors")):
            return snapshot
        converted = converted_dir(snapshot)
        if not (converted / "config.json").is_file():
            snapshot = Path(snapshot_download(repo_id, allow_patterns=CHECKPOINT_FILES + PYTORCH_BIN_FILES,
                                              local_files_only=bool(offline)))
            convert_to_safetensors(snapshot, converted)
        return converted
    except LocalEntryNotFoundError:
        if offline:
            raise offline_hint(f"model {repo_id!r}", offline,
                               "pass a local directory with config.json and model.safetensors") from None
        raise UsageError(f"could not download {repo_id!r}: the hub did not answer; offline, pass a local "
                         "directory with config.json and model.safetensors") from None
    except GatedRepoError:  # a RepositoryNotFoundError too: caught first
        raise UsageError(f"model {repo_id!r} is gated on the Hugging Face hub: accept its license on the hub, "
                         "then log in (`hf auth login`) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise UsageError(f"model {repo_id!r} not found on the Hugging Face hub") from None
    except (HfHubHTTPError, OSError) as e:
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
    for extra in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "config.json"):
        if (src / extra).is_file():  # config.json last: it marks a finished conversion
            (dst / extra).write_bytes((src / extra).read_bytes())


def read_config_json(path: Path) -> dict:
    """The raw dict of a `config.json`, or one clear line saying why it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e})") from None


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
    """Yield (key, tensor) for every tensor of every shard, one at a time (of an unpacked GGUF: dequantized)."""
    from safetensors import SafetensorError, safe_open

    if (directory / "model.gguf").exists():
        import gguf_checkpoint  # (it imports this file)

        yield from gguf_checkpoint.read_tensors(directory)
        return
    for shard in checkpoint_shards(directory):
        if not shard.is_file():
            raise UsageError(f"checkpoint shard {shard} is missing")
        try:
            with safe_open(shard, framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except SafetensorError as e:
            raise UsageError(f"{shard} is not a readable safetensors file ({e})") from None


def check_dtype(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise UsageError(f"dtype {dtype} is not a floating-point type")


INITS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
         "xavier_normal_", "ones_", "zeros_", "constant_")  # what nn.Module constructors draw their parameters with


@contextmanager
def empty_modules():
    """Modules built inside have their parameters on the meta device and uninitialized, for `load_weights` to assign
    a checkpoint's tensors in their place: nn.init's draws are skipped. On the meta device some of them run through
    torch's Python reference kernels, whose first use imports torch._dynamo (and triton where it is installed: ~2 s
    on a 2-core CPU), and a Ctrl-C landing in that import, beneath torch's C++ dispatch, aborted the process
    (std::terminate, a traceback) instead of ending the command in one line."""
    saved = {name: getattr(nn.init, name) for name in INITS}
    for name in INITS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, init in saved.items():
            setattr(nn.init, name, init)


def load_weights(model: nn.Module, directory: Path, rename: Callable[[str], str | None], device, dtype,
                 tied: dict[str, str] | None = None) -> nn.Module:
    """Assign a checkpoint's tensors into `model`, built on the meta device, strictly; return it ready to run.

    `rename` maps a checkpoint key to the model's name for it (a prefix strip), or to None for a tensor the
    model computes itself (e.g. a stored rotary inv_freq). Every other key must be the model's and have its
    shape, and every model key must be in the checkpoint, except a `tied` one (name -> the name it shares its
    tensor with), which is tied when the checkpoint leaves it out. Tensors go straight to `device` and `dtype`,
    so loading needs the model's memory once, not twice.
    """
    tied = tied or {}
    expected = {key: p.shape for key, p in model.state_dict().items()}
    state = {}
    for key, tensor in read_checkpoint(directory):
        name = rename(key)
        if name is None:
            continue
        if name not in expected:
            raise UsageError(f"unexpected key {key!r} in checkpoint {directory}")
        if tensor.shape != expected[name]:
            raise UsageError(f"{key!r} has shape {tuple(tensor.shape)} in the checkpoint, "
                             f"config.json implies {tuple(expected[name])}")
        state[name] = tensor.to(device=device, dtype=dtype)
    missing = sorted(expected.keys() - state.keys() - tied.keys())
    if missing:
        raise UsageError(f"checkpoint {directory} lacks {missing[0]!r}" +
                         (f" and {len(missing) - 1} more keys" if len(missing) > 1 else ""))
    shared = {name: source for name, source in tied.items() if name not in state}
    for name, source in shared.items():
        state[name] = state[source]
    model.load_state_dict(state, strict=True, assign=True)
    for name, source in shared.items():  # assign=True gave each its own Parameter: make them one again
        owner, _, attr = name.rpartition(".")
        src_owner, _, src_attr = source.rpartition(".")
        setattr(model.get_submodule(owner), attr, getattr(model.get_submodule(src_owner), src_attr))
    return model.requires_grad_(False).eval()


# -----------------------------------------------------------------------------
# Tokenizers


class Tokenizer:
    """A `tokenizers` BPE that adds BOS as the checkpoint's Hugging Face fast tokenizer does.

    Either the tokenizer's own post-processor adds it (tokenizer.json's TemplateProcessing: Llama's `<s>`,
    Llama 3's `<|begin_of_text|>`; Qwen2's adds none), or, with `bos_id` given, it is prepended here once
    (OPT's `</s>`, whose tokenizer.json has no such post-processor).
    """

    def __init__(self, tokenizer, bos_id: int | None = None):
        self.tokenizer = tokenizer
        self.bos_id = bos_id

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        return ids if self.bos_id is None else [self.bos_id] + ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)
