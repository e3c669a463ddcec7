"""Tiny random models saved in the Hugging Face layout, each returning transformers' model as the reference:
OPT in both checkpoint layouts, the LLaMA family (GQA, RoPE scalings, biases, tied heads), LLaVA-1.5, and OPTs at
OPT's own init for the benchmarks. Nothing is downloaded.
"""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from opt_model import OPTConfig, OPTForCausalLM

from kit.tiny_tokenizers import save_llama_tokenizer, save_tiny_tokenizer


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


# -----------------------------------------------------------------------------
# The three models the decoding tests run (packed, Triton, streamed): an OPT with biases, a GQA LLaMA, a LLaVA


def decoding_opt() -> OPTForCausalLM:
    """A tiny OPT whose Linears have weights of std 2/sqrt(d_in), so that every block matters to the greedy tokens,
    and random biases, which a packed or streamed Linear must add."""
    torch.manual_seed(0)
    config = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                       max_position_embeddings=64, word_embed_proj_dim=32)
    model = OPTForCausalLM(config).requires_grad_(False).eval()
    for block in model.blocks:
        for layer in block.linears().values():
            layer.weight.normal_(0, 2.0 / layer.in_features ** 0.5)
            layer.bias.normal_(0, 0.1)
    return model


def decoding_models(mktemp, device="cpu") -> dict:
    """name -> (our language model on `device`, a prompt: ids, or an embedded LLaVA prompt with its image features);
    `mktemp(name)` gives a fresh directory (pytest's tmp_path_factory.mktemp)."""
    import llama_model
    import llava_model

    ids = torch.randint(3, 100, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    llama_dir, llava_dir = mktemp("llama_gqa"), mktemp("llava")
    save_tiny_llama(llama_dir, "llama_gqa")
    save_tiny_llava(llava_dir)
    llava = llava_model.load_llava(llava_dir, device)
    with torch.no_grad():
        pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(2)).to(device)  # the tower's size
        embedded = llava.embed_prompt(torch.tensor([[1, IMAGE_ID, *ids[:6]]], device=device), pixels)
    return {"opt": (decoding_opt().to(device), ids), "llama (GQA)": (llama_model.load_model(llama_dir, device), ids),
            "llava": (llava.language_model, embedded)}
