"""eval_tasks.py under torchrun and with --offload: 2 ranks, or the model one block at a time, give lm-eval's results
of the one process.

The ranks are real processes on the CPU with gloo, started as torchrun starts them (kit.ranks.launch); the
reference is the same command in one process. lm-eval splits each task's documents among the ranks through
HarnessLM's rank and world_size and gathers the per-document metrics on rank 0. The tiny OPT, its tokenizer and the
local multiple-choice task come from tests/kit; nothing is downloaded.
"""

import json
import os
import random
from pathlib import Path

import pytest

import command_line
import eval_tasks
import lm_harness
from kit.checks import assert_one_block_at_a_time, said_lines, watch_offload
from kit.data import sentence, write_multiple_choice_task
from kit.ranks import finish, launch
from kit.tiny_models import save_opt_for_hflm

# What each request scored and each routing routed, noted as JSON lines in LOG (one process: the test's own):
# {"row": the simple_evaluate call it belongs to, "rank", "request": [context ids, continuation ids], "ll": its
# log-likelihood} and {"row", "rank", "routed": the context's ids}; and on rank FAIL_RANK, a UsageError instead of
# the first scores
NOTING = """
import json, os
import eval_tasks, lm_eval, lm_harness
row = [-1]
def note(**entry):
    with open(os.environ["LOG"], "a") as f:
        f.write(json.dumps(dict(row=row[0], rank=os.environ.get("RANK", "0"), **entry)) + "\\n")
evaluate, score, route = lm_eval.simple_evaluate, lm_harness.HarnessLM._loglikelihood_tokens, lm_harness.route_prompt
def next_row(*args, **kwargs):
    row[0] += 1
    return evaluate(*args, **kwargs)
def noting_score(self, requests, *args, **kwargs):
    if os.environ.get("FAIL_RANK", "none") == os.environ.get("RANK", "0"):
        raise eval_tasks.UsageError("rank " + os.environ["RANK"] + " planted this error")
    results = score(self, requests, *args, **kwargs)
    for (_, context, continuation), (ll, _) in zip(requests, results):
        note(request=[context, continuation], ll=ll)
    return results
def noting_route(model, prompts, *args, **kwargs):
    note(routed=prompts[0].tolist())
    return route(model, prompts, *args, **kwargs)
lm_eval.simple_evaluate, lm_harness.HarnessLM._loglikelihood_tokens, lm_harness.route_prompt = (next_row, noting_score,
                                                                                                  noting_route)
"""
RANK_SCRIPT = NOTING + "import sys\nsys.exit(eval_tasks.main())\n"
# SparseGPT's log-likelihoods on 2 ranks, relative (measured: 1.0e-6, 3.6e-6 absolute): its weights move by ~1e-7 when
# its float32 sums add in another order (test_distributed), and so do the float32 logits; every other row's are equal
# to the bit, which is asserted
LL_RTOL = 1e-5
DOCS = 7  # odd: shares of 4 and 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory, _ = save_opt_for_hflm(tmp_path_factory.mktemp("tiny_opt"))
    tasks, data = tmp_path_factory.mktemp("tasks"), tmp_path_factory.mktemp("rows")
    write_multiple_choice_task(tasks, docs=DOCS)
    rng = random.Random(6)
    (data / "ptb.train.jsonl").write_text("".join(json.dumps({"text": sentence(rng, 12)}) + "\n" for _ in range(40)))
    return directory, tasks, data


def command(setup, out, *extra) -> list[str]:
    """dense, magnitude, both calibrated methods on 3 windows (shares of 2 and 1) and μ-MoE routed on each context."""
    directory, tasks, data = setup
    return ["--model", str(directory), "--include-path", str(tasks), "--tasks", "tiny_mc", "--calib", "ptb",
            "--data-dir", str(data), "--nsamples", "3", "--seqlen", "32", "--rho", "0.5", "--batch-size", "2",
            "--device", "cpu", "--out", str(out), *extra]


def one_process(argv: list[str], log: Path) -> int:
    """eval_tasks.main in this process, noting as the ranks do."""
    os.environ["LOG"] = str(log)
    saved = lm_eval_hooks()
    try:
        exec(NOTING, {})
        return eval_tasks.main(argv)
    finally:
        restore(saved)
        del os.environ["LOG"]


def lm_eval_hooks():
    import lm_eval
    return lm_eval.simple_evaluate, lm_harness.HarnessLM._loglikelihood_tokens, lm_harness.route_prompt


def restore(saved) -> None:
    import lm_eval
    lm_eval.simple_evaluate, lm_harness.HarnessLM._loglikelihood_tokens, lm_harness.route_prompt = saved


def read_log(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def scores(log: list[dict]) -> dict[tuple, float]:
    """(row, context, continuation) -> log-likelihood; a request scored twice in a row must score the same."""
    out = {}
    for entry in log:
        if "request" in entry:
            key = (entry["row"], *map(tuple, entry["request"]))
            assert out.setdefault(key, entry["ll"]) == entry["ll"], f"{key} scored twice, differently"
    return out


def routings(log: list[dict]) -> list[tuple]:
    return sorted((entry["row"], tuple(entry["routed"])) for entry in log if "routed" in entry)


def without_timings(report: dict) -> dict:
    """The report less what differs between runs of the same rows: the rows' times, --out and --offload."""
    settings = {k: v for k, v in report["settings"].items()
                if k not in ("out", "offload", "threads", "thread_policy")}  # (ranks take one thread each)
    return dict(settings=settings, results=[{k: v for k, v in row.items() if k != "seconds"}
                                            for row in report["results"]])


# lm-eval's standard errors of the gathered per-document metrics, which it sums in the ranks' order (measured: 1 ulp)
STDERR_RTOL = 1e-12


def assert_same_results(got: dict, expected: dict, what: str) -> None:
    """The same rows with lm-eval's same results: accuracies equal, their standard errors to STDERR_RTOL."""
    assert got["settings"] == expected["settings"], what
    for mine, theirs in zip(got["results"], expected["results"], strict=True):
        differ = {k: (mine.get(k), v) for k, v in theirs.items() if k != "results" and mine.get(k) != v}
        assert not differ and mine["results"].keys() == theirs["results"].keys(), \
            f"{what}, {eval_tasks.label(theirs)}: ({what}, one process) differ: {differ}"
        for task, result in theirs["results"].items():
            for metric, value in result.items():
                if "_stderr," in metric:
                    assert mine["results"][task][metric] == pytest.approx(value, rel=STDERR_RTOL), (what, metric)
                else:
                    got = mine["results"][task][metric]
                    assert got == value, f"{what}, {eval_tasks.label(theirs)}, {task} {metric}: {got} != {value}"


def assert_same_scores(got: dict, expected: dict, rtol: float, what: str) -> None:
    assert got.keys() == expected.keys(), f"{what}: other requests scored ({len(got)} against {len(expected)})"
    worst = max(abs(got[k] / expected[k] - 1) for k in expected)
    assert worst <= rtol, f"{what}: log-likelihoods differ by up to {worst:.2e} relative (tolerance {rtol:.0e})"


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory) -> Path:
    """The command in one process (one.json, one.log) and on 2 ranks (many.json, many.log), once for the tests below:
    every method, and μ-MoE with both routings."""
    tmp = tmp_path_factory.mktemp("runs")
    rows = ["--mumoe-routing", "block", "linear"]
    assert one_process(command(setup, tmp / "one.json", *rows), tmp / "one.log") == 0
    store, procs = launch(RANK_SCRIPT, command(setup, tmp / "many.json", *rows), 2, tmp / "writes.log",
                          LOG=str(tmp / "many.log"))
    for r, (code, out, err) in enumerate(finish(procs)):
        assert code == 0, f"rank {r} exit {code}: {err[-3000:]}"
        assert r == 0 or out == err == "", f"rank {r} is not quiet: {out[-500:]} {err[-500:]}"
    return tmp


def test_two_ranks_give_lm_evals_results_of_one_process(runs):
    expected = without_timings(json.loads((runs / "one.json").read_text()))
    got = without_timings(json.loads((runs / "many.json").read_text()))
    assert_same_results(got, expected, "2 ranks")
    assert [r["method"] for r in got["results"]] == ["dense", "magnitude", "wanda", "sparsegpt", "mumoe", "mumoe"]
    alone, ranks = read_log(runs / "one.log"), read_log(runs / "many.log")
    sparsegpt = 3  # the row whose weights move with the order of the sums
    exact = lambda log: {k: v for k, v in scores(log).items() if k[0] != sparsegpt}
    assert_same_scores(exact(ranks), exact(alone), 0.0, "2 ranks, every row but SparseGPT's")
    assert_same_scores(scores(ranks), scores(alone), LL_RTOL, "2 ranks")
    per_rank = {r: {k[1] for k in scores([e for e in ranks if e["rank"] == r])} for r in ("0", "1")}
    assert per_rank["0"] and per_rank["1"] and not per_rank["0"] & per_rank["1"], \
        "every rank scores its own documents' contexts"


def test_mumoe_routes_each_context_once_across_the_ranks(runs):
    alone, ranks = routings(read_log(runs / "one.log")), routings(read_log(runs / "many.log"))
    assert len(alone) == 2 * DOCS and len(set(alone)) == len(alone), "one process: a routing per document and row"
    assert ranks == alone, f"{len(ranks)} routings on 2 ranks, {len(alone)} in one process"
    assert [row["routed"] for row in json.loads((runs / "many.json").read_text())["results"][-2:]] == [DOCS, DOCS]


def test_a_failing_rank_ends_the_run_in_one_line(setup, tmp_path):
    """Rank 1 fails while rank 0 waits for it in lm-eval's gathers: its one line, exit 2 on both ranks, no file."""
    out = tmp_path / "r.json"
    store, procs = launch(RANK_SCRIPT, command(setup, out, "--methods", "dense"), 2, tmp_path / "writes.log",
                          LOG=str(tmp_path / "many.log"), FAIL_RANK="1")
    ranks_out = finish(procs)
    assert [code for code, _, _ in ranks_out] == [2, 2], [err[-2000:] for _, _, err in ranks_out]
    said = [line for _, _, err in ranks_out for line in said_lines(err) if "error" in line or "Traceback" in line]
    assert said == ["eval_tasks.py: error: rank 1 planted this error"], said  # (rank 0 also logs lm-eval's notes)
    assert said_lines(ranks_out[1][2]) == said and not out.exists()


def test_offload_gives_the_results_of_the_model_on_the_device(setup, tmp_path, monkeypatch, capsys):
    """On the CPU the moves are no-ops, so the hooks are watched: every block's turn is a visit then a leave."""
    argv = ["--methods", "dense", "wanda", "mumoe", "--mumoe-routing", "block", "linear"]
    plain, offload = tmp_path / "plain.json", tmp_path / "offload.json"
    assert one_process(command(setup, plain, *argv), tmp_path / "plain.log") == 0
    capsys.readouterr()
    code, err = eval_tasks.main(command(setup, offload, *argv, "--offload")), capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "nothing to offload to" in err, err

    monkeypatch.setattr(command_line, "check_offload", lambda device: None)  # the CPU stands in for a GPU
    events = watch_offload(monkeypatch)
    assert one_process(command(setup, offload, *argv, "--offload"), tmp_path / "offload.log") == 0
    got, expected = (without_timings(json.loads(path.read_text())) for path in (offload, plain))
    assert_same_results(got, expected, "--offload")
    assert_same_scores(scores(read_log(tmp_path / "offload.log")), scores(read_log(tmp_path / "plain.log")), 0.0,
                       "--offload")
    assert_one_block_at_a_time(events, 2 * 4, "--offload, 4 rows")
