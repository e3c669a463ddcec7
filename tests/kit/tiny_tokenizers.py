"""Tiny tokenizers trained in milliseconds, saved as the hub saves them: a byte-level BPE like OPT's (vocab.json
and merges.txt, or tokenizer.json), one with LLaMA's special tokens, and one built like Llama-2's sentencepiece BPE.
"""

import json
import random
from pathlib import Path


import llava_model

from kit.data import sentence


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
