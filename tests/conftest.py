"""Fixtures shared by the test files: tiny models and data made once per module, one thread for tiny models."""

import random
import shutil

import pytest
import torch

from opt_model import load_tokenizer

from kit.data import TOKENIZER_DIR, sentence, write_rows, write_vqa_data
from kit.tiny_models import CLI_VOCAB, save_tiny_opt, save_vqa_llava
from kit.tiny_tokenizers import save_tiny_tokenizer


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on CUDA where present (half precision, offload, the selection "
                                       "kernels): what benchmarks/gpu_check.py runs with -m cuda")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: on a busy 2-core machine, handing each small op to a second thread costs ~10 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """The reference: transformers' OPT tokenizer, as SparseGPT and Wanda load it (use_fast=False), from
    the shared vocab.json and merges.txt with the Hub's tokenizer_config.json and special_tokens_map.json."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    for path in [TOKENIZER_DIR / "vocab.json", TOKENIZER_DIR / "merges.txt",
                 *(TOKENIZER_DIR / "hf-page-transcriptions").glob("*.json")]:
        shutil.copy(path, directory / path.name)
    return transformers.AutoTokenizer.from_pretrained(directory, use_fast=False)


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    """A tiny random OPT with a tiny BPE tokenizer beside it (save_tiny_tokenizer): what the command lines load,
    so that they run to success on any machine. The real tokenizer is checked on ../shared/data above."""
    directory = tmp_path_factory.mktemp("tiny_with_tokenizer")
    vocab = save_tiny_tokenizer(directory)
    assert vocab <= CLI_VOCAB, f"the tiny tokenizer has {vocab} ids, the model {CLI_VOCAB}"
    save_tiny_opt(directory, random_layer_norms=False, vocab_size=CLI_VOCAB, init_std=0.3)
    return directory


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory):
    """Train/test/validation rows of all three datasets in the --data-dir layout, made of random sentences."""
    data = tmp_path_factory.mktemp("cli_data")
    rng = random.Random(0)
    for dataset, split in [("wikitext2", "train"), ("wikitext2", "test"), ("ptb", "train"), ("ptb", "test"),
                           ("c4", "train"), ("c4", "validation")]:
        write_rows(data, dataset, split, [sentence(rng, rng.randint(3, 30)) for _ in range(40)])
    return data


@pytest.fixture
def data_dir(tmp_path):
    """ScienceQA and TextVQA as tiny parquet files with random images, in the --data-dir layout (write_vqa_data)."""
    return write_vqa_data(tmp_path / "data")


@pytest.fixture(scope="module")
def vqa_llava(tmp_path_factory):
    """A tiny random LLaVA with a tokenizer, saved in the Hugging Face layout: what eval_vqa answers with (the
    directory; save_vqa_llava). test_llava's `tiny_llava` is another: the parity model, with its reference."""
    return save_vqa_llava(tmp_path_factory.mktemp("vqa_llava"))


@pytest.fixture
def hub_online(monkeypatch):
    """The hub taken to answer (checkpoint.hub_offline: None), for the tests whose fake hub serves the downloads."""
    import checkpoint
    import corpora
    import vqa_tasks

    for module in (checkpoint, corpora, vqa_tasks):
        monkeypatch.setattr(module, "hub_offline", lambda: None)


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    """The packed kernels split rows over torch's threads: alone, and split in two (row blocks of 4 and a remainder)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
