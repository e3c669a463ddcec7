"""GGUF checkpoints, read directly: the file a llama.cpp, Ollama or LM Studio user already has, as a model directory.

GGUF (llama.cpp's format) holds a model's tensors, most of them quantized in blocks, with its hyperparameters and
its tokenizer as metadata under llama.cpp's names. `--model path/to/model.gguf` works in every command: the file
is read with the `gguf` package (llama.cpp's own reader) and turned back into what a Hugging Face directory holds,

    config.json      the hyperparameters of the metadata ({arch}.embedding_length -> hidden_size, ...), in the
                     layout llama_model.py reads; the head tied when the file has no `output.weight`
    tokenizer.json   the byte-level BPE of `tokenizer.ggml.tokens` / `merges`, split as `tokenizer.ggml.pre`
                     says, BOS added where `add_bos_token` says, control tokens kept whole
    weights          each tensor dequantized by `gguf.quants.dequantize` to float32 (the run's dtype at loading),
                     renamed to the Hugging Face name (blk.3.attn_q -> model.layers.3.self_attn.q_proj), the rows
                     of q and k put back in the Hugging Face order where llama.cpp reordered them (below)

`unpack(path)` writes config.json and tokenizer.json once into a small directory in the user's cache (keyed by
the file's path, size and time), beside a link to the file; the tensors are read from the file itself each time
(`read_tensors`), one at a time, so no dequantized copy is kept on disk. checkpoint.py sends a `.gguf` path here.

llama.cpp rotates the pairs (x_2i, x_2i+1) of a head (the GPT-J layout), the hub's LLaMAs the pairs (x_i,
x_i+hs/2): its converter reorders the rows of q_proj and k_proj of a `llama` model head by head,
W.reshape(n_head, 2, hs/2, d).swapaxes(1, 2), which `unpermute` undoes. Its qwen2, qwen3 and phi3 models keep the
rotate-half layout (llama.cpp's NEOX rope) and are stored unpermuted.

Supported: the architectures llama (Llama 1/2/3, Mistral, SmolLM2), qwen2, qwen3 and phi3; the tokenizer models
gpt2 (byte-level BPE: Llama 3, Qwen, SmolLM2) and llama (sentencepiece's BPE: Llama 2, Mistral, Phi-3); the
quantization types gguf.quants dequantizes (F32, F16, BF16, Q4_0 ... Q8_0, the K-quants, the IQ types). A Llama
3.1 file's `rope_freqs` and Phi-3's long-context factors are refused by name.

Gemma 3 (`gemma3`, text only: llama.cpp writes the vision tower to a separate mmproj file) stores its norms as
1 + w and leaves out what llama.cpp fixes in code, taken from there: layers sliding in a pattern of 6, the sliding
layers' RoPE base 10000 (the file's rope scaling is the full layers'), the query scale head_dim^-1/2 (27B, 62
layers: (hidden / heads)^-1/2); its tokenizer is Gemma's sentencepiece BPE.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from checkpoint import UsageError

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",  # GGUF -> model_type
                 "gemma3": "gemma3_text"}
TOKENIZER_MODELS = ("gpt2", "llama")  # byte-level BPE; sentencepiece's BPE (byte fallback)
UNPACKED_FILES = ("config.json", "tokenizer.json")
LINK = "model.gguf"  # the unpacked directory's link to the file: what marks a directory as a GGUF's

# blk.{i}.{name} -> model.layers.{i}.{name}; the phi3 file's ffn_up is the fused gate_up_proj
BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
               "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
# Gemma 3's four norms a block; llama.cpp stores each of its norms (q_norm, k_norm too) as 1 + w, the scale itself
GEMMA3_BLOCK_NAMES = {**BLOCK_NAMES, "ffn_norm": "pre_feedforward_layernorm",
                      "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
GEMMA3_SLIDING_WINDOW_PATTERN = 6  # llama.cpp's for Gemma 3: every 6th layer attends fully
GEMMA3_LOCAL_ROPE_THETA = 10000.0  # its sliding layers' RoPE base, which the files leave out
GEMMA3_27B_LAYERS = 62  # llama.cpp scales Gemma 3 27B's queries by (hidden / heads)^-1/2, the others' by head_dim^-1/2
OUTER_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# how llama.cpp's `tokenizer.ggml.pre` splits text before its merges (the pre-tokenizer regexes of the hub's
# tokenizer.json files); a name not here splits as GPT-2 does (ByteLevel's own regex: SmolLM2's "smollm")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {"llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "llama-bpe": LLAMA3_SPLIT,
                        "smaug-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values: kept whole as special / as added tokens


def is_gguf(name_or_path) -> bool:
    return str(name_or_path).endswith(".gguf")


def read_gguf(path: Path):
    """The file's GGUFReader (memory-mapped), or one clear line: missing, truncated, not a GGUF."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UsageError(f"{path} is a GGUF file: reading it needs the gguf package (pip install gguf)") from None

    if not path.is_file():
        raise UsageError(f"{path} not found")
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader says ValueError / struct.error / numpy's errors for a damaged file
        raise UsageError(f"{path} is not a readable GGUF file, truncated or damaged? ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


def metadata(reader) -> dict:
    """Every metadata field but the large token arrays, as Python values."""
    fields = {}
    for name, field in reader.fields.items():
        if name in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                    "tokenizer.ggml.scores"):
            continue
        fields[name] = field.contents()
    return fields


# -----------------------------------------------------------------------------
# config.json and tokenizer.json from the metadata


def config_of(reader, path: Path) -> dict:
    """The config.json (transformers 5's layout) of a GGUF's metadata; unsupported ones refused by name."""
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UsageError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                         f"{', '.join(ARCHITECTURES)})")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise UsageError(f"{path}: its rope_freqs (Llama 3.1's rope scaling) are not supported")
    if any(name.startswith("rope_factors_") for name in names):
        raise UsageError(f"{path}: its rope_factors (Phi-3's long-context rope) are not supported")

    def key(name, default=None):
        return meta.get(f"{arch}.{name}", default)

    heads = key("attention.head_count")
    hidden = key("embedding_length")
    tokens = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None
    rope = {"rope_type": "default", "rope_theta": float(key("rope.freq_base", 10000.0))}
    if key("rope.scaling.type") == "linear":
        rope.update(rope_type="linear", factor=float(key("rope.scaling.factor")))
    elif key("rope.scaling.type") not in (None, "none"):
        raise UsageError(f"{path}: rope scaling {key('rope.scaling.type')!r} is not supported (supported: linear)")
    head_dim = key("attention.key_length") or hidden // heads
    if arch == "phi3" and key("rope.dimension_count") and key("rope.dimension_count") != head_dim:
        rope["partial_rotary_factor"] = key("rope.dimension_count") / head_dim
    config = {"model_type": ARCHITECTURES[arch], "vocab_size": key("vocab_size") or tokens, "hidden_size": hidden,
              "intermediate_size": key("feed_forward_length"), "num_hidden_layers": key("block_count"),
              "num_attention_heads": heads, "num_key_value_heads": key("attention.head_count_kv") or heads,
              "head_dim": head_dim, "max_position_embeddings": key("context_length"),
              "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")), "rope_parameters": rope,
              "tie_word_embeddings": "output.weight" not in names, "hidden_act": "silu",
              "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
              "eos_token_id": meta.get("tokenizer.ggml.eos_token_id")}
    if key("attention.sliding_window"):
        config.update(sliding_window=key("attention.sliding_window"), use_sliding_window=True)
    if arch == "gemma3":  # what llama.cpp fixes for Gemma 3 rather than storing
        layers, pattern = config["num_hidden_layers"], GEMMA3_SLIDING_WINDOW_PATTERN
        local_rope = {"rope_type": "default", "rope_theta": GEMMA3_LOCAL_ROPE_THETA}
        config.update(hidden_activation="gelu_pytorch_tanh",
                      layer_types=["sliding_attention" if (i + 1) % pattern else "full_attention"
                                   for i in range(layers)],
                      rope_parameters={"full_attention": rope, "sliding_attention": local_rope},
                      query_pre_attn_scalar=hidden // heads if layers == GEMMA3_27B_LAYERS else head_dim)
    return config


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in which a byte-level vocabulary spells its tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """A sentencepiece vocabulary's BPE merges, which llama.cpp's files leave out: every split of a token into two
    tokens of the vocabulary, ranked by the merged token's score, best first (ties: the shorter left piece, then the
    shorter right, then the file's order), as transformers' `generate_merges` derives them."""
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        pairs = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges += sorted(pairs, key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
    merges.sort(key=lambda pair: (pair[2], len(pair[0]), len(pair[1])), reverse=True)  # stable: ties keep order
    return [(left, right) for left, right, _ in merges]


def gemma_tokenizer(tokens: list[str]):
    """Gemma's sentencepiece BPE as transformers' GemmaTokenizer builds it from a GGUF: no "▁" put before the text,
    tokens of spaces only respelled with "▁" (the file stores real spaces), the merges derived from the tokens'
    order in the file (Gemma's scores do not follow it)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)},
                               merges_from_scores(tokens, [-float(i) for i in range(len(tokens))]),
                               fuse_unk=True, unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return bpe


def tokenizer_of(reader, path: Path):
    """The `tokenizers` Tokenizer of a GGUF's tokenizer metadata, built as transformers builds it from the file:

        gpt2    byte-level BPE (its GPT2Tokenizer): the ByteLevel pre-tokenizer, split as `tokenizer.ggml.pre` says
        llama   sentencepiece's BPE (its LlamaTokenizer): "▁" for spaces and one before the text (Metaspace; Phi-3's
                files a normalizer, as Phi-3's own tokenizer.json), unknown characters as <0xNN> bytes, the merges
                of the file or derived from its scores

    Control tokens are kept whole as special tokens, user-defined ones as added tokens; BOS is added where
    `add_bos_token` says (sentencepiece files without the flag: added, as llama.cpp does)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    meta = metadata(reader)
    kind = meta.get("tokenizer.ggml.model")
    if kind not in TOKENIZER_MODELS:
        raise UsageError(f"{path}: its tokenizer model {kind!r} is not supported (supported: "
                         f"{', '.join(TOKENIZER_MODELS)})")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = reader.fields["tokenizer.ggml.merges"].contents() if "tokenizer.ggml.merges" in reader.fields else []
    merges = [tuple(m.split(" ")) for m in merges]
    token_types = (reader.fields["tokenizer.ggml.token_type"].contents()
                   if "tokenizer.ggml.token_type" in reader.fields else [])
    if kind == "gpt2":
        spelling = bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
                 for i, t in enumerate(tokens)}
        bpe = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
        split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
        if split is None:
            bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
        bpe.decoder = decoders.ByteLevel()
        control = [t for t, t_type in zip(tokens, token_types) if t_type == CONTROL and set(t) <= alphabet]
    elif meta.get("general.architecture") == "gemma3":
        bpe = gemma_tokenizer(tokens)
    else:
        scores = reader.fields["tokenizer.ggml.scores"].contents() if not merges else None
        bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges or merges_from_scores(tokens, scores),
                                   fuse_unk=True, byte_fallback=True))
        if meta.get("general.architecture") == "phi3":
            bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        else:
            bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    if kind == "llama":
        named = [meta.get(f"tokenizer.ggml.{name}_token_id") for name in ("unknown", "bos", "eos")]
        control = [t for i, (t, t_type) in enumerate(zip(tokens, token_types)) if t_type == CONTROL or i in named]
        meta.setdefault("tokenizer.ggml.add_bos_token", True)
    bpe.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    bpe.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, t_type in zip(tokens, token_types) if t_type == USER_DEFINED])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        bpe.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A",
                                                           pair=f"{tokens[bos]} $A {tokens[bos]} $B",
                                                           special_tokens=[(tokens[bos], bos)])
    return bpe


# -----------------------------------------------------------------------------
# The tensors


def unpermute(W: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of a `llama` model's q/k rows: per head, (pairs, 2) back to (2, hs/2)."""
    return W.reshape(n_head, W.shape[0] // n_head // 2, 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def hf_name(name: str, arch: str) -> str:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight; token_embd.weight -> model.embed_tokens.weight"""
    stem, _, kind = name.rpartition(".")
    block_names = GEMMA3_BLOCK_NAMES if arch == "gemma3" else BLOCK_NAMES
    if stem.startswith("blk."):
        _, i, part = stem.split(".", 2)
        if part not in block_names:
            raise UsageError(f"GGUF tensor {name!r} is not one this reader knows")
        return f"model.layers.{i}.{block_names[part]}.{kind}"
    if stem not in OUTER_NAMES:
        raise UsageError(f"GGUF tensor {name!r} is not one this reader knows")
    return f"{OUTER_NAMES[stem]}.{kind}"


def read_tensors(directory: Path):
    """Yield (Hugging Face name, float32 tensor) for every tensor of an unpacked GGUF, one at a time."""
    from gguf.quants import dequantize

    path = (directory / LINK).resolve()
    reader = read_gguf(path)
    config = json.loads((directory / "config.json").read_text())
    arch = metadata(reader)["general.architecture"]
    for tensor in reader.tensors:
        try:
            W = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise UsageError(f"{path}: tensor {tensor.name} is quantized as {tensor.tensor_type.name}, which gguf "
                             f"{package_version()} cannot dequantize") from None
        name = hf_name(tensor.name, arch)
        if arch == "phi3" and ".mlp.up_proj." in name:
            name = name.replace(".mlp.up_proj.", ".mlp.gate_up_proj.")
        W = torch.from_numpy(np.array(W, dtype=np.float32)).reshape(tuple(reversed(tensor.shape.tolist())))
        if arch == "llama" and ".self_attn.q_proj." in name:
            W = unpermute(W, config["num_attention_heads"])
        elif arch == "llama" and ".self_attn.k_proj." in name:
            W = unpermute(W, config["num_key_value_heads"])
        elif arch == "gemma3" and name.endswith("norm.weight"):
            W = W - 1  # stored as the scale 1 + w; the checkpoint's weight is w
        yield name, W


def package_version() -> str:
    from importlib.metadata import version

    return version("gguf")


# -----------------------------------------------------------------------------
# A GGUF file as a model directory


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mumoe" / "gguf"


def unpack(path) -> Path:
    """The model directory of a GGUF file: config.json and tokenizer.json written once from its metadata (in the
    user's cache, keyed by the file's absolute path, size and modification time), and a link to the file."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise UsageError(f"{path} not found")
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    directory = cache_root() / f"{path.stem}-{key}"
    if (directory / "config.json").is_file():
        return directory
    reader = read_gguf(path)
    config, tokenizer = config_of(reader, path), tokenizer_of(reader, path)
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / LINK).is_symlink():
        (directory / LINK).symlink_to(path)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "config.json.partial").write_text(json.dumps(config, indent=2))
    (directory / "config.json.partial").rename(directory / "config.json")  # last: it marks a finished unpack
    return directory
