"""Every command on every model family: each one serves a `model_type` or refuses it in one line (exit 2) before
any work. The text commands (eval_ppl, eval_tasks, the generation command) serve every type, a LLaVA through
its language model; eval_vqa serves LLaVA and refuses the others by name."""

import json
import math
import random

import pytest
import torch

import eval_ppl
import eval_tasks
import eval_vqa
import generate
from kit.commands import cli_args, run_command
from kit.data import sentence, write_multiple_choice_task
from kit.tiny_models import save_tiny_llama, save_tiny_llava
from kit.tiny_tokenizers import save_llama2_like_tokenizer, save_llama_tokenizer

pytest.importorskip("lm_eval")  # eval_tasks' rows

FAMILIES = ("opt", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text", "llava")
TINY_LLAMA_KINDS = {"llama": ("llama_gqa", "<s>"), "mistral": ("mistral", "<s>"), "qwen2": ("qwen2", None)}
# the newer families: transformers config class, overrides (a sliding window of 8, shorter than the 16-token windows)
NEWER_KINDS = {"qwen3": ("Qwen3Config", dict(head_dim=24, tie_word_embeddings=True), None),
               "phi3": ("Phi3Config", dict(sliding_window=8, pad_token_id=0, eos_token_id=2), "<s>"),
               "gemma3_text": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=8, eos_token_id=2,
                                                        layer_types=["sliding_attention", "full_attention"]), "<s>")}


def save_newer(directory, config_class: str, overrides: dict) -> None:
    """A tiny random model of a newer family (init std 0.3, so that pruning moves its perplexity), saved as the
    hub has it."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**dict(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3), **overrides})
    model_class = "Gemma3ForCausalLM" if config_class == "Gemma3TextConfig" else config_class.replace("Config",
                                                                                                       "ForCausalLM")
    getattr(transformers, model_class)(config).save_pretrained(directory)


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, tiny_with_tokenizer) -> dict:
    """model_type -> a tiny random model of it with a tokenizer, in the Hugging Face layout."""
    directories = {"opt": tiny_with_tokenizer}
    for model_type, (kind, bos) in TINY_LLAMA_KINDS.items():
        directories[model_type] = directory = tmp_path_factory.mktemp(model_type)
        save_llama_tokenizer(directory, bos)
        save_tiny_llama(directory, kind, random_norms=False, initializer_range=0.3)
    for model_type, (config_class, overrides, bos) in NEWER_KINDS.items():
        directories[model_type] = directory = tmp_path_factory.mktemp(model_type)
        save_llama_tokenizer(directory, bos)
        save_newer(directory, config_class, overrides)
    directories["llava"] = directory = tmp_path_factory.mktemp("llava")
    image_id = save_llama2_like_tokenizer(directory)
    save_tiny_llava(directory, vocab_size=image_id + 1, image_token_index=image_id)
    for model_type, directory in directories.items():
        assert json.loads((directory / "config.json").read_text())["model_type"] == model_type
    return directories


@pytest.fixture(scope="module")
def task_setup(tmp_path_factory):
    """A local multiple-choice task and PTB-like calibration rows: eval_tasks runs offline."""
    tasks, rows = tmp_path_factory.mktemp("tasks"), tmp_path_factory.mktemp("rows")
    write_multiple_choice_task(tasks, docs=3)
    rng = random.Random(6)
    (rows / "ptb.train.jsonl").write_text("".join(json.dumps({"text": sentence(rng, 12)}) + "\n" for _ in range(20)))
    return tasks, rows




def results_of(path) -> list[dict]:
    return json.loads(path.read_text())["results"]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_eval_ppl_serves(model_type, family_models, cli_data, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    argv = cli_args(family_models[model_type], cli_data, "--rho", "0.5", "--methods", "dense", "wanda", "mumoe",
                    "--calib", "ptb", "--datasets", "ptb", "--out", str(out))
    code, _, err = run_command(eval_ppl.main, argv, capsys)
    assert code == 0, err[-2000:]
    rows = {r["method"]: r["ppl"]["ptb"] for r in results_of(out)}
    assert set(rows) == {"dense", "wanda", "mumoe"} and all(math.isfinite(p) and p > 1 for p in rows.values()), rows
    assert abs(rows["mumoe"] / rows["dense"] - 1) > 1e-3, f"μ-MoE at rho 0.5 is the dense model: {rows}"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_eval_tasks_serves(model_type, family_models, task_setup, tmp_path, capsys):
    tasks, rows = task_setup
    out = tmp_path / "tasks.json"
    argv = ["--model", str(family_models[model_type]), "--include-path", str(tasks), "--tasks", "tiny_mc",
            "--methods", "dense", "wanda", "mumoe", "--rho", "0.5", "--calib", "ptb", "--data-dir", str(rows),
            "--nsamples", "2", "--seqlen", "32", "--out", str(out)]
    code, _, err = run_command(eval_tasks.main, argv, capsys)
    assert code == 0, err[-2000:]
    assert [r["method"] for r in results_of(out)] == ["dense", "wanda", "mumoe"]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_generation_command_serves(model_type, family_models, capsys):
    argv = ["--model", str(family_models[model_type]), "--rho", "0.5", "--prompt", "the cat", "--max-new-tokens", "3"]
    code, out, err = run_command(generate.main, argv, capsys)
    assert code == 0, err[-2000:]
    assert "--- dense:" in out and "--- μ-MoE, rho = 0.5" in out, out


@pytest.mark.parametrize("model_type", [t for t in FAMILIES if t != "llava"])
def test_eval_vqa_refuses_a_text_model_by_name(model_type, family_models, tmp_path, capsys):
    argv = ["--model", str(family_models[model_type]), "--task", "scienceqa", "--data-dir", str(tmp_path),
            "--out", str(tmp_path / "vqa.json")]
    code, _, err = run_command(eval_vqa.main, argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and f"is a {model_type!r} model" in err and "LLaVA-1.5" in err, err
    assert not (tmp_path / "vqa.json").exists()
