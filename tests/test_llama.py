"""Tests for the LLaMA family (llama_model.py) and for every method and command on it. Each test can fail.

References: transformers' LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM (test-only oracles) for the
forward pass and greedy generation, its fast tokenizer for the ids, and Wanda's and SparseGPT's algorithms run on
statistics gathered with plain hooks on the transformers model: Wanda's stable sort written out, SparseGPT's
`fasterprune` transcribed (test_mumoe). Tiny random models are built and saved in the
Hugging Face layout in the tests, so nothing is downloaded and nothing needs ../shared.
"""

import copy
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import corpora
import eval_ppl
import llama_model
import models
import mumoe
from checkpoint import UsageError
from pruners import prune_model
from kit.checks import assert_close, assert_each_visits, assert_one_line_error, record_moves
from kit.commands import report_of, run_main
from kit.data import REPO, random_ids, sentence
from kit.references import assert_pruned_as_the_algorithms
from kit.tiny_models import LLAMA_VOCAB, TINY_LLAMAS, save_tiny_llama
from kit.tiny_tokenizers import save_llama_tokenizer

# fp32, measured on these configs: logits equal transformers' exactly (max |diff| 0); cached decoding vs the full
# forward 2.4e-7 to 4.8e-7. The bound leaves room for other CPUs' kernels, far below what a bug moves (>1e-2).
FP32_ATOL = 1e-5
# bf16 / fp16 logits (|logit| up to ~3) of two implementations in the same dtype, measured max |diff| on these
# configs: bf16 3.9e-3 to 7.8e-3 (one or two bf16 steps), fp16 4.9e-4 to 9.8e-4; the bounds are about 4x those
HALF_ATOL = {torch.bfloat16: 0.03, torch.float16: 0.004}


@pytest.fixture(scope="module", params=sorted(TINY_LLAMAS))
def tiny_llama(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, directory, save_tiny_llama(directory, request.param)


# -----------------------------------------------------------------------------
# The forward pass, the two config layouts, half precision, the KV cache and generation


@torch.no_grad()
def test_logits_match_transformers(tiny_llama):
    kind, directory, reference = tiny_llama
    model = models.load_model(directory)
    assert isinstance(model, llama_model.LlamaForCausalLM)
    ids = random_ids(2, 40, LLAMA_VOCAB)
    assert_close(model(ids), reference(ids).logits, FP32_ATOL, f"{kind} logits")


def hub_layout(config: dict) -> dict:
    """A transformers-5 config.json rewritten as the hub's files are: top-level rope_theta (left out where it is
    LLaMA's default, as LLaMA-1/2 files do), rope_scaling with the older key "type", torch_dtype."""
    hub = {k: v for k, v in config.items() if k not in ("rope_parameters", "dtype")}
    rope = dict(config["rope_parameters"])
    theta, rope_type = rope.pop("rope_theta"), rope.pop("rope_type")
    if theta != 10000.0:
        hub["rope_theta"] = theta
    hub["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    hub["torch_dtype"] = config["dtype"]
    return hub


@torch.no_grad()
def test_hub_config_layout_loads_the_same_model(tiny_llama, tmp_path):
    kind, directory, _ = tiny_llama
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "model.safetensors").symlink_to(directory / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    (hub / "config.json").write_text(json.dumps(hub_layout(config)))
    assert "rope_parameters" not in (hub / "config.json").read_text()
    ours, theirs = models.load_model(directory), models.load_model(hub)
    assert ours.config == theirs.config, f"{kind}: {ours.config} != {theirs.config}"
    ids = random_ids(1, 30, LLAMA_VOCAB)
    assert torch.equal(ours(ids), theirs(ids)), f"{kind}: the hub layout gives other logits"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@torch.no_grad()
def test_half_precision_matches_transformers(tiny_llama, dtype):
    kind, directory, reference = tiny_llama
    model = models.load_model(directory, dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    assert model.blocks[0].self_attn.inv_freq.dtype == torch.float32, "the rotary frequencies must stay float32"
    ids = random_ids(2, 40, LLAMA_VOCAB)
    ref = copy.deepcopy(reference).to(dtype)(ids).logits
    assert_close(model(ids), ref, HALF_ATOL[dtype], f"{kind} {dtype} logits")


@torch.no_grad()
def test_cached_logits_equal_the_full_forward(tiny_llama):
    kind, directory, _ = tiny_llama
    model = models.load_model(directory)
    ids = random_ids(2, 24, LLAMA_VOCAB)
    full = model(ids)
    cache = model.new_cache(24, batch=2)
    stepped = [model(ids[:, :16], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(16, 22)]
    stepped.append(model(ids[:, 22:24], cache=cache))  # two tokens at once after cached ones: the mask shifted
    assert_close(torch.cat(stepped, dim=1), full, FP32_ATOL, f"{kind}: cached decoding vs the full forward")
    assert [c.length for c in cache] == [24] * len(model.blocks)
    assert cache[0].k.shape[1] == model.config.num_key_value_heads, "the cache holds the k/v heads, not the q heads"


@torch.no_grad()
def test_greedy_generation_matches_transformers(tiny_llama):
    kind, directory, reference = tiny_llama
    model = models.load_model(directory)
    prompt = random_ids(1, 12, LLAMA_VOCAB, seed=3)
    ours = mumoe.generate(model, prompt[0].tolist(), 20, eos_id=model.config.eos_token_id)
    theirs = reference.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=True,
                                eos_token_id=model.config.eos_token_id, pad_token_id=0)[0, 12:].tolist()
    assert ours == theirs, f"{kind}: ours {ours} vs transformers {theirs}"


# -----------------------------------------------------------------------------
# Loading: strict keys, bad configs


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="gpt_neox"), "model_type 'gpt_neox' is not supported (supported: opt, llama, mistral, qwen2, "
                                  "qwen3, phi3, gemma3_text, gemma3, llava)"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     "rope_scaling type 'yarn' is not supported (supported: default, linear, llama3)"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}), "needs 'low_freq_factor'"),
    (dict(intermediate_size=100), "'model.layers.0.mlp.down_proj.weight' has shape (64, 96) in the checkpoint, "
                                  "config.json implies (64, 100)"),
    (dict(num_key_value_heads=3), "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not one of ['silu']"),
])
def test_bad_checkpoints_are_refused_by_name(tmp_path, changes, message):
    save_tiny_llama(tmp_path)
    edit_config(tmp_path, **changes)
    with pytest.raises(UsageError) as error:
        models.load_model(tmp_path)
    assert message in str(error.value)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    save_tiny_llama(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"},
              tmp_path / "model.safetensors")
    with pytest.raises(UsageError, match="lacks 'model.layers.1.mlp.up_proj.weight'"):
        models.load_model(tmp_path)
    save_file({**state, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}, tmp_path / "model.safetensors")
    models.load_model(tmp_path)  # older .bin conversions stored inv_freq: computed from the config instead
    save_file({**state, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}, tmp_path / "model.safetensors")
    with pytest.raises(UsageError, match="unexpected key 'model.layers.0.self_attn.q_norm.weight'"):
        models.load_model(tmp_path)


def test_tied_head_is_one_tensor(tmp_path):
    save_tiny_llama(tmp_path, "qwen2")
    model = models.load_model(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_tiny_llama(tmp_path / "untied", "llama_gqa")
    untied = models.load_model(tmp_path / "untied")
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


# -----------------------------------------------------------------------------
# The tokenizer: BOS exactly as the checkpoint's fast tokenizer adds it


@pytest.mark.parametrize("bos", ["<s>", "<|begin_of_text|>", None])
def test_tokenizer_matches_hf_fast_tokenizer(tmp_path, bos):
    import transformers

    save_llama_tokenizer(tmp_path, bos)
    ours = llama_model.load_tokenizer(tmp_path)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    rng = random.Random(1)
    for text in ["Hello, my dog is cute", " leading space", "a<s>b </s>", "ümlaut\n\n", sentence(rng, 20)]:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], f"{text!r}: ours {ids} vs the fast tokenizer's"
        bos_ids = {ours.token_to_id(t) for t in ("<s>", "<|begin_of_text|>")}
        expected = [ours.token_to_id(bos)] if bos else []
        assert [i for i in ids[:1] if i in bos_ids] == expected, f"{text!r}: BOS {bos!r} wrong: {ids}"
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


def test_directory_without_tokenizer_json(tmp_path):
    save_tiny_llama(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"sentencepiece")
    with pytest.raises(UsageError, match="has no tokenizer: expected tokenizer.json"):
        models.load_tokenizer(tmp_path)


# -----------------------------------------------------------------------------
# The pruners and μ-MoE on a LLaMA

LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory):
    """A three-block GQA LLaMA, its transformers twin and 4 calibration windows."""
    directory = tmp_path_factory.mktemp("gqa-llama")
    reference = save_tiny_llama(directory, "llama_gqa", num_hidden_layers=3)
    return reference, directory, random_ids(4, 24, LLAMA_VOCAB, seed=12)


@pytest.mark.parametrize("method", ("wanda", "sparsegpt"))
def test_prune_model_equals_the_algorithms_on_hooked_statistics(gqa_llama, method):
    reference, directory, calib_ids = gqa_llama
    reference = copy.deepcopy(reference)
    model = models.load_model(directory)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    report = prune_model(model, calib_ids, method, 0.5, progress=False)
    assert sorted(report) == sorted(f"model.layers.{b}.{n}" for b in range(3) for n in LINEAR_NAMES)
    pruned = model.state_dict()
    assert_pruned_as_the_algorithms(original, pruned, reference, calib_ids, method, 0.5, LINEAR_NAMES, "gqa llama")
    untouched = [k for k in original if not any(k == f"model.layers.{b}.{n}.weight" for b in range(3)
                                                for n in LINEAR_NAMES)]
    assert all(torch.equal(original[k], pruned[k]) for k in untouched), "embeddings, norms and lm_head stay dense"


@pytest.mark.parametrize("rho", [0.5, 0.3])
@torch.no_grad()
def test_block_routing_is_wanda_calibrated_on_the_window(gqa_llama, rho):
    _, directory, _ = gqa_llama
    model, ids = models.load_model(directory), random_ids(1, 32, LLAMA_VOCAB, seed=5)
    routed = mumoe.mumoe_logits(model, ids, mumoe.MuMoE(rho))
    pruned = copy.deepcopy(model)
    prune_model(pruned, ids, "wanda", rho, progress=False)
    assert_close(routed, pruned(ids), 1e-5, f"block routing vs Wanda calibrated on the window, rho {rho}")


@pytest.mark.parametrize("routing", mumoe.ROUTINGS)
@torch.no_grad()
def test_mumoe_batch_rho_one_and_prefix(gqa_llama, routing):
    _, directory, _ = gqa_llama
    model, ids = models.load_model(directory), random_ids(3, 20, LLAMA_VOCAB, seed=6)
    batch = mumoe.mumoe_logits(model, ids, mumoe.MuMoE(0.5, routing=routing))
    for b in range(3):
        assert_close(batch[b : b + 1], mumoe.mumoe_logits(model, ids[b : b + 1], mumoe.MuMoE(0.5, routing=routing)),
                     1e-5,
                     f"{routing}: prompt {b} of a batch vs alone")
    assert torch.equal(mumoe.mumoe_logits(model, ids, mumoe.MuMoE(1.0, routing=routing)),
                       model(ids)), "rho = 1 is dense"
    changed = ids.clone()
    changed[:, 12:] = random_ids(3, 8, LLAMA_VOCAB, seed=7)
    a = mumoe.mumoe_logits(model, ids, mumoe.MuMoE(0.5, routing=routing, prefix=12))
    b = mumoe.mumoe_logits(model, changed, mumoe.MuMoE(0.5, routing=routing, prefix=12))
    assert torch.equal(a[:, :12], b[:, :12]), f"{routing}: tokens after the prefix changed the routing"


@pytest.mark.parametrize("routing", mumoe.ROUTINGS)
@pytest.mark.parametrize("rho", [0.5, 1.0])
def test_count_macs_matches_the_counter_with_gqa_shapes(gqa_llama, routing, rho):
    _, directory, _ = gqa_llama
    model, T = models.load_model(directory), 20
    counter = Counter()
    mumoe.mumoe_logits(model, random_ids(1, T, LLAMA_VOCAB), mumoe.MuMoE(rho, routing=routing), counter=counter)
    names = mumoe.linear_names(model)
    counted = {names[layer]: macs for layer, macs in counter.items()}
    analytic = mumoe.count_macs(model, T, mumoe.MuMoE(rho, routing=routing))
    assert counted == {k: v for k, v in analytic.linear.items() if k != "lm_head"}
    d, kv, f = 64, 2 * 16, 96  # hidden, k/v outputs under GQA (2 heads of 16), intermediate
    assert analytic.linear["model.layers.0.self_attn.k_proj"] == kv * (d - int(d * (1 - rho))) * T
    if rho < 1 and routing == "block":  # the statistics pass skips down_proj's product, nothing else
        assert analytic.routing["model.layers.0.mlp.down_proj"] == f * T + d * f
        assert analytic.routing["model.layers.0.mlp.up_proj"] == d * T + f * d + f * d * T
    assert analytic.attention == 3 * 2 * 4 * 16 * T * (T + 1) // 2


@pytest.mark.cuda
@pytest.mark.parametrize("method", ("wanda", "sparsegpt"))
@torch.no_grad()
def test_offload_gives_the_same_pruned_model_and_perplexity(gqa_llama, monkeypatch, method):
    """One block on the device at a time: pruning and evaluation visit each block once and give the numbers of a
    run without offload, bit for bit on the CPU (the rotary frequencies move with their block)."""
    _, directory, calib_ids = gqa_llama
    at_home, offloaded = models.load_model(directory), models.load_model(directory)
    prune_model(at_home, calib_ids, method, 0.5, progress=False)
    blocks = {f"block {b}": block for b, block in enumerate(offloaded.blocks)}
    moves = record_moves(monkeypatch)
    prune_model(offloaded, calib_ids, method, 0.5, device="cpu", progress=False)
    monkeypatch.undo()
    assert_each_visits(blocks, moves, "cpu", "pruning with offload")
    moves = record_moves(monkeypatch)
    ppl = eval_ppl.perplexity(offloaded, calib_ids, device="cpu", offload=True)
    monkeypatch.undo()
    assert_each_visits(blocks, moves, "cpu", "perplexity with offload")
    for (name, a), b in zip(at_home.state_dict().items(), offloaded.state_dict().values()):
        assert torch.equal(a, b), f"{method}: {name} differs with offload"
    assert ppl == eval_ppl.perplexity(at_home, calib_ids), "offloaded perplexity differs"


# -----------------------------------------------------------------------------
# The commands on a tiny LLaMA


@pytest.fixture(scope="module")
def llama_with_tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama_with_tokenizer")
    save_llama_tokenizer(directory, "<s>")
    save_tiny_llama(directory, "llama_gqa", random_norms=False, initializer_range=0.3)
    return directory


def test_eval_ppl_runs_every_method_on_a_llama(llama_with_tokenizer, cli_data, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["--model", str(llama_with_tokenizer), "--data-dir", str(cli_data), "--seqlen", "16", "--nsamples", "2",
            "--max-windows", "3", "--device", "cpu", "--rho", "0.5", "--mumoe-routing", "block", "linear",
            "--calib", "ptb", "--datasets", "wikitext2", "ptb", "--out", str(out)]
    report = report_of(argv, capsys)
    rows = {(r["method"], r.get("routing")): r for r in report["results"]}
    assert set(rows) == {("dense", None), ("magnitude", None), ("wanda", None), ("sparsegpt", None),
                         ("mumoe", "block"), ("mumoe", "linear")}
    dense = rows["dense", None]["ppl"]
    for key, row in rows.items():
        assert all(p is not None and p > 1 for p in row["ppl"].values()), f"{key}: {row['ppl']}"
        if key != ("dense", None):  # as test_eval_ppl asks: more than a rounding apart (a one-ulp change is not pruning)
            change = max(abs(row["ppl"][d] / dense[d] - 1) for d in dense)
            assert change > 1e-3, f"{key} is dense within {change:.1e}: was anything pruned?"
    without_rho = argv[:argv.index("--rho")] + argv[argv.index("--rho") + 2 : argv.index("--out")]
    nm = report_of(without_rho + ["--nm", "2:4", "--out", str(tmp_path / "nm.json")], capsys)
    assert {r["nm"] for r in nm["results"] if r["method"] != "dense"} == {"2:4"}


def test_family_defaults_follow_wandas_llama_protocol(llama_with_tokenizer, tmp_path):
    args = eval_ppl.parse_args(["--model", str(llama_with_tokenizer)])
    eval_ppl.resolve_defaults(args, "llama", 4096)
    assert (args.datasets, args.calib, args.seqlen) == (["wikitext2"], {"wanda": ("c4",), "sparsegpt": ("c4",)}, 4096)
    args = eval_ppl.parse_args(["--model", str(llama_with_tokenizer), "--calib", "wanda=ptb"])
    eval_ppl.resolve_defaults(args, "llama", 131072)  # Llama 3.1: capped
    assert (args.calib["wanda"], args.seqlen) == (("ptb",), corpora.MAX_DEFAULT_SEQLEN)
    args = eval_ppl.parse_args(["--model", "opt-125m"])
    eval_ppl.resolve_defaults(args, "opt", 2048)
    assert (args.datasets, args.calib["wanda"], args.seqlen) == (list(corpora.DATASETS), ("wikitext2", "ptb", "c4"),
                                                                 2048)


@pytest.mark.parametrize("args, message", [
    (["--seqlen", "65"], "--seqlen 65 exceeds the model's max_position_embeddings 64"),
    (["--nm", "2:3"], "--nm 2:3 does not fit this model"),
])
def test_eval_ppl_bad_input_on_a_llama(llama_with_tokenizer, cli_data, capsys, args, message):
    code, _, err = run_main(["--model", str(llama_with_tokenizer), "--data-dir", str(cli_data), "--device", "cpu",
                             "--calib", "ptb", *args], capsys)
    assert_one_line_error(code, err, message)


def test_eval_ppl_refuses_an_unknown_model_type(llama_with_tokenizer, tmp_path, capsys):
    directory = tmp_path / "neox"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    code, _, err = run_main(["--model", str(directory)], capsys)
    assert_one_line_error(code, err, "model_type 'gpt_neox' is not supported")


def test_generation_command_on_a_llama(llama_with_tokenizer):
    run = subprocess.run([sys.executable, str(REPO / "generate.py"), "--model", str(llama_with_tokenizer), "--rho", "0.5",
                          "--prompt", "the dog is", "--max-new-tokens", "4", "--routing", "linear"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert "--- dense:\nthe dog is" in run.stdout and "--- μ-MoE, rho = 0.5 (linear routing" in run.stdout
    assert "(50.00%)" in run.stdout, "hidden 64, k/v 32, intermediate 96 split exactly in half at rho = 0.5"
