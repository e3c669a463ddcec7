"""Tests for GGUF checkpoints (gguf_checkpoint.py): `--model file.gguf` loads the model and the tokenizer that
transformers' own GGUF loading gives (`from_pretrained(dir, gguf_file=...)`, a test-only oracle). Each test can fail.

The GGUF files are written here with the `gguf` package's GGUFWriter from tiny random transformers models, as
llama.cpp's converter writes them (its tensor names, its q/k row order for `llama`, its metadata keys, a byte-level
BPE tokenizer), in F32, F16, Q8_0 and Q4_K. The package cannot quantize Q4_K (it only dequantizes it), so the
Q4_K tensors are random valid blocks, the model being whatever they dequantize to. The shared SmolLM2-135M Q4_1
file is checked too where ../shared has it.
"""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from kit.checks import assert_close, assert_one_line_error
from kit.commands import cli_args, run_generate, run_main
from kit.data import REPO, random_ids, sentence
from kit.tiny_models import LLAMA_VOCAB
from kit.tiny_tokenizers import save_llama2_like_tokenizer, save_llama_tokenizer

gguf = pytest.importorskip("gguf")

# fp32, measured: the dequantized weights equal transformers' exactly and so do the logits (max |diff| 0 on every
# file here and on SmolLM2's). The bound is the forward pass's (test_llama): other CPUs' kernels, far below a bug.
FP32_ATOL = 1e-5
SMOLLM2_GGUF = REPO.parent / "shared" / "models" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
Q4_K_BLOCK_BYTES, Q4_K_BLOCK = 144, 256  # d, dmin (fp16), 12 bytes of 6-bit scales and mins, 128 of 4-bit values

# GGUF architecture -> (kit/test kind, transformers config class, overrides)
ARCHS = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=128)),  # transformers reads no head_dim: its 128
    "phi3": ("Phi3Config", dict(num_key_value_heads=2, pad_token_id=0)),
    # transformers reads neither query_pre_attn_scalar nor head_dim's role in it: head_dim 256 makes its default
    # (256) llama.cpp's rule; six layers, the last attending fully, the others within a window of 16
    "gemma3": ("Gemma3TextConfig", dict(num_key_value_heads=2, head_dim=256, num_hidden_layers=6, sliding_window=16,
                                        pad_token_id=0)),
}
BLOCK_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.qkv_proj": "attn_qkv",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
GEMMA3_BLOCK_NAMES = {**BLOCK_NAMES, "pre_feedforward_layernorm": "ffn_norm",
                      "post_attention_layernorm": "post_attention_norm", "post_feedforward_layernorm": "post_ffw_norm"}
OUTER_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(key: str, arch: str) -> str:
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight, as llama.cpp names it."""
    stem, _, kind = key.rpartition(".")
    if stem.startswith("model.layers."):
        _, _, i, part = stem.split(".", 3)
        return f"blk.{i}.{(GEMMA3_BLOCK_NAMES if arch == 'gemma3' else BLOCK_NAMES)[part]}.{kind}"
    return f"{OUTER_NAMES[stem]}.{kind}"


def llama_cpp_permute(W: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute`: a head's rows from the rotate-half order to interleaved pairs."""
    return W.reshape(n_head, 2, W.shape[0] // n_head // 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def random_q4_k(shape, rng: np.random.Generator) -> np.ndarray:
    """Random valid Q4_K blocks for a (rows, cols) weight: random scales and values, d and dmin 0.01 (fp16)."""
    rows, cols = shape
    blocks = rng.integers(0, 256, size=(rows, cols // Q4_K_BLOCK, Q4_K_BLOCK_BYTES), dtype=np.uint8)
    blocks[..., 0:4] = np.frombuffer(np.array([0.01, 0.01], dtype=np.float16).tobytes(), dtype=np.uint8)
    return blocks.reshape(rows, -1)


def write_gguf(path: Path, arch: str, reference, tokenizer_json: Path, qtype: str, add_bos: bool | None = False,
               pre: str = "qwen2", tokenizer_model: str = "gpt2", merges: bool = True) -> None:
    """`reference`'s weights and tokenizer in a GGUF file, as llama.cpp's converter writes them: a byte-level BPE
    (`gpt2`), or a sentencepiece-style BPE (`llama`: token scores, byte tokens, its merges only if `merges`)."""
    c = reference.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)  # Gemma 3's: per layer type
    writer.add_rope_freq_base(rope["rope_theta"])
    if arch == "gemma3":
        writer.add_sliding_window(c.sliding_window)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    bpe = json.loads(tokenizer_json.read_text())
    tokens = [None] * c.vocab_size
    for token, i in bpe["model"]["vocab"].items():
        tokens[i] = token
    for added in bpe["added_tokens"]:
        tokens[added["id"]] = added["content"]
    specials = {t["id"] for t in bpe["added_tokens"]}
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_token_list(tokens)
    if tokenizer_model == "gpt2":
        writer.add_tokenizer_pre(pre)
        writer.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    else:  # llama.cpp's types: 2 unknown, 3 control, 4 user-defined (an added token), 5 unused, 6 byte
        writer.add_token_types([2 if t == "<unk>" else 3 if t in ("<s>", "</s>") else 4 if i in specials else
                                5 if t.startswith("[PAD") else 6 if t.startswith("<0x") else 1
                                for i, t in enumerate(tokens)])
        writer.add_token_scores([-float(i) for i in range(len(tokens))])  # sentencepiece's: earlier is better
        writer.add_unk_token_id(0)
    if merges:
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["model"]["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    rng = np.random.default_rng(0)
    for key, tensor in reference.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        W = tensor.numpy().astype(np.float32)
        name = gguf_name(key, arch)
        if arch == "gemma3" and key.endswith("norm.weight"):
            W = W + 1  # llama.cpp's Gemma norms: the scale 1 + w
        if arch == "llama" and "self_attn.q_proj" in key:
            W = llama_cpp_permute(W, c.num_attention_heads)
        elif arch == "llama" and "self_attn.k_proj" in key:
            W = llama_cpp_permute(W, c.num_key_value_heads)
        if W.ndim == 1 or qtype == "F32":
            writer.add_tensor(name, W)
        elif qtype == "F16":
            writer.add_tensor(name, W.astype(np.float16))
        elif qtype == "Q8_0":
            writer.add_tensor(name, gguf.quants.quantize(W, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:  # Q4_K: random valid blocks where the input width allows (256 per block), F32 elsewhere
            if W.shape[1] % Q4_K_BLOCK:
                writer.add_tensor(name, W)
            else:
                writer.add_tensor(name, random_q4_k(W.shape, rng), raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def save_tokenizer_with_digit_merges(directory: Path) -> Path:
    """save_llama_tokenizer's byte-level BPE (no BOS) with two merges the pre-tokenizers decide between: "Ġ 1"
    (GPT-2's split keeps " 1" together, Llama 3's and Qwen2's put digits apart from the space) and "1 2" (Llama 3
    splits digits in threes, "123" + "4"; Qwen2 one by one). Returns its tokenizer.json."""
    save_llama_tokenizer(directory, None)
    path = directory / "tokenizer.json"
    bpe = json.loads(path.read_text())
    vocab = bpe["model"]["vocab"]
    for merged, merge in (("Ġ1", ["Ġ", "1"]), ("12", ["1", "2"])):
        vocab[merged] = len(vocab)
        bpe["model"]["merges"].append(merge)
    path.write_text(json.dumps(bpe))
    return path


def save_tiny_reference(directory: Path, arch: str, **overrides):
    import transformers

    config_class, kw = ARCHS[arch]
    kw = {**dict(vocab_size=LLAMA_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                 rms_norm_eps=1e-5), **kw, **overrides}
    torch.manual_seed(0)
    model_class = "Gemma3ForCausalLM" if arch == "gemma3" else config_class.replace("Config", "ForCausalLM")
    reference = getattr(transformers, model_class)(getattr(transformers, config_class)(**kw)).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    return reference


@pytest.fixture(autouse=True)
def gguf_cache(tmp_path, monkeypatch):
    """The unpacked config.json and tokenizer.json go to this test's own cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def transformers_gguf(path: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_K"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
@torch.no_grad()
def test_gguf_loads_as_transformers_loads_it(tmp_path, arch, qtype):
    wide = dict(hidden_size=256, intermediate_size=256) if qtype == "Q4_K" else {}  # Q4_K's 256-wide blocks
    reference = save_tiny_reference(tmp_path, arch, **wide)
    save_llama_tokenizer(tmp_path / "tok", None)
    path = tmp_path / f"tiny-{arch}-{qtype}.gguf"
    write_gguf(path, arch, reference, tmp_path / "tok" / "tokenizer.json", qtype)
    ours, theirs = models.load_model(path), transformers_gguf(path)
    assert ours.config.model_type == {"gemma3": "gemma3_text"}.get(arch, arch)
    ids = random_ids(2, 30, LLAMA_VOCAB)
    assert_close(ours(ids), theirs(ids).logits, FP32_ATOL, f"{arch} {qtype}: logits vs transformers' GGUF loading")
    if qtype == "F32":  # and the weights are the model's own: nothing lost on the way
        assert_close(ours(ids), reference(ids).logits, FP32_ATOL, f"{arch}: the F32 GGUF vs the model written")


@pytest.mark.parametrize("add_bos, pre", [(False, "qwen2"), (True, "llama-bpe"), (False, "smollm")])
def test_tokenizer_rebuilt_from_metadata_matches_transformers(tmp_path, add_bos, pre):
    import transformers

    reference = save_tiny_reference(tmp_path, "llama")
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", reference, save_tokenizer_with_digit_merges(tmp_path / "tok"), "F32", add_bos=add_bos,
               pre=pre)
    ours = models.load_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    rng = random.Random(3)
    for text in ["Hello, my dog is cute", "  two spaces\n\nand 12345 digits", "</s> <s>inside", "ümlaut ∑",
                 sentence(rng, 30), "a 1234 b"]:
        expected = theirs(text)["input_ids"]
        assert ours.encode(text) == expected, f"{pre} bos={add_bos} {text!r}: ours {ours.encode(text)} vs {expected}"
    assert (ours.encode("hi")[0] == 1) == add_bos


@pytest.mark.parametrize("arch, merges", [("llama", True), ("llama", False), ("phi3", False), ("gemma3", False)],
                         ids=["llama-merges", "llama-merges-from-scores", "phi3", "gemma3"])
def test_sentencepiece_tokenizer_rebuilt_from_metadata_matches_transformers(tmp_path, arch, merges):
    """Llama 2's, Mistral's and Phi-3's kind: "▁" for spaces, byte fallback, BOS added without an add_bos_token
    flag; the merges from the file, or derived from the scores where llama.cpp leaves them out."""
    import transformers

    reference = save_tiny_reference(tmp_path, arch)
    (tmp_path / "tok").mkdir()
    save_llama2_like_tokenizer(tmp_path / "tok")
    path = tmp_path / "sp.gguf"
    write_gguf(path, arch, reference, tmp_path / "tok" / "tokenizer.json", "F32", add_bos=None,
               tokenizer_model="llama", merges=merges)
    ours = models.load_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    rng = random.Random(4)
    for text in ["USER: What is in the picture? ASSISTANT: A cat.", "  two spaces\nand a newline", "ümlaut ∑ 日本",
                 "</s> <s>inside <image> x", " leading", sentence(rng, 20)]:
        expected = theirs(text)["input_ids"]
        assert ours.encode(text) == expected, f"{arch} {text!r}: ours {ours.encode(text)} vs {expected}"
        assert ours.decode(expected) == theirs.decode(expected, skip_special_tokens=True), text
    assert ours.encode("hi")[0] == 1, "BOS: added where the file does not say"
    assert ours.encode("a  b") != ours.encode("a b"), "every space is kept"


@pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason=f"{SMOLLM2_GGUF} not found (../shared provides it)")
@torch.no_grad()
def test_shared_smollm2_q4_1_matches_transformers():
    """The real file: Q4_1 and Q8_0 tensors, llama's q/k order, a byte-level BPE with ChatML control tokens.
    Loading it both ways takes about a minute on a busy CPU."""
    import transformers

    model, tokenizer = models.load_model(SMOLLM2_GGUF), models.load_tokenizer(SMOLLM2_GGUF)
    reference = transformers_gguf(SMOLLM2_GGUF)
    theirs = transformers.AutoTokenizer.from_pretrained(SMOLLM2_GGUF.parent, gguf_file=SMOLLM2_GGUF.name)
    for text in ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n", "The capital of France is", "  x\n\n 12345 ümlaut"]:
        assert tokenizer.encode(text) == theirs(text)["input_ids"], text
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris, and the capital of Germany is")])
    assert_close(model(ids), reference(ids).logits, FP32_ATOL, "SmolLM2 Q4_1 logits vs transformers' GGUF loading")


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_commands_run_on_a_gguf(tmp_path, arch, cli_data, capsys):
    """eval_ppl (every method) and the generation command (the packed decode where it runs) take --model x.gguf."""
    reference = save_tiny_reference(tmp_path, arch, initializer_range=0.3)
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(path, arch, reference, save_tokenizer_with_digit_merges(tmp_path / "tok"), "Q8_0")
    out = tmp_path / "ppl.json"
    code, _, err = run_main(cli_args(path, cli_data, "--rho", "0.5", "--methods", "dense", "wanda", "sparsegpt",
                                     "mumoe", "--calib", "ptb", "--datasets", "ptb", "--out", str(out)), capsys)
    assert code == 0, err[-2000:]
    ppl = {r["method"]: r["ppl"]["ptb"] for r in json.loads(out.read_text())["results"]}
    assert all(p > 1 for p in ppl.values()) and ppl["mumoe"] != ppl["dense"], ppl
    code, out, err = run_generate(["--model", str(path), "--rho", "0.5", "--prompt", "the cat", "--max-new-tokens",
                                   "3"], capsys)
    assert code == 0 and "--- μ-MoE, rho = 0.5" in out, err[-2000:]


# -----------------------------------------------------------------------------
# Bad files: one line, exit 2, before any work


def test_truncated_unsupported_and_missing_files_are_one_line(tmp_path, capsys):
    import eval_ppl

    reference = save_tiny_reference(tmp_path, "llama")
    save_llama_tokenizer(tmp_path / "tok", None)
    good = tmp_path / "good.gguf"
    write_gguf(good, "llama", reference, tmp_path / "tok" / "tokenizer.json", "F32")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    code, _, err = run_main(["--model", str(truncated)], capsys)
    assert_one_line_error(code, err, "truncated.gguf is not a readable GGUF file")

    reference = save_tiny_reference(tmp_path, "llama")
    other = tmp_path / "falcon.gguf"
    write_gguf(other, "falcon", reference, tmp_path / "tok" / "tokenizer.json", "F32")
    code, _, err = run_main(["--model", str(other)], capsys)
    assert_one_line_error(code, err, "GGUF architecture 'falcon' is not supported (supported: llama, qwen2, qwen3, "
                                     "phi3, gemma3)")
    code, _, err = run_main(["--model", str(tmp_path / "absent.gguf")], capsys)
    assert_one_line_error(code, err, "absent.gguf not found")


def test_unsupported_quantization_type_is_named(tmp_path):
    reference = save_tiny_reference(tmp_path, "llama")
    save_llama_tokenizer(tmp_path / "tok", None)
    path = tmp_path / "q8_1.gguf"
    write_gguf(path, "llama", reference, tmp_path / "tok" / "tokenizer.json", "F32")
    data = bytearray(path.read_bytes())
    reader = gguf.GGUFReader(path)
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    type_part = tensor.field.parts[-2]  # the tensor's info: name, n_dims, dims, type, offset; its type made Q8_1
    offset = type_part.ctypes.data - np.asarray(reader.data).ctypes.data
    data[offset : offset + 4] = np.array([gguf.GGMLQuantizationType.Q8_1], dtype=np.uint32).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(models.UsageError, match="quantized as Q8_1, which gguf .* cannot dequantize"):
        models.load_model(path)
