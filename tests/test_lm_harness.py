"""Tests for lm_harness (our models as an lm-eval model) and eval_tasks (the zero-shot task command).

References: lm-eval's own HFLM over transformers' OPTForCausalLM with the same tiny random weights (log-likelihoods,
rolling log-likelihoods, greedy generations); an accuracy computed here from our own forward passes; mumoe's
mumoe_logits routed on the context's tokens (prefix) or on all of them. Tiny models and a tiny byte-level BPE are
built in the tests (test_mumoe's save_tiny_opt and save_tiny_tokenizer), tasks are YAMLs over local JSON lines:
nothing is downloaded and ../shared is not needed.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import eval_tasks
import lm_harness
import models
from checkpoint import UsageError
from lm_harness import HarnessLM
from mumoe import ROUTINGS, MuMoE, mumoe_logits
from kit.checks import assert_one_line_error
from kit.commands import run_command
from kit.data import sentence, write_multiple_choice_task
from kit.tiny_models import save_opt_for_hflm

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402 (after the skip: lm_eval is what these tests test)

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local JSON tasks only: never ask the hub
VOCAB = 512  # the tiny model's vocabulary: room for every id of the tiny tokenizer
MAX_POSITIONS = 64  # short enough that a few sentences overflow it: truncation and rolling windows get tested
LL_ATOL = 1e-4  # fp32 sums of a few dozen log-probabilities, two implementations of the same arithmetic
ROUTED_ATOL = 1e-4  # the same masks, a continuation through the cache vs. one forward over everything


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_opt_for_hflm(tmp_path_factory.mktemp("tiny_opt"), VOCAB, MAX_POSITIONS)


@pytest.fixture(scope="module")
def ours(tiny):
    directory, _ = tiny
    return models.load_model(directory), models.load_tokenizer(directory)


@pytest.fixture(scope="module")
def hflm(tiny):
    pytest.importorskip("accelerate", reason="lm-eval's HFLM needs accelerate (requirements.txt, tests)")
    import transformers
    from lm_eval.models.huggingface import HFLM

    directory, reference = tiny
    return HFLM(pretrained=reference, tokenizer=transformers.AutoTokenizer.from_pretrained(directory), batch_size=3)


def loglikelihood_requests(args):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(args)]


def greedy_requests(model, tokenizer) -> list[tuple]:
    """Token-level requests (key, context ids, continuation ids) whose continuations are the model's greedy tokens
    (is_greedy True), one, two and three of them, the last after a context past max_length."""
    rng = random.Random(5)
    requests = []
    for context, n in [("The of and", 1), ("He is", 3), (" ".join(sentence(rng, 12) for _ in range(6)), 2)]:
        context_ids = tokenizer.encode(context)
        ids = context_ids[max(0, len(context_ids) + n - (MAX_POSITIONS + 1)):]  # the part lm-eval will read
        for _ in range(n):
            with torch.no_grad():
                ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
        requests.append((None, context_ids, ids[-n:]))
    requests.append((None, requests[1][1], requests[1][2][:1] + [3]))  # greedy, then not: False
    return requests


def mixed_requests() -> list[tuple[str, str]]:
    """Shared contexts, multi-token continuations, an empty context, trailing spaces, contexts past max_length."""
    rng = random.Random(3)
    long = " ".join(sentence(rng, 12) for _ in range(6))  # ~80 tokens: truncated from the left
    return [("The of and", " to in"), ("It was", " the"), ("It was", " a"), ("It was", " the of and is"),
            ("", "Hello the of world"), ("It was ", "that"), (long, " and the"), (long + " He", " is")]


def assert_same(ours, ref, atol, what):
    worst = max(range(len(ours)), key=lambda i: abs(ours[i] - ref[i]))
    diff = abs(ours[worst] - ref[worst])
    assert diff <= atol, f"{what}: max |diff| {diff:.3e} > {atol:.0e} at request {worst}: {ours[worst]} vs {ref[worst]}"


# -----------------------------------------------------------------------------
# Dense: lm-eval's own HFLM on the same weights


def test_loglikelihood_matches_hflm(ours, hflm):
    """Text requests (tokenization, empty context, truncation), then token requests with greedy continuations."""
    model, tokenizer = ours
    pairs = mixed_requests()
    assert len(tokenizer.encode(pairs[6][0] + pairs[6][1])) > MAX_POSITIONS + 1, "the long request must be truncated"
    ref = hflm.loglikelihood(loglikelihood_requests(pairs), disable_tqdm=True)
    ref += hflm._loglikelihood_tokens(greedy_requests(model, tokenizer), disable_tqdm=True)
    for batch_size in (1, 4):
        lm = HarnessLM(model, tokenizer, batch_size)
        got = lm.loglikelihood(loglikelihood_requests(pairs), disable_tqdm=True)
        got += lm._loglikelihood_tokens(greedy_requests(model, tokenizer))
        assert_same([g[0] for g in got], [r[0] for r in ref], LL_ATOL, f"log-likelihoods, batch_size {batch_size}")
        assert [g[1] for g in got] == [r[1] for r in ref], f"is_greedy flags, batch_size {batch_size}"
    assert [r[1] for r in ref[-4:]] == [True, True, True, False], f"the greedy continuations must be flagged: {ref}"


def test_rolling_loglikelihood_matches_hflm(ours, hflm):
    """Texts of one window and of several (lm-eval's disjoint rolling windows of max_length tokens)."""
    model, tokenizer = ours
    rng = random.Random(4)
    texts = ["Hello", sentence(rng, 10), " ".join(sentence(rng, 12) for _ in range(12))]
    assert len(tokenizer.encode(texts[2])) > 2 * MAX_POSITIONS, "the long text must need three windows"
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    ref = hflm.loglikelihood_rolling(requests, disable_tqdm=True)
    got = HarnessLM(model, tokenizer, 2).loglikelihood_rolling(requests, disable_tqdm=True)
    assert_same(got, ref, LL_ATOL * len(texts[2]), "rolling log-likelihoods")  # sums of ~200 terms


def test_generate_until_matches_hflm(ours, hflm):
    """Greedy continuations ended at max_gen_toks, or cut at a stop string: one taken from the free continuation
    itself, so that it surely occurs."""
    model, tokenizer = ours
    free = hflm.generate_until([Instance("generate_until", {}, ("He is the", {"max_gen_toks": 12}), 0)],
                               disable_tqdm=True)[0]
    stop = free[len(free) // 2:][:2]
    assert len(free) > 4 and stop.strip(), f"a continuation too short to cut: {free!r}"
    requests = [Instance("generate_until", {}, (context, kwargs), i) for i, (context, kwargs) in enumerate([
        ("He is the", {"until": [stop, "never there"], "max_gen_toks": 12}),
        ("He is the", {"until": stop, "max_gen_toks": 12}),
        ("The of and", {"until": ["."], "max_gen_toks": 10}),
        ("It was", {"max_gen_toks": 6})])]
    ref = hflm.generate_until(requests, disable_tqdm=True)
    got = HarnessLM(model, tokenizer).generate_until(requests, disable_tqdm=True)
    assert got == ref, f"ours {got}\nHFLM {ref}"
    assert len(ref[0]) < len(free) // 2 + 2 and ref[0] == ref[1], f"not cut at {stop!r}: {ref[0]!r} of {free!r}"


# -----------------------------------------------------------------------------
# A task through lm_eval.simple_evaluate: the accuracy from our own log-likelihoods


def forward_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), summed over its tokens, from one forward over context + continuation."""
    context_ids, ids = tokenizer.encode(context), tokenizer.encode(context + continuation)
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([ids]))[0], dim=-1)
    return sum(logprobs[t - 1, ids[t]].item() for t in range(len(context_ids), len(ids)))


def test_simple_evaluate_accuracy_equals_our_own(ours, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model, tokenizer = ours
    rows = write_multiple_choice_task(tmp_path)
    out = simple_evaluate(model=HarnessLM(model, tokenizer, 4), tasks=["tiny_mc"], log_samples=False,
                          task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    acc = acc_norm = 0
    for row in rows:
        lls = [forward_loglikelihood(model, tokenizer, row["context"], " " + c) for c in row["choices"]]
        acc += max(range(3), key=lambda i: lls[i]) == row["label"]
        acc_norm += max(range(3), key=lambda i: lls[i] / len(row["choices"][i])) == row["label"]
    result = out["results"]["tiny_mc"]
    assert result["acc,none"] == acc / len(rows), f"lm-eval {result['acc,none']}, ours {acc}/{len(rows)}"
    assert result["acc_norm,none"] == acc_norm / len(rows), f"lm-eval {result['acc_norm,none']}, ours {acc_norm}"
    assert 0 < acc < len(rows), f"an accuracy of {acc}/{len(rows)} cannot tell a wrong choice from a right one"


# -----------------------------------------------------------------------------
# μ-MoE: routed on the context, once per context


def token_requests(lm, pairs):
    """(key, context ids, continuation ids) as lm-eval's TemplateLM.loglikelihood makes them from text."""
    return [((c, x), *(lm._encode_pair(c, x) if c else ([lm.prefix_token_id], lm.tok_encode(x, False))))
            for c, x in pairs]


def reference_score(model, context, continuation, rho, nm, routing, prefix: bool):
    """Score after mumoe_logits over the window lm-eval reads, routed on its context (prefix) or on all of it."""
    if prefix:
        kept = (context + continuation)[-(MAX_POSITIONS + 1):]
        ids, n_context = kept[:-1], len(kept) - len(continuation)
        logits = mumoe_logits(model, torch.tensor([ids]), MuMoE(rho, routing=routing, prefix=n_context, nm=nm))
    else:
        ids = (context + continuation)[-MAX_POSITIONS:]
        logits = mumoe_logits(model, torch.tensor([ids]), MuMoE(rho, routing=routing, nm=nm))
        ids, n_context = ids[:-1], len(ids) - len(continuation)
    logprobs = F.log_softmax(logits[0, n_context - 1:], dim=-1)
    return sum(logprobs[i, token].item() for i, token in enumerate(continuation))


ROUTED = [(0.5, None, "block"), (0.5, None, "linear"), (0.5, (2, 4), "block")]


@pytest.mark.parametrize("rho, nm, routing", ROUTED)
def test_context_routing_equals_prefix_routing(ours, rho, nm, routing):
    """Each request = its continuation scored after mumoe_logits(context + continuation, prefix=len(context)):
    routed on the context alone, the continuation through the cache with the context's experts, in batches of
    2 continuations (a group of 3 spans two batches), the long one truncated as lm-eval does."""
    model, tokenizer = ours
    requests = token_requests(HarnessLM(model, tokenizer), mixed_requests())
    lm = HarnessLM(model, tokenizer, 2, MuMoE(rho, routing=routing, nm=nm))
    got = [lp for lp, _ in lm._loglikelihood_tokens(requests)]
    ref = [reference_score(model, c, x, rho, nm, routing, prefix=True) for _, c, x in requests]
    assert_same(got, ref, ROUTED_ATOL, "routed on the context vs mumoe_logits with prefix")
    dense = [lp for lp, _ in HarnessLM(model, tokenizer)._loglikelihood_tokens(requests)]
    assert max(abs(g - d) for g, d in zip(got, dense)) > 0.1, "μ-MoE scored like the dense model"


def test_requests_sharing_a_context_are_routed_once(ours, monkeypatch):
    model, tokenizer = ours
    calls = []
    route_prompt = lm_harness.route_prompt
    monkeypatch.setattr(lm_harness, "route_prompt", lambda *a, **k: calls.append(a[1].shape) or route_prompt(*a, **k))
    pairs = mixed_requests()
    lm = HarnessLM(model, tokenizer, 16, MuMoE(0.5))
    lm.loglikelihood(loglikelihood_requests(pairs), disable_tqdm=True)
    contexts = {tuple(lm.window(c, x)[0]) for _, c, x in token_requests(lm, pairs)}
    assert len(calls) == lm.routed == len(contexts) < len(pairs), f"{len(calls)} routings for {len(contexts)} contexts"
    assert all(shape[0] == 1 for shape in calls), "each context is routed alone"


@pytest.mark.parametrize("routing", ROUTINGS)
def test_full_scope_equals_full_routing(ours, routing):
    model, tokenizer = ours
    requests = token_requests(HarnessLM(model, tokenizer), mixed_requests())
    full = [lp for lp, _ in HarnessLM(model, tokenizer, 4, MuMoE(0.5, routing=routing),
                                      routing_scope="full")._loglikelihood_tokens(requests)]
    ref = [reference_score(model, c, x, 0.5, None, routing, prefix=False) for _, c, x in requests]
    assert_same(full, ref, ROUTED_ATOL, "routed on context + continuation vs mumoe_logits")
    on_context_lm = HarnessLM(model, tokenizer, 4, MuMoE(0.5, routing=routing))
    on_context = [lp for lp, _ in on_context_lm._loglikelihood_tokens(requests)]
    assert max(abs(f - c) for f, c in zip(full, on_context)) > 0.01, "the two scopes route alike"


def test_full_scope_reads_every_token_it_can(ours):
    """The full scope reads the whole continuation where max_length allows, its context cut by one token if need
    be; a rolling window (a one-token context, max_length tokens to predict) leaves no room for its last token,
    which is then predicted, not read. At rho = 1 that is the dense model on those cut contexts."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    model, tokenizer = ours
    rng = random.Random(7)
    text = " ".join(sentence(rng, 12) for _ in range(10))
    request = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    full = HarnessLM(model, tokenizer, routing_scope="full")
    full.mumoe = True  # rho = 1 through the routed path: mumoe_logits is then the dense model
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
        full.tok_encode(text), full.prefix_token_id, MAX_POSITIONS, context_len=1)]
    cut = [(None, c[max(0, len(c) + len(x) - MAX_POSITIONS):] or c[-1:], x) for c, x in windows]
    assert [len(c) for _, c, _ in cut] != [len(c) for c, _ in windows], "no window's context needed cutting"
    dense = sum(lp for lp, _ in HarnessLM(model, tokenizer)._loglikelihood_tokens(cut))
    assert_same(full.loglikelihood_rolling(request, disable_tqdm=True), [dense], LL_ATOL * 200, "rolling, full scope")
    routed = HarnessLM(model, tokenizer, moe=MuMoE(0.5), routing_scope="full").loglikelihood_rolling(request, True)
    assert abs(routed[0] - dense) > 0.1 and full.routed == len(windows), (routed, dense, full.routed)


LLAMA_CONFIG = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS)


def test_llama_through_the_harness(ours, tiny, tmp_path):
    """LLaMA's dense scores equal HFLM's over transformers' LlamaForCausalLM (token-level requests: the tiny BPE's
    ids fit its vocabulary), and μ-MoE's continuation after a routed context runs through the cache several
    tokens at once, which needs LLaMA's attention to shift its causal mask too (checkpoint.shifted_causal_mask)."""
    pytest.importorskip("accelerate", reason="lm-eval's HFLM needs accelerate (requirements.txt, tests)")
    import transformers
    from lm_eval.models.huggingface import HFLM

    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_CONFIG)).eval()
    reference.save_pretrained(tmp_path)
    try:
        model = models.load_model(tmp_path)
    except UsageError as e:
        pytest.skip(f"no LLaMA family here yet ({e})")
    _, tokenizer = ours
    requests = token_requests(HarnessLM(model, tokenizer), mixed_requests())
    hf = HFLM(pretrained=reference, tokenizer=transformers.AutoTokenizer.from_pretrained(tiny[0]), batch_size=3)
    ref = hf._loglikelihood_tokens(requests, disable_tqdm=True)
    got = HarnessLM(model, tokenizer, 4)._loglikelihood_tokens(requests)
    assert_same([g[0] for g in got], [r[0] for r in ref], LL_ATOL, "LLaMA log-likelihoods vs HFLM")
    assert [g[1] for g in got] == [r[1] for r in ref], "LLaMA is_greedy flags vs HFLM"
    got = [lp for lp, _ in HarnessLM(model, tokenizer, 2, MuMoE(0.5))._loglikelihood_tokens(requests)]
    ref = [reference_score(model, c, x, 0.5, None, "block", prefix=True) for _, c, x in requests]
    assert_same(got, ref, ROUTED_ATOL, "LLaMA routed on the context vs mumoe_logits with prefix")


# -----------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def command_setup(tiny, tmp_path_factory):
    """A local task and PTB-like calibration rows, so that every method runs offline."""
    directory, _ = tiny
    tasks, data = tmp_path_factory.mktemp("tasks"), tmp_path_factory.mktemp("rows")
    write_multiple_choice_task(tasks, docs=6)
    rng = random.Random(6)
    (data / "ptb.train.jsonl").write_text("".join(json.dumps({"text": sentence(rng, 12)}) + "\n" for _ in range(40)))
    return directory, tasks, data


def command(setup, out, *extra):
    directory, tasks, data = setup
    return ["--model", str(directory), "--include-path", str(tasks), "--tasks", "tiny_mc", "--calib", "ptb",
            "--data-dir", str(data), "--nsamples", "2", "--seqlen", "32", "--out", str(out), *extra]


def strict_load(path):
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}: not strict JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_command_runs_every_method(command_setup, tmp_path, capsys):
    out = tmp_path / "tasks.json"
    assert eval_tasks.main(command(command_setup, out, "--rho", "0.5", "--mumoe-routing", "block", "linear",
                                   "--routing-scope", "context", "full", "--batch-size", "2")) == 0
    report = strict_load(out)
    rows = report["results"]
    assert [(r["method"], r["routing"], r["scope"]) for r in rows] == [
        ("dense", None, None), ("magnitude", None, None), ("wanda", None, None), ("sparsegpt", None, None),
        ("mumoe", "block", "context"), ("mumoe", "block", "full"), ("mumoe", "linear", "context"),
        ("mumoe", "linear", "full")]
    for r in rows:
        result = r["results"]["tiny_mc"]
        assert {"acc,none", "acc_stderr,none", "acc_norm,none"} <= result.keys(), result
        assert r["mean"] == result["acc_norm,none"], "the table's metric is acc_norm where the task has it"
    assert [r["calib"] for r in rows] == [None, None, "ptb", "ptb", None, None, None, None]
    assert rows[4]["routed"] == 6, "the context scope routes once per question, its three choices together"
    assert rows[5]["routed"] == 18, "the full scope routes every (question, choice) request"
    assert report["settings"]["lm_eval"] and report["settings"]["tasks"] == ["tiny_mc"]
    printed = capsys.readouterr().out
    assert "tiny_mc: acc_norm" in printed and "μ-MoE (one pass) (routed on all)" in printed
    assert printed.count("Mean") == 1


def test_command_resumes(command_setup, tmp_path, capsys):
    out = tmp_path / "tasks.json"
    assert eval_tasks.main(command(command_setup, out, "--methods", "dense", "magnitude", "--limit", "3")) == 0
    first = strict_load(out)
    assert eval_tasks.main(command(command_setup, out, "--methods", "dense", "magnitude", "mumoe", "--limit", "3",
                                   "--resume")) == 0
    printed = capsys.readouterr().out
    assert printed.count("kept from") == 2, printed
    resumed = strict_load(out)["results"]
    assert resumed[:2] == first["results"] and resumed[2]["method"] == "mumoe"
    assert eval_tasks.main(command(command_setup, out, "--limit", "4", "--resume")) == 2
    assert "limit 3 there, 4 here" in capsys.readouterr().err


def test_command_interrupted_says_how_to_go_on(command_setup, tmp_path, capsys, monkeypatch):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(eval_tasks.HarnessLM, "loglikelihood", ctrl_c)
    argv = command(command_setup, tmp_path / "tasks.json", "--methods", "dense")
    assert eval_tasks.main(argv) == eval_tasks.INTERRUPTED
    err = capsys.readouterr().err
    assert "interrupted: the finished rows are in" in err and err.strip().endswith("--methods dense --resume"), err


def test_command_nm(command_setup, tmp_path, capsys):
    out = tmp_path / "tasks.json"
    assert eval_tasks.main(command(command_setup, out, "--nm", "2:4", "--methods", "magnitude", "mumoe",
                                   "--limit", "2")) == 0
    rows = strict_load(out)["results"]
    assert [(r["method"], r["rho"], r["nm"]) for r in rows] == [("magnitude", 0.5, "2:4"), ("mumoe", 0.5, "2:4")]
    assert "2:4 (50% active)" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--limit", "0"], "--limit: expected a positive integer, got 0"),
    (["--methods", "obs"], "argument --methods: invalid choice: 'obs'"),
    (["--rho", "1.5"], "rho is the active-weight ratio, in (0, 1]; got 1.5"),
    (["--rho", "half"], "invalid active_ratio value: 'half'"),
    (["--num-fewshot", "-1"], "--num-fewshot: expected 0 or more, got -1"),
    (["--nm", "4:2"], "0 < N < M"),
    (["--include-path", "/nonexistent/tasks"], "--include-path /nonexistent/tasks is not a directory"),
])
def test_command_bad_input(command_setup, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(models, "family", lambda *a: pytest.fail("a model was looked for before the input was checked"))
    argv = command(command_setup, tmp_path / "tasks.json") + args
    code, _, err = run_command(eval_tasks.main, argv, capsys)
    assert_one_line_error(code, err, message)


def test_command_unknown_task(command_setup, tmp_path, capsys, monkeypatch):
    """Checked against lm-eval's own list (and --include-path) before any model is looked for."""
    monkeypatch.setattr(models, "family", lambda *a: pytest.fail("a model was looked for before the task was checked"))
    argv = command(command_setup, tmp_path / "tasks.json") + ["--tasks", "tiny_mc", "hellaswagg"]
    assert eval_tasks.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown task 'hellaswagg'" in err and "--include-path" in err, err


def test_command_offline_with_hub_tasks_is_one_line(command_setup, tmp_path):
    """Offline, tasks whose data is on the hub and not in the cache (the default seven): one line, exit 2, before
    any model is found; a task with local data still runs. (It was 56 lines of retries and a ConnectionError.)"""
    directory, tasks, _ = command_setup
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}  # refused at once
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_DATASETS_OFFLINE", None)
    base = [sys.executable, "eval_tasks.py", "--model", "no/such-model", "--methods", "dense", "--limit", "2",
            "--out", str(tmp_path / "tasks.json")]
    run = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr[-3000:]
    assert "cannot be loaded: the hub is offline (127.0.0.1 cannot be reached" in run.stderr, run.stderr
    base[base.index("no/such-model")] = str(directory)
    run = subprocess.run(base + ["--include-path", str(tasks), "--tasks", "tiny_mc"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def test_table_columns_are_the_tasks_asked_for():
    group = {"mmlu": {"acc,none": 0.3}, "mmlu_a": {"acc,none": 0.2}, "mmlu_b": {"acc,none": 0.4}}
    assert eval_tasks.columns(group, ["mmlu"]) == ["mmlu"], "a group's aggregate, not its parts"
    assert eval_tasks.columns(group, ["a_tag"]) == list(group), "a tag: every task it stood for"
    assert eval_tasks.mean_accuracy(group, ["mmlu"]) == 0.3


def test_metric_prefers_acc_norm():
    assert eval_tasks.metric({"alias": "t", "acc,none": 0.5, "acc_norm,none": 0.6}) == "acc_norm,none"
    assert eval_tasks.metric({"alias": "t", "acc,none": 0.5, "perplexity,none": 9.0}) == "acc,none"
    assert [eval_tasks.fraction(v) for v in (float("nan"), None, 0.5)] == ["—", "—", "50.00"]
