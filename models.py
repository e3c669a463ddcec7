"""Which model family a checkpoint is: `load_model` and `load_tokenizer` for any supported `model_type`.

This file sits above the model files and below everything that loads a model by name (the commands,
mumoe's generation CLI). It reads `config.json`'s `model_type` and hands the checkpoint to its family:

    opt                       opt_model.py
    llama, mistral, qwen2,    llama_model.py
    qwen3, phi3
    gemma3_text, gemma3       gemma_model.py (a gemma3 checkpoint: its language model, the vision tower skipped)
    llava                     llava_model.py (LLaVA-1.5; the other LLaVA variants are refused by name)

The text commands (eval_ppl.py, eval_tasks.py, generate.py) run a LLaVA's language model on text:
`text_family` gives them a LLaVA's Vicuna as a LLaMA, so that what μ-MoE costs the language model itself can be
measured with the same perplexity and task protocols. Nothing is guessed from a model's name.
"""

from types import SimpleNamespace

import torch
import torch.nn as nn

import gemma_model
import llama_model
import llava_model
import opt_model
from checkpoint import UsageError, empty_modules, read_config_json, resolve_checkpoint

FAMILIES = {"opt": opt_model, **{model_type: llama_model for model_type in llama_model.MODEL_TYPES},
            **{model_type: gemma_model for model_type in gemma_model.MODEL_TYPES}, "llava": llava_model}


def family(name_or_path):
    """The model file that builds this checkpoint's `model_type`; a clear error naming the supported ones."""
    if str(name_or_path).startswith("liuhaotian/"):  # refused by name, before anything is downloaded
        raise UsageError(llava_model.ORIGINAL_LLAVA)
    directory = resolve_checkpoint(str(name_or_path))
    model_type = read_config_json(directory / "config.json").get("model_type")
    if model_type in llava_model.OTHER_VARIANTS:  # named, so that a user knows which LLaVA this is
        raise UsageError(f"{directory}: {llava_model.unsupported_variant(model_type)}")
    if model_type not in FAMILIES:
        raise UsageError(f"{directory}: model_type {model_type!r} is not supported (supported: "
                         f"{', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def read_config(name_or_path):
    """The frozen config of a checkpoint, of its family's class."""
    directory = resolve_checkpoint(str(name_or_path))
    return family(directory).read_config(directory / "config.json")


def empty_model(config) -> nn.Module:
    """The model a config describes, on the meta device: its shapes, with no memory and no weights."""
    module = next(f for f in FAMILIES.values() if isinstance(config, f.CONFIG_CLASS))
    with empty_modules():
        return module.MODEL_CLASS(config)


def load_model(name_or_path, device="cpu", dtype=torch.float32) -> nn.Module:
    return family(name_or_path).load_model(name_or_path, device, dtype)


def load_tokenizer(name_or_path):
    return family(name_or_path).load_tokenizer(name_or_path)


# A LLaVA's language model, for the text commands: read, loaded and tokenized as the LLaMA it is. The whole LLaVA
# loads (strictly, every key checked) and its vision tower and projector are dropped.
LLAVA_LANGUAGE_MODEL = SimpleNamespace(
    FAMILY=llama_model.FAMILY,
    read_config=lambda path: llava_model.read_config(path).text_config,
    load_model=lambda name, device="cpu", dtype=torch.float32: llava_model.load_llava(name, device, dtype).language_model,
    load_tokenizer=llava_model.load_tokenizer,
)


def text_family(name_or_path):
    """What a text command runs of a checkpoint: its own family, or for a LLaVA its language model's."""
    found = family(name_or_path)
    return LLAVA_LANGUAGE_MODEL if found is llava_model else found
