"""checkpoint: what the families share, here naming a model on the hub and converting pytorch_model.bin files to
safetensors, checked by loading the result against transformers' OPTForCausalLM (a test-only oracle)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint
from checkpoint import UsageError
from opt_model import load_model
from kit.checks import assert_close
from kit.tiny_models import save_tiny_opt

PARITY_ATOL = 1e-4  # fp32 logits of two implementations of the same arithmetic (as in test_opt_model)


def test_pytorch_bin_is_converted_once(tmp_path, monkeypatch, hub_online):
    """A hub repo with only pytorch_model.bin: converted once to safetensors in the cache, then reused."""
    import huggingface_hub

    snapshot = tmp_path / "hub" / "models--facebook--opt-125m" / "snapshots" / "abc123"
    reference = save_tiny_opt(tmp_path / "saved")
    snapshot.mkdir(parents=True)
    shutil.copy(tmp_path / "saved" / "config.json", snapshot / "config.json")
    state = {k.removeprefix("model."): v for k, v in reference.state_dict().items()}  # metaseq-style keys, tied head
    torch.save(state, snapshot / "pytorch_model.bin")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns, local_files_only=False):
        calls.append((repo_id, allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ids = torch.randint(0, 128, (1, 10))
    for _ in range(2):
        model = load_model("opt-125m")
        with torch.no_grad():
            assert_close(model(ids), reference(ids).logits, PARITY_ATOL, "logits from converted .bin")
    converted = tmp_path / "mumoe-safetensors" / "models--facebook--opt-125m" / "abc123"
    assert (converted / "model.safetensors").is_file()
    assert [c[0] for c in calls] == ["facebook/opt-125m"] * 3, "converts on the first load only"


def test_multi_shard_pytorch_bin_is_converted(tmp_path):
    """Two pytorch_model-0000i-of-00002.bin files become two safetensors shards and an index that loads."""
    reference = save_tiny_opt(tmp_path / "saved")
    src = tmp_path / "bin"
    src.mkdir()
    shutil.copy(tmp_path / "saved" / "config.json", src / "config.json")
    state = {k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}  # tied: not saved
    keys = sorted(state)
    for i in range(2):
        torch.save({k: state[k] for k in keys[i::2]}, src / f"pytorch_model-{i + 1:05d}-of-00002.bin")
    checkpoint.convert_to_safetensors(src, tmp_path / "converted")
    assert sorted(p.name for p in (tmp_path / "converted").iterdir()) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json"]
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        assert_close(load_model(tmp_path / "converted")(ids), reference(ids).logits, PARITY_ATOL,
                     "logits from a converted 2-shard .bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds neither .*safetensors nor pytorch_model.*bin weights"):
        checkpoint.convert_to_safetensors(tmp_path / "empty", tmp_path / "converted-empty")


@pytest.mark.parametrize("name, repo", [("opt-125m", "facebook/opt-125m"), ("opt-13b", "facebook/opt-13b"),
                                        ("facebook/opt-350m", "facebook/opt-350m"), ("me/my-opt", "me/my-opt"),
                                        ("opt-7b", None), ("gpt2", None), ("./a/b/c", None)])
def test_model_names(name, repo):
    assert checkpoint.hub_repo_id(name) == repo


REPO = Path(__file__).resolve().parent.parent
OFFLINE_SECONDS = 60  # offline is said within HUB_TIMEOUT (3 s) of the start; imports take the rest on a busy machine


def test_an_offline_hub_is_one_line_at_once(tmp_path):
    """A model that is not in the cache, the hub's host refusing connections: one line naming the offline hub, exit
    2, no retries. (huggingface_hub alone retried for ~49 s, 22 lines of 'Retrying in 1s', then the error.)"""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path)}  # port 9: refused at once
    env.pop("HF_HUB_OFFLINE", None)
    start = time.monotonic()
    run = subprocess.run([sys.executable, "eval_ppl.py", "--model", "someone/some-model", "--methods", "dense"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - start
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr[-2000:]
    assert "not in the local Hugging Face cache, and the hub is offline (127.0.0.1 cannot be reached" in run.stderr
    assert seconds < OFFLINE_SECONDS, f"{seconds:.0f} s to say the hub is offline"


def test_offline_downloads_read_the_cache_only(monkeypatch, tmp_path):
    """Offline, every hub download asks huggingface_hub for the local cache only; a miss is the one line."""
    import corpora
    import huggingface_hub
    import vqa_tasks
    from huggingface_hub.errors import LocalEntryNotFoundError

    asked = []

    def cache_only(*args, local_files_only=False, **kwargs):
        asked.append(local_files_only)
        raise LocalEntryNotFoundError("not in the cache")

    for module in (checkpoint, corpora, vqa_tasks):
        monkeypatch.setattr(module, "hub_offline", lambda: "the test's hub is offline")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cache_only)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", cache_only)
    for load in (lambda: checkpoint.resolve_checkpoint("someone/some-model"),
                 lambda: corpora.load_rows("wikitext2", "test"), lambda: vqa_tasks.task_files("scienceqa")):
        with pytest.raises(UsageError, match=r"not in the local Hugging Face cache, and the hub is offline \(the test"):
            load()
    assert asked == [True] * 3, f"local_files_only per download: {asked}"


def test_loading_a_model_leaves_torch_dynamo_unimported(tmp_path):
    """Models are built on the meta device with nn.init's draws skipped (checkpoint.empty_modules): a random draw on
    the meta device imports torch._dynamo (and triton, ~2 s) under torch's C++ dispatch, where a Ctrl-C aborted the
    process with a traceback (CI, test_ctrl_c's two-rank eval_ppl). Catches a family built under torch.device("meta")
    alone: checked in a fresh process, for OPT, a LLaMA and Gemma 3."""
    from kit.tiny_models import save_tiny_llama
    from test_gemma import save_tiny_gemma

    save_tiny_opt(tmp_path / "opt")
    save_tiny_llama(tmp_path / "llama")
    save_tiny_gemma(tmp_path / "gemma")
    code = f"""
import sys
import models
for name in ("opt", "llama", "gemma"):
    models.load_model({str(tmp_path)!r} + "/" + name)
    print(name, "torch._dynamo" in sys.modules)
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["opt", "False", "llama", "False", "gemma", "False"], run.stdout
