"""eval_vqa, the command: bad input, every method end to end, resume, Ctrl-C, the tables. Each test can fail.
(vqa_tasks' metrics, prompts and data: test_vqa_tasks.)

The command runs end to end on a tiny random LLaVA saved in the Hugging Face layout and on tiny parquet files
of each task made here with random images: nothing is downloaded, and ../shared is not needed.
"""

import json
from pathlib import Path

import pytest

import eval_vqa
import models
import packed_experts
import vqa_tasks
from kit.checks import assert_one_line_error
from kit.commands import run_command, vqa_command
from kit.data import textvqa_rows, write_parquet
from vqa_tasks import scienceqa_letter, vqa_accuracy


# -----------------------------------------------------------------------------
# Bad input: one line, exit code 2, before any model work


def fake_model_dir(tmp_path: Path, model_type: str) -> Path:
    """A directory with only a config.json: enough for every check made before the model is loaded."""
    directory = tmp_path / f"model-{model_type}"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
    return directory


def run_vqa(capsys, *argv) -> tuple[int, str]:
    """eval_vqa's exit code and its stderr."""
    code, _, err = run_command(eval_vqa.main, [str(a) for a in argv], capsys)
    return code, err


@pytest.mark.parametrize("argv, fragment", [
    (["--task", "vqav2"], "--task: invalid choice: 'vqav2'"),
    (["--task", "textvqa", "--calib", "c4"], "--calib: invalid choice: 'c4'"),
    (["--task", "textvqa", "--limit", "0"], "--limit: expected a positive integer, got 0"),
    (["--task", "textvqa", "--rho", "1.5"], "rho is the active-weight ratio"),
    (["--task", "textvqa", "--methods", "sparse"], "--methods: invalid choice: 'sparse'"),
])
def test_bad_arguments(capsys, tmp_path, argv, fragment):
    code, err = run_vqa(capsys, "--model", tmp_path, *argv)
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize("model_type, fragments", [
    ("opt", ["is a 'opt' model", "evaluates LLaVA-1.5 (model_type 'llava')"]),
    ("llava_next", ["LLaVA-NeXT", "is not supported"]),
    ("bert", ["model_type 'bert' is not supported"]),
])
def test_a_model_that_is_not_llava_is_refused(capsys, tmp_path, data_dir, model_type, fragments):
    code, err = run_vqa(capsys, "--model", fake_model_dir(tmp_path, model_type), "--task", "textvqa",
                            "--data-dir", data_dir, "--out", tmp_path / "out.json")
    assert_one_line_error(code, err, *fragments)


def test_a_parquet_file_without_a_column_is_named(capsys, tmp_path):
    bad = write_parquet(tmp_path / "data" / "textvqa" / "validation.parquet", textvqa_rows(3), drop=["ocr_tokens"])
    code, err = run_vqa(capsys, "--model", fake_model_dir(tmp_path, "llava"), "--task", "textvqa",
                            "--methods", "dense", "--data-dir", tmp_path / "data", "--out", tmp_path / "out.json")
    assert_one_line_error(code, err, str(bad), "no column ocr_tokens")


def test_a_file_that_is_not_parquet_is_named(capsys, tmp_path):
    bad = tmp_path / "data" / "scienceqa" / "test.parquet"
    bad.parent.mkdir(parents=True)
    bad.write_text("not parquet")
    code, err = run_vqa(capsys, "--model", fake_model_dir(tmp_path, "llava"), "--task", "scienceqa",
                            "--methods", "dense", "--data-dir", tmp_path / "data", "--out", tmp_path / "out.json")
    assert_one_line_error(code, err, str(bad), "not a readable parquet file")


def test_missing_data_is_named(capsys, tmp_path, data_dir):
    (data_dir / "scienceqa" / "test-00000-of-00001.parquet").unlink()
    code, err = run_vqa(capsys, "--model", fake_model_dir(tmp_path, "llava"), "--task", "textvqa",
                            "--data-dir", data_dir, "--out", tmp_path / "out.json")  # calibrated on ScienceQA
    assert_one_line_error(code, err, "no scienceqa data in --data-dir", "holds no .parquet file")


def test_too_few_calibration_prompts_is_refused(capsys, tmp_path, data_dir):
    code, err = run_vqa(capsys, "--model", fake_model_dir(tmp_path, "llava"), "--task", "textvqa",
                            "--data-dir", data_dir, "--out", tmp_path / "out.json")  # 6 of 9 have an image
    assert_one_line_error(code, err, "--nsamples 128", "only 6 with an image", "--nsamples 6 or less")


def break_image(data_dir: Path, task: str, row: int) -> None:
    import pyarrow.parquet

    path = vqa_tasks.task_files(task, data_dir)[0]
    rows = pyarrow.parquet.read_table(path).to_pylist()
    rows[row]["image"] = {"bytes": b"\x89PNG not really", "path": None}
    write_parquet(path, rows)


def test_an_image_that_does_not_decode_is_named_by_row(capsys, tmp_path, data_dir):
    break_image(data_dir, "textvqa", 2)
    code, err = run_vqa(capsys, "--model", fake_model_dir(tmp_path, "llava"), "--task", "textvqa",
                            "--methods", "dense", "--data-dir", data_dir, "--out", tmp_path / "out.json")
    assert_one_line_error(code, err, "textvqa question 102", "validation-00000-of-00002.parquet, row 2",
                          "does not decode", "--skip-bad-rows")


def test_skip_bad_rows_leaves_the_question_out_and_reports_it(data_dir):
    break_image(data_dir, "textvqa", 2)
    questions = vqa_tasks.read_questions("textvqa", vqa_tasks.task_files("textvqa", data_dir))
    kept, skipped = vqa_tasks.check_images(questions, skip_bad_rows=True)
    assert [q.id for q in kept] == [q.id for q in questions if q.id != "102"]
    assert [s["id"] for s in skipped] == ["102"] and "row 2" in skipped[0]["where"]


def test_an_unwritable_out_is_refused(capsys, tmp_path, data_dir):
    (tmp_path / "file").write_text("")
    code, err = run_vqa(capsys, "--model", fake_model_dir(tmp_path, "llava"), "--task", "textvqa",
                            "--data-dir", data_dir, "--out", tmp_path / "file" / "out.json")
    assert_one_line_error(code, err, "--out", "cannot be written")


# -----------------------------------------------------------------------------
# The command end to end: a tiny random LLaVA in the Hugging Face layout, a tiny tokenizer, tiny parquet files


def rescored(report: dict) -> dict[tuple, tuple[float, float]]:
    """Each row's accuracy and image-subset accuracy, scored again from the saved predictions alone, with the
    task's metric functions (not eval_vqa's bookkeeping)."""
    questions = {q["id"]: q for q in report["questions"]}
    out = {}
    for row in report["results"]:
        scores, image_scores = [], []
        for p in row["predictions"]:
            q = questions[p["id"]]
            if "answers" in q:
                s = vqa_accuracy(p["prediction"], q["answers"])
            else:
                s = float(scienceqa_letter(p["prediction"], q["n_choices"]) == q["answer"])
            scores.append(s)
            if q["image"]:
                image_scores.append(s)
        mean = lambda xs: 100 * sum(xs) / len(xs) if xs else None
        out[eval_vqa.row_key(row)] = (mean(scores), mean(image_scores))
    return out


def counting_answers(monkeypatch) -> list[tuple]:
    """Record (method, rho, question id) of every answer the command asks the model for."""
    calls, real = [], eval_vqa.answer

    def answer(model, tokenizer, question, *args, **kwargs):
        calls.append(question.id)
        return real(model, tokenizer, question, *args, **kwargs)

    monkeypatch.setattr(eval_vqa, "answer", answer)
    return calls


@pytest.mark.parametrize("task", ["scienceqa", "textvqa"])
def test_every_method_runs_and_the_accuracy_is_the_rescored_predictions(vqa_llava, data_dir, tmp_path, task,
                                                                        capsys):
    out = tmp_path / "out.json"
    assert eval_vqa.main(vqa_command(vqa_llava, data_dir, out, "--task", task)) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())  # strict JSON: json.loads would take NaN, so check the text too
    assert "NaN" not in out.read_text() and "Infinity" not in out.read_text()

    calib = {"scienceqa": "textvqa", "textvqa": "scienceqa"}[task]
    keys = [eval_vqa.row_key(r) for r in report["results"]]
    assert keys == [("dense", 1.0, None, None)] + [
        (m, rho, calib if m in ("sparsegpt", "wanda") else None, r) for rho in (0.6, 0.4)
        for m, r in [("magnitude", None), ("sparsegpt", None), ("wanda", None), ("mumoe", "block"),
                     ("mumoe", "linear")]]
    n = {"scienceqa": 9, "textvqa": 8}[task]
    assert report["settings"]["questions"] == n and len(report["questions"]) == n
    assert report["settings"]["calib"] == calib and report["settings"]["nsamples"] == 4
    assert [f["file"] for f in report["settings"]["data"][task]] == sorted(p.name for p in (data_dir / task).iterdir())
    for row in report["results"]:
        assert row["complete"] and [p["id"] for p in row["predictions"]] == [q["id"] for q in report["questions"]]
        assert (row["accuracy"], row["accuracy_image"]) == pytest.approx(rescored(report)[eval_vqa.row_key(row)])
    # memory per routed prompt: only μ-MoE's prompts hold experts beside the model, packed where the kernel runs
    # (rho + 1/32 of the Linears' bytes, with each block's padding and start) and W ⊙ M's whole bytes where not
    language_model = models.load_model(vqa_llava).language_model
    linear_bytes = sum(layer.weight.nbytes for block in language_model.blocks for layer in block.linears().values())
    for row in report["results"]:
        held = max(p["experts_bytes"] for p in row["predictions"]) / linear_bytes
        assert row["experts_bytes_max"] == held * linear_bytes, eval_vqa.label(row)
        expected = (0.0, 0.0) if row["method"] != "mumoe" else (
            (row["rho"], row["rho"] + 0.1) if packed_experts.kernel_problem() is None else (1.0, 1.0))
        assert expected[0] <= held <= expected[1], f"{eval_vqa.label(row)} rho {row['rho']}: {held:.3f} of the bytes"
    # the pruned rows answer differently from the dense one (the model really was pruned / routed)
    dense = [p["prediction"] for p in report["results"][0]["predictions"]]
    for row in report["results"][1:]:
        assert [p["prediction"] for p in row["predictions"]] != dense, eval_vqa.label(row)

    for name in ["Dense", "Magnitude", "SparseGPT (" + eval_vqa.TASK_NAMES[calib] + ")", "Wanda", "μ-MoE",
                 "μ-MoE (one pass)", "60%", "40%", "100%"]:
        assert name in printed, name
    assert ("questions with an image" in printed) == (task == "scienceqa")
    assert "[" not in printed.split("accuracy (%)")[1]  # a tiny model: no paper figures beside ours


def test_the_accuracy_counts_right_answers(vqa_llava, data_dir, tmp_path):
    """TextVQA questions whose 10 answers are the dense model's own prediction score 100, the others 0: the
    dense row's accuracy is then the share of such questions, exactly."""
    import pyarrow.parquet

    first = tmp_path / "first.json"
    assert eval_vqa.main(vqa_command(vqa_llava, data_dir, first, "--task", "textvqa", "--methods", "dense")) == 0
    predictions = {p["id"]: p["prediction"] for p in json.loads(first.read_text())["results"][0]["predictions"]}
    for path in vqa_tasks.task_files("textvqa", data_dir):
        rows = pyarrow.parquet.read_table(path).to_pylist()
        for row in rows:
            right = row["question_id"] % 4 == 0  # 100, 104: 2 of the 8 questions
            row["answers"] = [predictions[str(row["question_id"])] if right else "no such answer"] * 10
        write_parquet(path, rows)
    out = tmp_path / "out.json"
    assert eval_vqa.main(vqa_command(vqa_llava, data_dir, out, "--task", "textvqa", "--methods", "dense")) == 0
    assert json.loads(out.read_text())["results"][0]["accuracy"] == pytest.approx(100 * 2 / 8)


def test_resume_answers_only_what_is_missing(vqa_llava, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out.json"
    argv = vqa_command(vqa_llava, data_dir, out, "--task", "textvqa", "--methods", "dense", "wanda", "mumoe",
                   "--mumoe-routing", "block")
    calls = counting_answers(monkeypatch)
    assert eval_vqa.main(argv + ["--limit", "3"]) == 0
    assert len(calls) == 5 * 3  # dense, then wanda and μ-MoE at two ratios
    first = json.loads(out.read_text())

    calls.clear()
    assert eval_vqa.main(argv + ["--limit", "5", "--resume"]) == 0
    assert calls == ["103", "104"] * 5  # the first three questions of every row are kept
    second = json.loads(out.read_text())
    for old, new in zip(first["results"], second["results"]):
        assert new["predictions"][:3] == old["predictions"]
        assert len(new["predictions"]) == 5 and new["complete"]

    # a run killed in the middle of a row: the row's saved predictions are kept, the rest answered
    second["results"][2]["predictions"] = second["results"][2]["predictions"][:2]
    second["results"][2]["complete"] = False
    out.write_text(json.dumps(second))
    calls.clear()
    assert eval_vqa.main(argv + ["--limit", "5", "--resume"]) == 0
    assert calls == ["102", "103", "104"]
    third = json.loads(out.read_text())
    assert third["results"][:2] == second["results"][:2]  # the finished rows as they were
    assert third["results"][2]["predictions"][:2] == second["results"][2]["predictions"]
    assert [p["id"] for p in third["results"][2]["predictions"]] == ["100", "101", "102", "103", "104"]

    calls.clear()
    assert eval_vqa.main(argv + ["--limit", "5", "--resume"]) == 0
    assert calls == []
    # a resumed run that plans fewer rows keeps the others in the file
    assert eval_vqa.main(argv + ["--limit", "5", "--resume", "--rho", "0.6", "--methods", "dense"]) == 0
    assert calls == [] and json.loads(out.read_text())["results"] == third["results"]


def test_ctrl_c_saves_the_rows_answers_and_says_how_to_go_on(vqa_llava, data_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of a row: exit 130, one line with the count saved and the --resume command, and the
    row's answers so far in the file (not only those of the last once-a-minute save), which --resume keeps."""
    out = tmp_path / "out.json"
    argv = vqa_command(vqa_llava, data_dir, out, "--task", "textvqa", "--methods", "dense", "--limit", "4")
    calls, real = [], eval_vqa.answer

    def answer_then_ctrl_c(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(args[2].id)
        return real(*args, **kwargs)

    monkeypatch.setattr(eval_vqa, "answer", answer_then_ctrl_c)
    assert eval_vqa.main(argv) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar's
    assert line.startswith(f"interrupted: 3 answers saved in {out}; to go on: python eval_vqa.py ") \
        and line.endswith(" --resume"), line
    row = json.loads(out.read_text())["results"][0]
    assert [p["id"] for p in row["predictions"]] == calls and not row["complete"]
    monkeypatch.undo()
    calls = counting_answers(monkeypatch)
    assert eval_vqa.main(argv + ["--resume"]) == 0
    assert calls == ["103"], "--resume answers only the question the interrupted run had not"


def test_resume_refuses_other_settings(vqa_llava, data_dir, tmp_path, capsys):
    out = tmp_path / "out.json"
    argv = vqa_command(vqa_llava, data_dir, out, "--task", "textvqa", "--methods", "dense", "--limit", "2")
    assert eval_vqa.main(argv) == 0
    capsys.readouterr()
    code, err = run_vqa(capsys, *argv, "--resume", "--max-new-tokens", "3")
    assert_one_line_error(code, err, "--resume", "max_new_tokens 6 there, 3 here")
    write_parquet(data_dir / "textvqa" / "validation-00001-of-00002.parquet", textvqa_rows(8, seed=1)[5:])
    code, err = run_vqa(capsys, *argv, "--resume")
    assert_one_line_error(code, err, "--resume", "other textvqa files (by sha256)")


def test_skip_bad_rows_goes_on_and_counts_them(vqa_llava, data_dir, tmp_path):
    break_image(data_dir, "textvqa", 2)
    out = tmp_path / "out.json"
    assert eval_vqa.main(vqa_command(vqa_llava, data_dir, out, "--task", "textvqa", "--methods", "dense",
                                 "--skip-bad-rows")) == 0
    report = json.loads(out.read_text())
    assert [s["id"] for s in report["settings"]["skipped_rows"]] == ["102"]
    assert report["settings"]["questions"] == 7 and "102" not in [q["id"] for q in report["questions"]]


def test_save_data_then_data_dir_gives_the_same_run(vqa_llava, data_dir, tmp_path):
    argv = ["--task", "scienceqa", "--methods", "dense", "wanda", "--rho", "0.5", "--limit", "3"]
    assert eval_vqa.main(vqa_command(vqa_llava, data_dir, tmp_path / "a.json", *argv, "--save-data",
                                 tmp_path / "saved")) == 0
    assert sorted(p.relative_to(tmp_path / "saved").as_posix() for p in (tmp_path / "saved").rglob("*.parquet")) == [
        "scienceqa/test-00000-of-00001.parquet", "textvqa/validation-00000-of-00002.parquet",
        "textvqa/validation-00001-of-00002.parquet"]  # the task's files and the calibration task's
    assert eval_vqa.main(vqa_command(vqa_llava, tmp_path / "saved", tmp_path / "b.json", *argv)) == 0
    a, b = (json.loads((tmp_path / name).read_text()) for name in ("a.json", "b.json"))
    assert [r["predictions"] for r in a["results"]] == [r["predictions"] for r in b["results"]]
    assert a["settings"]["data"] == b["settings"]["data"]  # the same files, by sha256


def test_each_pruned_row_starts_from_the_checkpoint(vqa_llava, data_dir, tmp_path):
    """Wanda after magnitude in one run answers as Wanda alone: every pruned row prunes a fresh model."""
    argv = ["--task", "textvqa", "--rho", "0.4", "--limit", "4"]
    assert eval_vqa.main(vqa_command(vqa_llava, data_dir, tmp_path / "both.json", *argv,
                                 "--methods", "magnitude", "wanda")) == 0
    assert eval_vqa.main(vqa_command(vqa_llava, data_dir, tmp_path / "alone.json", *argv, "--methods", "wanda")) == 0
    both, alone = (json.loads((tmp_path / f"{name}.json").read_text())["results"] for name in ("both", "alone"))
    assert both[1]["predictions"] == alone[0]["predictions"]


def test_summary_counts_all_questions_and_those_with_an_image():
    questions = {str(i): vqa_tasks.Question("scienceqa", str(i), "", "", b"png" if i < 3 else None, "A", 2)
                 for i in range(5)}
    predictions = [{"id": str(i), "prediction": "", "score": s, "experts_bytes": 100 * i}
                   for i, s in enumerate([1.0, 0.0, 1.0, 1.0, 0.0])]
    assert eval_vqa.summary(predictions, questions) == {"accuracy": 60.0, "accuracy_image": pytest.approx(200 / 3),
                                                        "answered": 5, "answered_image": 3, "experts_bytes_max": 400}
    for p in predictions:  # a file written before the experts' bytes were recorded
        del p["experts_bytes"]
    assert eval_vqa.summary(predictions, questions)["experts_bytes_max"] == 0


def table_rows(calib: str) -> list[dict]:
    row = lambda method, rho, calib=None, routing=None: dict(method=method, rho=rho, calib=calib, routing=routing,
                                                            accuracy=12.5, accuracy_image=25.0, complete=True)
    return [row("dense", 1.0)] + [r for rho in (0.6, 0.4) for r in (
        row("magnitude", rho), row("sparsegpt", rho, calib), row("wanda", rho, calib), row("mumoe", rho, None, "block"),
        row("mumoe", rho, None, "linear"))]


def test_the_table_puts_the_papers_figures_beside_the_rows_of_its_setting():
    settings = dict(model="llava-1.5-7b", task="textvqa", paper_model=True, questions=8, questions_with_image=8)
    lines = eval_vqa.tables(table_rows("scienceqa"), settings).splitlines()
    assert lines[1].split() == ["100%", "60%", "40%"]
    assert lines[2].split() == ["Dense", "12.50", "[61.32]"]
    assert lines[3].split() == ["Magnitude", "12.50", "[54.12]", "12.50", "[24.62]"]
    assert lines[6].split() == ["μ-MoE", "12.50", "[57.16]", "12.50", "[46.97]"]
    assert lines[7].split() == ["μ-MoE", "(one", "pass)", "12.50", "12.50"]  # not the paper's routing
    # calibrated on TextVQA itself: not the paper's setting, no figure beside SparseGPT and Wanda
    lines = eval_vqa.tables(table_rows("textvqa"), settings).splitlines()
    assert lines[4].split() == ["SparseGPT", "(TextVQA)", "12.50", "12.50"]
    assert "[" not in eval_vqa.tables(table_rows("scienceqa"), settings | {"paper_model": False})
    # ScienceQA: all questions with the paper's figures, then the image subset without
    settings |= dict(task="scienceqa", questions=9, questions_with_image=6)
    text = eval_vqa.tables(table_rows("textvqa"), settings)
    everything, images = text.split("\n\n")
    assert "all 9 questions" in everything and "[70.03]" in everything and "[0.21]" in everything
    assert "6 questions with an image" in images and "25.00" in images and "[" not in images


def test_questions_of_both_tasks_with_the_same_id_keep_their_own_prompts(vqa_llava, data_dir, tmp_path):
    """TextVQA question ids 0-7 and ScienceQA row numbers 0-8 overlap: calibrating on ScienceQA must not change
    the TextVQA prompts the dense row answers."""
    write_parquet(data_dir / "textvqa" / "validation-00000-of-00002.parquet", textvqa_rows(8, first_id=0))
    (data_dir / "textvqa" / "validation-00001-of-00002.parquet").unlink()
    argv = ["--task", "textvqa", "--rho", "0.5", "--limit", "3"]
    assert eval_vqa.main(vqa_command(vqa_llava, data_dir, tmp_path / "a.json", *argv, "--methods", "dense")) == 0
    assert eval_vqa.main(vqa_command(vqa_llava, data_dir, tmp_path / "b.json", *argv, "--methods", "dense", "wanda")) == 0
    a, b = (json.loads((tmp_path / name).read_text())["results"][0] for name in ("a.json", "b.json"))
    assert a["predictions"] == b["predictions"]


