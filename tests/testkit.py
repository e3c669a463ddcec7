"""What the tests and the benchmarks share: tiny models and tokenizers saved in the Hugging Face layout, random
token ids, the published SparseGPT `fasterprune` transcribed as a reference, the checks whose failure messages
explain themselves, and one timer.

Nothing here downloads anything: the models are random, the tokenizer is a byte-level BPE trained in milliseconds.
"""

import io
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import llava_model
from mumoe import MuMoE, mumoe_logits, routed_block
from opt_model import OPTConfig, OPTForCausalLM

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
TOKENIZER_DIR = SHARED_DATA / "opt-125m-tokenizer"


needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real data and tokenizer files not found at {SHARED_DATA} (CI provides them)")


# where the offload tests send the blocks: the CPU everywhere (only the moves can be seen), CUDA where present
OFFLOAD_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


CLI_VOCAB = 512  # the tiny command-line model's vocabulary: room for every id of the tiny tokenizer


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


def save_tiny_opt(directory: Path, seed=0, random_layer_norms=True, **overrides):
    """A random transformers OPTForCausalLM saved with save_pretrained; returns the reference model.

    `random_layer_norms`: random LayerNorm affines too, so that a swapped or skipped LayerNorm shows. Off for
    models whose perplexity must behave like a trained model's (pruning makes it worse)."""
    import transformers

    torch.manual_seed(seed)
    reference = transformers.OPTForCausalLM(tiny_hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "layer_norm" in name and random_layer_norms:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    reference.save_pretrained(directory)
    return reference


WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + " ."


TINY_TOKENIZER_VOCAB = 400  # at most; the BPE stops sooner when the text has no more pairs to merge


def save_tiny_tokenizer(directory: Path, tokenizer_json: bool = False) -> int:
    """A byte-level BPE like OPT's, trained in milliseconds on sentences of WORDS, with OPT's special tokens
    at OPT's ids (<s> 0, <pad> 1, </s> 2, <unk> 3); saved as vocab.json + merges.txt, or as tokenizer.json.
    The command lines run on it where the real tokenizer files (../shared/data) are absent. Returns its size."""
    from tokenizers import ByteLevelBPETokenizer

    rng = random.Random(0)
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator([sentence(rng, 12) for _ in range(200)], vocab_size=TINY_TOKENIZER_VOCAB,
                                  special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False)
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer_json:
        tokenizer.save(str(directory / "tokenizer.json"))
    else:
        tokenizer.save_model(str(directory))
    return tokenizer.get_vocab_size()


def write_rows(directory: Path, dataset: str, split: str, rows: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{dataset}.{split}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))


def random_ids(B: int, T: int, vocab: int, seed: int = 1, low: int = 0) -> torch.Tensor:
    """(B, T) token ids drawn uniformly from [low, vocab), the same for the same seed."""
    return torch.randint(low, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def timed(fns, repeats: int, device=None, warmup: bool = True):
    """Seconds of each of `repeats` calls of fn, after a warm-up call: a list for one function, name -> list for a
    dict of them. A dict's calls alternate round by round, so that a burst of load from another process on a shared
    CPU slows every candidate alike instead of skewing one ratio. CUDA's queue is drained around each call."""
    if callable(fns):
        return timed({"fn": fns}, repeats, device, warmup)["fn"]
    cuda = torch.device(device or "cpu").type == "cuda"
    seconds = {name: [] for name in fns}
    for round_ in range(repeats + warmup):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            if round_ >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def median_and_spread(seconds: list[float]) -> dict:
    """The median of some timings and their spread (min, max), as the benchmarks report them."""
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds)}


def rewrite_checkpoint(src: Path, dst: Path, edit=lambda state: state, shards=1):
    """Copy a saved tiny checkpoint, editing its tensors (`edit`: state dict -> state dict: rename, drop, add)
    and/or splitting it into shards. Returns `dst`."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    state = edit(load_file(src / "model.safetensors"))
    keys = sorted(state)
    if shards == 1:
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
        return dst
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, dst / name)
        weight_map.update(dict.fromkeys(part, name))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def save_opt_for_hflm(directory: Path, vocab_size: int = 512, max_position_embeddings: int = 64):
    """A tiny random OPT + the tiny BPE, saved in the Hugging Face layout with a tokenizer_config.json that makes
    transformers' tokenizer OPT's (BOS </s> prepended), so that HFLM reads the very same checkpoint. Returns (directory, transformers' model)."""
    save_tiny_tokenizer(directory)
    reference = save_tiny_opt(directory, random_layer_norms=False, vocab_size=vocab_size, init_std=0.3,
                              max_position_embeddings=max_position_embeddings)
    special = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "add_prefix_space": False, **special}))
    return directory, reference


def write_multiple_choice_task(directory, name="tiny_mc", docs=12, seed=5):
    """A three-way multiple-choice task YAML over a local JSON-lines file."""
    rng = random.Random(seed)
    rows = [{"context": sentence(rng, 6), "choices": rng.sample(WORDS, 3), "label": rng.randrange(3)}
            for _ in range(docs)]
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return rows


def assert_close(ours, ref, atol, what):
    diff = (ours.float() - ref.float()).abs()
    worst = diff.flatten().argmax().item()
    assert diff.max() <= atol, (f"{what}: max |diff| {diff.max():.3e} > {atol:.2g}; first disagreement at flat "
                                f"index {worst}: ours {ours.flatten()[worst]:.6f} vs ref {ref.flatten()[worst]:.6f}")


def assert_one_line_error(code, err: str, *fragments: str) -> None:
    """A user's error: exit code 2 and one line on stderr that says each of `fragments`."""
    assert code == 2, f"exit {code}, expected 2; stderr: {err[-2000:]}"
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line on stderr: {err[-2000:]!r}"
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def said_lines(stderr: str) -> list[str]:
    """The lines of a stderr that are not a progress bar (tqdm's bars end their lines with \\r, then go)."""
    return [line for line in stderr.replace("\r", "\n").splitlines()
            if line.strip() and not re.search(r"\d+/\d+ \[|\d+it \[", line)]


def n_diff(a, b):
    """How many entries differ: a count reads better in a failure message than two tensor dumps."""
    return int((a != b).sum())


def record_moves(monkeypatch) -> list[tuple[nn.Module, torch.device]]:
    """Every `module.to(device)` call from here on, in order: with device = cpu, the only trace an offload leaves."""
    moves, to = [], nn.Module.to

    def recording_to(module, device, *args, **kwargs):
        moves.append((module, torch.device(device)))
        return to(module, device, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", recording_to)
    return moves


def assert_each_visits(modules, moves, device, what):
    """Each module went to `device` once and then back to the CPU, and stayed there."""
    for name, module in modules.items():
        trips = [to.type for m, to in moves if m is module]
        assert trips == [device, "cpu"], f"{what}: {name} was moved to {trips}, expected [{device!r}, 'cpu']"
        where = {p.device.type for p in module.parameters()}
        assert where == {"cpu"}, f"{what}: {name}'s parameters are on {where} after the loop"


def reference_fasterprune(W, H, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=.01, exact=True):
    """IST-DASLab/sparsegpt fasterprune, line for line, less quantization and logging. One change, unless
    `exact=False`: the reference's `thresh = sort(tmp)[int(numel * sparsity)]` with `tmp <= thresh` prunes k + 1
    weights of a block (more with ties); `exact` takes `[k - 1]`, which prunes exactly k, the same set as ours on
    inputs without ties (random floats), where the reference's N:M topk also picks the same N as our stable sort."""
    W, H = W.clone().float(), H.clone()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity) - exact]  # reference: [int(...)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def cli_args(model: Path, data: Path, *extra) -> list[str]:
    return ["--model", str(model), "--data-dir", str(data), "--seqlen", "16", "--nsamples", "2",
            "--max-windows", "3", "--device", "cpu", *extra]


def run_main(argv, capsys) -> tuple[int, str, str]:
    """Run eval_ppl.main in this process: (exit code, stdout, stderr)."""
    import eval_ppl  # a command: imported only by the tests that run it

    try:
        code = eval_ppl.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def run_generate(argv, capsys) -> tuple[int, str, str]:
    """Run generate.main in this process: (exit code, stdout, stderr)."""
    import generate  # a command: imported only by the tests that run it

    try:
        generate.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def report_of(argv: list[str], capsys) -> dict:
    """Run eval_ppl.main in this process; it must succeed. Returns its JSON report (argv names --out)."""
    code, _, err = run_main(argv, capsys)
    assert code == 0, f"exit {code}: {err[-2000:]}"
    return json.loads(Path(argv[argv.index("--out") + 1]).read_text())


# -----------------------------------------------------------------------------
# Tiny LLaMA-family models and LLaVAs, with their tokenizers

LLAMA_VOCAB = 512  # the tiny LLaMAs' vocabulary: room for every id of their tokenizer


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


# name -> (transformers config class, overrides): GQA, tied and untied heads, rope_scaling linear and llama3, an
# explicit head_dim, q/k/v biases (Qwen2), Mistral's sliding window (longer than the model's positions)
TINY_LLAMAS = {
    "llama_gqa": ("LlamaConfig", dict(num_key_value_heads=2)),
    "llama_tied_linear_rope": ("LlamaConfig", dict(tie_word_embeddings=True,
                                                   rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama3_rope_head_dim": ("LlamaConfig", dict(num_key_value_heads=1, head_dim=24, rope_theta=500000.0,
                                                 rope_scaling=LLAMA3_ROPE)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=4096)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=None)),
}


def save_tiny_llama(directory: Path, kind: str = "llama_gqa", seed: int = 0, random_norms: bool = True, **overrides):
    """A random transformers model of the LLaMA family saved with save_pretrained (the transformers 5 config layout);
    returns it. `random_norms`: random RMSNorm weights and biases too, so a swapped or skipped one shows."""
    import transformers

    config_class, kw = TINY_LLAMAS[kind]
    kw = {**dict(vocab_size=LLAMA_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64), **kw, **overrides}
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**kw)
    reference = getattr(transformers, config_class.replace("Config", "ForCausalLM"))(config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if random_norms and ("norm" in name or name.endswith("bias")):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    reference.save_pretrained(directory)
    return reference


def save_llama_tokenizer(directory: Path, bos: str | None) -> None:
    """A byte-level BPE with LLaMA's special tokens at LLaMA's ids (<unk> 0, <s> 1, </s> 2), trained in the test;
    its post-processor puts `bos` in front (Llama 2, Mistral, Llama 3's <|begin_of_text|>), or nothing (Qwen2)."""
    from tokenizers import Tokenizer, decoders, models as bpe_models, pre_tokenizers, processors, trainers

    rng = random.Random(0)
    tokenizer = Tokenizer(bpe_models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|begin_of_text|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([sentence(rng, 12) for _ in range(200)], trainer)
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))


TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   image_size=56, patch_size=14)  # a 4x4 grid of patches


def randomize_layer_norms(model, seed=0):
    """Random LayerNorm affines, so that a swapped or skipped LayerNorm shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name or "layernorm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if name.endswith("weight") else 0.0))


IMAGE_ID = 100  # the tiny model's image_token_index (llava-hf's is 32000)


TINY_TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)


N_FEATURES = 16  # 56 px / 14 = a 4x4 grid of patches, CLS dropped


def save_tiny_llava(directory, seed=0, vocab_size=128, image_token_index=IMAGE_ID):
    """A random transformers LlavaForConditionalGeneration saved with save_pretrained; returns the reference."""
    import transformers

    torch.manual_seed(seed)
    text = transformers.LlamaConfig(**{**TINY_TEXT, "vocab_size": vocab_size})
    config = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**TINY_VISION), text_config=text,
                                      image_token_index=image_token_index, image_seq_length=N_FEATURES)
    reference = transformers.LlavaForConditionalGeneration(config).eval()
    randomize_layer_norms(reference)
    with torch.no_grad():  # RMSNorm weights too (named *layernorm / norm in LLaMA)
        for name, p in reference.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    reference.save_pretrained(directory)
    return reference


def save_llama2_like_tokenizer(directory) -> int:
    """A tokenizer.json built like Llama-2's: sentencepiece-style BPE on "▁"-joined words with a "▁" put in front
    of every text, byte fallback (<0x0A> for a newline, unseen in training), BOS <s> added by the post-processor,
    and "<image>" added as a special token, as llava-hf's tokenizer has it. Returns the image token's id."""
    from tokenizers import Tokenizer, decoders, models as bpe_models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(bpe_models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    corpus = [llava_model.VICUNA_V1_SYSTEM, "USER: What is in the picture? ASSISTANT: A cat on a mat.",
              "USER: Describe the image in detail. ASSISTANT: It shows two dogs."] * 3
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # no merges across words in training
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=180, special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer.pre_tokenizer = None  # as in Llama-2's tokenizer.json
    path = directory / "tokenizer.json"
    tokenizer.save(str(path))
    data = json.loads(path.read_text())  # the byte tokens after the trained vocabulary, as fallback
    vocab = data["model"]["vocab"]
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    data["model"].update(byte_fallback=True, fuse_unk=True)
    path.write_text(json.dumps(data))
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(["<image>"])
    tokenizer.save(str(path))
    return tokenizer.token_to_id("<image>")


# -----------------------------------------------------------------------------
# ScienceQA and TextVQA as tiny parquet files with random images, in the hub's layout, and a LLaVA to answer them

def png(seed: int, size=(24, 16), mode="RGB") -> bytes:
    from PIL import Image

    rng = random.Random(seed)
    image = Image.new(mode, size)
    image.putdata([tuple(rng.randrange(256) for _ in mode) for _ in range(size[0] * size[1])])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


VQA_WORDS = "red blue cat dog stop sign yes no two three the shop open".split()


def scienceqa_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        choices = [rng.choice(VQA_WORDS) for _ in range(rng.randint(2, 5))]
        rows.append(dict(image={"bytes": png(seed * 1000 + i), "path": None} if i % 3 else None,
                         question=f"Which one is {rng.choice(VQA_WORDS)}?", choices=choices,
                         answer=rng.randrange(len(choices)), hint=rng.choice(["", "Look closely."]),
                         lecture="", solution=""))
    return rows


def textvqa_rows(n: int, seed: int = 0, first_id: int = 100) -> list[dict]:
    rng = random.Random(seed)
    return [dict(image={"bytes": png(seed * 1000 + i, size=(20 + i, 30)), "path": None}, image_id=f"img{i}",
                 question_id=first_id + i, question=f"what does the {rng.choice(VQA_WORDS)} say?",
                 answers=[rng.choice(VQA_WORDS[:4]) for _ in range(10)],
                 ocr_tokens=[rng.choice(VQA_WORDS) for _ in range(rng.randint(0, 3))]) for i in range(n)]


def write_parquet(path: Path, rows: list[dict], drop=()) -> Path:
    import pyarrow
    import pyarrow.parquet

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{k: v for k, v in row.items() if k not in drop} for row in rows]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


def write_vqa_data(directory: Path) -> Path:
    """Both tasks in the --data-dir layout: ScienceQA in one file, TextVQA in two, as the hub shards them."""
    write_parquet(directory / "scienceqa" / "test-00000-of-00001.parquet", scienceqa_rows(9))
    rows = textvqa_rows(8)
    write_parquet(directory / "textvqa" / "validation-00000-of-00002.parquet", rows[:5])
    write_parquet(directory / "textvqa" / "validation-00001-of-00002.parquet", rows[5:])
    return directory


VQA_IMAGE_ID = 500  # the tiny model's image_token_index: above the tokenizer's 400 ids, below the vocabulary
VQA_LLAVA_TEXT = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                      initializer_range=0.3)  # larger than the default 0.02: answers that depend on the prompt
VQA_LLAVA_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        image_size=28, patch_size=14)  # 2x2 patches: 4 features per image


def save_vqa_llava(directory: Path) -> Path:
    """A random transformers LlavaForConditionalGeneration saved with save_pretrained, with a byte-level BPE
    tokenizer trained here (LLaMA's <unk> <s> </s> at 0 1 2, <s> put in front): what eval_vqa's tests answer with."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**VQA_LLAVA_VISION),
                                      text_config=transformers.LlamaConfig(**VQA_LLAVA_TEXT),
                                      image_token_index=VQA_IMAGE_ID, image_seq_length=4)
    transformers.LlavaForConditionalGeneration(config).save_pretrained(directory)
    save_llama_tokenizer(directory, "<s>")
    return directory


def vqa_command(model_dir, data_dir, out, *extra) -> list[str]:
    """eval_vqa.py's arguments for a quick run on save_vqa_llava's model and write_vqa_data's questions: two ratios, every method, both μ-MoE routings, 4 calibration prompts, short answers."""
    return [str(a) for a in ["--model", model_dir, "--data-dir", data_dir, "--out", out, "--rho", "0.6", "0.4",
                             "--mumoe-routing", "block", "linear", "--nsamples", "4", "--max-new-tokens", "6",
                             "--device", "cpu", *extra]]


# -----------------------------------------------------------------------------
# Ranks started as torchrun starts them

RANK_TIMEOUT = 180  # seconds a rank may take here before the test calls it a hang (a run takes ~5 s)


def launch(script: str, argv: list[str], ranks: int, log: Path, **env) -> tuple[dist.TCPStore, list]:
    """Start `ranks` processes of `python -c script argv` as torchrun would; the store is returned with them
    and must be kept alive until they end (it is their rendezvous)."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    common = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), WORLD_SIZE=str(ranks),
                  LOCAL_WORLD_SIZE=str(ranks), TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0",
                  OMP_NUM_THREADS="1", WRITES_LOG=str(log), **env)
    procs = [subprocess.Popen([sys.executable, "-c", script, *argv], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=dict(common, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(ranks)]
    return store, procs


def finish(procs) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each rank; a rank that does not end in time is a hang."""
    results = []
    for rank, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=RANK_TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"rank {rank} hangs")
        results.append((proc.returncode, out, err))
    return results

# -----------------------------------------------------------------------------
# What the benchmarks measure on: random OPTs at OPT's init, the forward modes, block-by-block pairs

OPT_INIT_STD = 0.02  # OPT's init_std


def random_opt(config: OPTConfig) -> OPTForCausalLM:
    torch.manual_seed(0)
    model = OPTForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" not in name:  # LayerNorms keep weight 1, bias 0
                p.normal_(0, OPT_INIT_STD)
    return model.requires_grad_(False).eval()


def save_random_opt(directory: Path, config: OPTConfig) -> None:
    """random_opt's model as a checkpoint in the Hugging Face layout (lm_head tied, so not stored)."""
    from safetensors.torch import save_file

    directory.mkdir()
    state = random_opt(config).state_dict()
    save_file({f"model.{k}": v for k, v in state.items() if k != "lm_head.weight"}, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(dict(asdict(config), model_type="opt")))


def forward_modes(model, ids, rho: float, selects) -> dict:
    """name -> a function running one forward pass in that mode."""
    modes = {"dense": lambda: model(ids)}
    for routing in ("linear", "block"):
        modes.update({f"mumoe {routing} {s}": (lambda r=routing, s=s: mumoe_logits(model, ids, MuMoE(rho, routing=r,
                                                                                                     select=s)))
                      for s in selects})
    return modes


@torch.no_grad()
def paired_blocks(model, ids, rho: float, select: str, repeats: int) -> dict[str, list[float]]:
    """Each mode's forward time / dense, estimated block by block: per-repeat ratios, one per repeat.

    The machine's speed drifts over the seconds a whole forward takes, so here each block runs in every
    mode back to back on the same input (the dense pass's hidden states), in a rotating order, and a
    repeat's forward is the embedding and head (dense in every mode) plus its block times.
    """
    modes = {"dense": lambda block, x: block(x)}
    for routing in ("linear", "block"):
        run = routed_block(MuMoE(rho, routing=routing, select=select))
        modes[f"mumoe {routing} {select}"] = lambda block, x, run=run: run(block, x)
    x = model.embed(ids)
    outside = statistics.median(timed(lambda: model.head(x), repeats)) + statistics.median(timed(lambda: model.embed(ids), repeats))
    totals = {name: [outside] * repeats for name in modes}
    for block in model.blocks:
        for fn in modes.values():  # warm-up
            fn(block, x)
        for r in range(repeats):
            for name in list(modes)[r % len(modes):] + list(modes)[: r % len(modes)]:
                start = time.perf_counter()
                modes[name](block, x)
                totals[name][r] += time.perf_counter() - start
        x = block(x)
    return {name: [t / d for t, d in zip(ts, totals["dense"])] for name, ts in totals.items()}


def tied_rows(S: torch.Tensor, k: int) -> int:
    """Rows with more than k scores <= their k-th smallest: the rows the exact-k tie step redoes."""
    return int(((S <= torch.kthvalue(S, k, dim=1).values[:, None]).sum(dim=1) > k).sum())


def watch_offload(monkeypatch) -> list[tuple[str, nn.Module]]:
    """Every block turn of checkpoint.offloaded from here on, ("visit" | "leave", block) in order: on the CPU, where a
    visit moves nothing, the only trace it leaves."""
    import checkpoint

    events, visit, leave = [], checkpoint.visit, checkpoint.leave
    def visiting(block, device):
        events.append(("visit", block))
        return visit(block, device)

    def leaving(block, kept):
        events.append(("leave", block))
        leave(block, kept)

    monkeypatch.setattr(checkpoint, "visit", visiting)
    monkeypatch.setattr(checkpoint, "leave", leaving)
    return events


def assert_one_block_at_a_time(events: list[tuple[str, nn.Module]], least: int, what: str) -> None:
    """Each visit of a block is followed by its leave, before any other block visits; `least` visits at least."""
    kinds = [kind for kind, _ in events]
    paired = all(events[i][1] is events[i + 1][1] for i in range(0, len(events), 2))
    assert kinds == ["visit", "leave"] * (len(kinds) // 2) and paired, f"{what}: a block was not brought back at once"
    assert kinds.count("visit") >= least, f"{what}: {kinds.count('visit')} block turns, expected {least} at least"
