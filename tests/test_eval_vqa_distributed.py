"""eval_vqa.py under torchrun and with --offload: 2 ranks, or the language model one block at a time, give the one
process's predictions and accuracies.

The ranks are real processes on the CPU with gloo, started as torchrun starts them (kit.ranks.launch); the
references are the same command in one process. The tiny LLaVA and the task files come from kit,
as test_eval_vqa's; nothing is downloaded. Each question is routed on itself, so the split of the questions is exact: every
prediction equal. The calibration statistics are summed over the ranks' shares, in another order than one
process's; on the tiny model the predictions come out equal all the same (a near-tie would show here as a
differing prediction, named).
"""

import json
from pathlib import Path

import command_line
import eval_vqa
from kit.checks import assert_one_block_at_a_time, said_lines, watch_offload
from kit.commands import vqa_command
from kit.ranks import finish, launch

# A rank: eval_vqa.main, GATHER_EVERY from the environment (small, so that a row takes several rounds and the last
# round leaves rank 0 without a question), noting each answer ("rank id") in ANSWERS_LOG and each write of the
# results file by rank in WRITES_LOG, and interrupted (as Ctrl-C would) on rank INTERRUPT_RANK at its answer
# INTERRUPT_AT
RANK_SCRIPT = """
import os, sys
import eval_vqa
eval_vqa.GATHER_EVERY = int(os.environ["GATHER_EVERY"])
answer, write_json, answered = eval_vqa.answer, eval_vqa.write_json, []
def noting_answer(model, tokenizer, question, *args, **kwargs):
    if os.environ.get("INTERRUPT_RANK") == os.environ["RANK"] and len(answered) == int(os.environ["INTERRUPT_AT"]):
        raise KeyboardInterrupt
    answered.append(question.id)
    with open(os.environ["ANSWERS_LOG"], "a") as f:
        f.write(os.environ["RANK"] + " " + question.id + "\\n")
    return answer(model, tokenizer, question, *args, **kwargs)
def noting_write(*args, **kwargs):
    with open(os.environ["WRITES_LOG"], "a") as f:
        f.write(os.environ["RANK"] + "\\n")
    write_json(*args, **kwargs)
eval_vqa.answer, eval_vqa.write_json = noting_answer, noting_write
sys.exit(eval_vqa.main())
"""
GATHER_EVERY = 2  # 9 questions on 2 ranks: rounds of 4, 4 and 1 (which rank 0 sits out)


def run_ranks(argv: list[str], ranks: int, tmp_path: Path, **env) -> list[tuple[int, str, str]]:
    _store, procs = launch(RANK_SCRIPT, argv, ranks, tmp_path / "writes.log", ANSWERS_LOG=str(tmp_path / "answers.log"),
                           GATHER_EVERY=str(GATHER_EVERY), **env)
    return finish(procs)


def answers_by_rank(tmp_path: Path) -> dict[str, list[str]]:
    by_rank = {}
    for line in (tmp_path / "answers.log").read_text().split("\n")[:-1]:
        rank, question = line.split()
        by_rank.setdefault(rank, []).append(question)
    return by_rank


def without_timings(report: dict) -> dict:
    """The report less what differs between two runs of the same rows: the rows' times, --out, --resume, --offload."""
    settings = {k: v for k, v in report["settings"].items()
                if k not in ("out", "resume", "offload", "threads", "thread_policy")}  # (ranks take one thread each)
    return dict(settings=settings, questions=report["questions"],
                results=[{k: v for k, v in row.items() if k != "seconds"} for row in report["results"]])


def assert_same_rows(got: dict, expected: dict, what: str) -> None:
    got, expected = without_timings(got), without_timings(expected)
    assert got["settings"] == expected["settings"] and got["questions"] == expected["questions"], what
    assert [eval_vqa.row_key(r) for r in got["results"]] == [eval_vqa.row_key(r) for r in expected["results"]], what
    for mine, theirs in zip(got["results"], expected["results"]):
        differ = [(p["id"], p["prediction"], q["prediction"])
                  for p, q in zip(mine["predictions"], theirs["predictions"]) if p != q]
        assert not differ and len(mine["predictions"]) == len(theirs["predictions"]), \
            f"{what}, {eval_vqa.label(theirs)} rho {theirs['rho']}: (id, {what}, one process) differ: {differ}"
        assert mine == theirs, f"{what}, {eval_vqa.label(theirs)}: {mine} != {theirs}"


# dense, the calibrated methods on 3 prompts (shares of 2 and 1) and μ-MoE, on all 9 ScienceQA questions
ARGV = ["--task", "scienceqa", "--methods", "dense", "wanda", "sparsegpt", "mumoe", "--rho", "0.5",
        "--mumoe-routing", "block", "--nsamples", "3"]


def test_two_ranks_answer_as_one_process(vqa_llava, data_dir, tmp_path):
    one, many = tmp_path / "one.json", tmp_path / "many.json"
    assert eval_vqa.main(vqa_command(vqa_llava, data_dir, one, *ARGV)) == 0
    ranks_out = run_ranks(vqa_command(vqa_llava, data_dir, many, *ARGV), 2, tmp_path)
    for r, (code, out, err) in enumerate(ranks_out):
        assert code == 0, f"rank {r} exit {code}: {err[-3000:]}"
        assert r == 0 or out == err == "", f"rank {r} is not quiet: {out[-500:]} {err[-500:]}"
    expected = json.loads(one.read_text())
    assert_same_rows(json.loads(many.read_text()), expected, "2 ranks")
    writes = set((tmp_path / "writes.log").read_text().split())
    assert writes == {"0"}, f"the results file was written by ranks {writes}, expected rank 0 alone"

    rows, questions = len(expected["results"]), [q["id"] for q in expected["questions"]]
    assert len(questions) % 2 == 1
    by_rank = answers_by_rank(tmp_path)
    assert sorted(by_rank["0"] + by_rank["1"]) == sorted(questions * rows), "not every question once per row"
    assert len(by_rank["0"]) < len(by_rank["1"]), "the last round's one question goes to rank 1"
    assert by_rank["0"][:2] == questions[:2] and by_rank["1"][:2] == questions[2:4], "a round's shares"


def test_a_run_interrupted_on_two_ranks_is_finished_by_one(vqa_llava, data_dir, tmp_path, capsys):
    """Rank 1 is interrupted at its 5th answer (in the second row): one line, exit 130 on both ranks, rank 0 saves
    what it gathered; --resume in one process answers only the rest, and the file is the one process's."""
    one, many = tmp_path / "one.json", tmp_path / "many.json"
    assert eval_vqa.main(vqa_command(vqa_llava, data_dir, one, *ARGV)) == 0
    ranks_out = run_ranks(vqa_command(vqa_llava, data_dir, many, *ARGV), 2, tmp_path, INTERRUPT_RANK="1",
                          INTERRUPT_AT="5")
    assert [code for code, _, _ in ranks_out] == [130, 130], [err[-2000:] for _, _, err in ranks_out]
    said = sum((said_lines(err) for _, _, err in ranks_out), [])
    assert len(said) == 1 and said[0].startswith("interrupted: ") and "torchrun --nproc-per-node 2 eval_vqa.py" \
        in said[0] and said[0].endswith(" --resume"), said
    saved = json.loads(many.read_text())["results"]
    answered = sum(len(r["predictions"]) for r in saved)
    assert 9 <= answered < 4 * 9 and saved[0]["complete"] and not saved[-1]["complete"], [
        (r["method"], len(r["predictions"])) for r in saved]

    calls, real = [], eval_vqa.answer

    def counting(model, tokenizer, question, *args, **kwargs):
        calls.append(question.id)
        return real(model, tokenizer, question, *args, **kwargs)

    eval_vqa.answer = counting
    try:
        assert eval_vqa.main(vqa_command(vqa_llava, data_dir, many, *ARGV, "--resume")) == 0
    finally:
        eval_vqa.answer = real
    assert len(calls) == 4 * 9 - answered, "--resume answered what the interrupted run had saved"
    assert_same_rows(json.loads(many.read_text()), json.loads(one.read_text()), "interrupted on 2 ranks, resumed on 1")


def test_offload_answers_as_the_model_on_the_device(vqa_llava, data_dir, tmp_path, monkeypatch, capsys):
    """On the CPU the moves are no-ops, so the hooks are watched: every block's turn is a visit then a leave, one
    block away from CPU memory at a time, for every answer."""
    argv = ARGV + ["--mumoe-routing", "block", "linear", "--limit", "4"]
    plain, offload = tmp_path / "plain.json", tmp_path / "offload.json"
    assert eval_vqa.main(vqa_command(vqa_llava, data_dir, plain, *argv)) == 0
    capsys.readouterr()
    code, err = eval_vqa.main(vqa_command(vqa_llava, data_dir, offload, *argv, "--offload")), capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--offload" in err and "nothing to offload to" in err, err

    monkeypatch.setattr(command_line, "check_offload", lambda device: None)  # the CPU stands in for a GPU
    events = watch_offload(monkeypatch)
    assert eval_vqa.main(vqa_command(vqa_llava, data_dir, offload, *argv, "--offload")) == 0
    assert_same_rows(json.loads(offload.read_text()), json.loads(plain.read_text()), "--offload")
    # each answer runs both blocks at least once (the prompt; μ-MoE block routing: twice); the calibration prompts
    # are embedded with the language model's outer modules on the device (its blocks do not run then)
    assert_one_block_at_a_time(events, 2 * 4 * 5, "--offload, 5 rows of 4 answers")
