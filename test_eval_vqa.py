"""Tests for vqa_tasks (metrics, prompts, data) and eval_vqa (the command). Each test can fail.

References: the rules of LLaVA's `eval_science_qa.py` and of the EvalAI answer processor with the VQA
accuracy (LLaVA's `m4c_evaluator.py`), written out case by case below; for the prompts, lines of LLaVA's own
question files (`llava_test_CQM-A.json`, `llava_textvqa_val_v051_ocr.jsonl`) quoted character for character.
The command runs end to end on a tiny random LLaVA saved in the Hugging Face layout and on tiny parquet files
of each task made here with random images: nothing is downloaded, and ../shared is not needed.
"""

import json
import random
from pathlib import Path

import pytest

import eval_vqa
import vqa_tasks
from testkit import (assert_one_line_error, png, save_vqa_llava, scienceqa_rows, textvqa_rows, vqa_command,
                     write_parquet, write_vqa_data)
from vqa_tasks import normalize_answer, scienceqa_letter, scienceqa_message, textvqa_message, vqa_accuracy

# -----------------------------------------------------------------------------
# ScienceQA: the letter of a prediction


@pytest.mark.parametrize("prediction, n_choices, letter", [
    ("B", 4, "B"),                         # a bare letter
    ("E", 5, "E"),
    ("E", 4, None),                        # ...that names no option of this question
    ("F", 5, None),                        # not one of the options A-E at all
    ("b", 4, None),                        # lowercase is not a letter answer
    ("", 4, None),
    ("AB", 4, None),                       # two letters are not one
    ("C. Rhode Island", 4, "C"),           # "X. " at the start, 3+ characters
    ("C. ", 4, "C"),
    ("C.", 4, None),                       # too short for "X. "
    ("C) Rhode Island", 4, None),
    ("F. Rhode Island", 4, None),
    ("I think so. The answer is B.", 4, "B"),       # one "The answer is X." anywhere
    ("The answer is B!", 4, "B"),                   # the reference's dot is any character
    ("The answer is B", 4, None),                   # ...but there must be one
    ("The answer is A. The answer is B.", 4, None),  # two matches: no answer
    ("The answer is F.", 4, None),                  # a letter beyond the options
    ("the answer is B.", 4, None),                  # case matters
])
def test_scienceqa_letter_follows_llavas_rules(prediction, n_choices, letter):
    assert scienceqa_letter(prediction, n_choices) == letter


# -----------------------------------------------------------------------------
# TextVQA: the EvalAI answer processor, one rule at a time, and the VQA accuracy


@pytest.mark.parametrize("answer, normalized", [
    ("Coca Cola", "coca cola"),            # lowercase
    ("  yes\n", "yes"),                    # whitespace trimmed, newlines are spaces
    ("what?", "what"),                     # "?" and "," dropped
    ("1,000", "1000"),                     # a comma between digits: the number stays one word
    ("coke's", "coke 's"),                 # "'s" split off
    ("x-ray", "x ray"),                    # a mark with no space beside it anywhere: a space
    ("x-ray - yes", "xray yes"),           # a space beside the mark somewhere: every such mark removed
    ("(a) dog", "dog"),                    # "(" and ")": then "a" is an article
    ("3.5", "3.5"),                        # a period before a digit stays
    ("5.", "5"),                           # a period not before a digit goes
    ("mr. smith", "mr smith"),
    ("two", "2"),                          # number words to digits
    ("none", "0"),
    ("twenty", "twenty"),                  # only zero to ten
    ("the beatles", "beatles"),            # articles dropped
    ("an apple a day", "apple day"),
    ("dont", "don't"),                     # contractions get their apostrophe
    ("whats", "what's"),
    ("what's", "what 's"),                 # ...while "'s" itself is split off
    ("." * 40, "." * 8),                   # only the first 32 periods go (the reference's count)
])
def test_answer_processor_rules(answer, normalized):
    assert normalize_answer(answer) == normalized


def test_vqa_accuracy_counts_matches_by_leave_one_out():
    # 10 human answers, k of them equal to the prediction. Each of the 10 subsets leaves one answer out:
    # leaving out one of the k matches leaves k - 1 matches in the subset, leaving out one of the 10 - k
    # others leaves k, and a subset scores min(1, matches / 3). The accuracy is the mean over the 10:
    #   k = 1: (1 * 0/3 + 9 * 1/3) / 10 = 3/10 = 0.3
    #   k = 2: (2 * 1/3 + 8 * 2/3) / 10 = 6/10 = 0.6
    #   k = 3: (3 * 2/3 + 7 * 1)   / 10 = 9/10 = 0.9
    #   k = 4: (4 * 1   + 6 * 1)   / 10 = 1.0, and every k >= 4 scores 1.0
    for k, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)]:
        answers = ["stop"] * k + [f"other {i}" for i in range(10 - k)]
        random.Random(k).shuffle(answers)
        assert vqa_accuracy("stop", answers) == pytest.approx(expected), k


def test_vqa_accuracy_compares_normalized_answers():
    answers = ["Two", "2", "two.", "the 2"] + ["three"] * 6  # all four normalize to "2"
    assert vqa_accuracy("2", answers) == pytest.approx(1.0)
    assert vqa_accuracy("TWO!", answers) == pytest.approx(1.0)
    assert vqa_accuracy("3", answers) == pytest.approx(1.0)  # "three" six times
    assert vqa_accuracy("four", answers) == 0.0


# -----------------------------------------------------------------------------
# Prompts, character for character against lines of LLaVA's question files


SCIENCEQA_INSTRUCTION = "\nAnswer with the option's letter from the given choices directly."


def test_scienceqa_message_is_stripped_as_llava_strips_its_lines():
    message = scienceqa_message("Which is a mammal? ", "", ["whale ", "shark\n"], has_image=True)
    assert message == "<image>\nWhich is a mammal? \nA. whale \nB. shark" + SCIENCEQA_INSTRUCTION


@pytest.mark.parametrize("row, llava_line", [
    # llava_test_CQM-A.json, id 46: an image and a hint
    (dict(question="Which property do these three objects have in common?", hint="Select the best answer.",
          choices=["shiny", "slippery", "opaque"], image=True),
     "<image>\nContext: Select the best answer.\nWhich property do these three objects have in common?\n"
     "A. shiny\nB. slippery\nC. opaque"),
    # id 11: an image, no hint
    (dict(question="What is the name of the colony shown?", hint="",
          choices=["Maryland", "New Hampshire", "Rhode Island", "Vermont"], image=True),
     "<image>\nWhat is the name of the colony shown?\nA. Maryland\nB. New Hampshire\nC. Rhode Island\nD. Vermont"),
    # id 26: a hint, no image
    (dict(question="How long does it take to bake lasagna in the oven?", hint="Select the better estimate.",
          choices=["33 minutes", "33 hours"], image=False),
     "Context: Select the better estimate.\nHow long does it take to bake lasagna in the oven?\nA. 33 minutes\n"
     "B. 33 hours"),
    # id 29: neither (the question itself runs over three lines)
    (dict(question="What do these two changes have in common?\ncompost rotting\na piece of apple turning brown",
          hint="", choices=["Both are caused by cooling.", "Both are only physical changes.",
                            "Both are caused by heating.", "Both are chemical changes."], image=False),
     "What do these two changes have in common?\ncompost rotting\na piece of apple turning brown\n"
     "A. Both are caused by cooling.\nB. Both are only physical changes.\nC. Both are caused by heating.\n"
     "D. Both are chemical changes."),
])
def test_scienceqa_message_is_llavas(row, llava_line):
    # LLaVA's model_vqa_science.py adds the instruction after the file's line (--single-pred-prompt)
    message = scienceqa_message(row["question"], row["hint"], row["choices"], row["image"])
    assert message == llava_line + SCIENCEQA_INSTRUCTION


@pytest.mark.parametrize("question, ocr_tokens, llava_text", [
    # llava_textvqa_val_v051_ocr.jsonl, question 003a8ae2ef43b901 (TextVQA's question is lowercase)
    ("what is the brand of this camera?", ["DAKOTA", "DIGITAL", "Single-Use", "Camera", "Pire", "digitat"],
     "What is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL, Single-Use, Camera, Pire, digitat\n"
     "Answer the question using a single word or phrase."),
    # 97b1112b17015396: no OCR token, the line stays
    ("whats the lowest number yard line that you can see?", [],
     "Whats the lowest number yard line that you can see?\nReference OCR token: \n"
     "Answer the question using a single word or phrase."),
    # 5ce862cbefd8458f: str.capitalize lowers the rest of the question too
    ("Is this Denny's?", ["Deniy's", "D"],
     "Is this denny's?\nReference OCR token: Deniy's, D\nAnswer the question using a single word or phrase."),
])
def test_textvqa_message_is_llavas(question, ocr_tokens, llava_text):
    # model_vqa_loader.py puts "<image>\n" in front of the file's text
    assert textvqa_message(question, ocr_tokens) == "<image>\n" + llava_text


def test_the_image_placeholder_is_the_models():
    import llava_model

    assert vqa_tasks.IMAGE_PLACEHOLDER == llava_model.IMAGE_PLACEHOLDER


# -----------------------------------------------------------------------------
# Tiny parquet files of each task, with random images, in the hub's layout


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return write_vqa_data(tmp_path / "data")


def test_questions_from_parquet_rows(data_dir):
    questions = vqa_tasks.read_questions("textvqa", vqa_tasks.task_files("textvqa", data_dir))
    rows = textvqa_rows(8)
    assert [q.id for q in questions] == [str(r["question_id"]) for r in rows]  # file order, then row order
    assert questions[6].where == "validation-00001-of-00002.parquet, row 1"
    assert questions[6].message == textvqa_message(rows[6]["question"], rows[6]["ocr_tokens"])
    assert questions[6].answer == rows[6]["answers"] and questions[6].image == rows[6]["image"]["bytes"]

    questions = vqa_tasks.read_questions("scienceqa", vqa_tasks.task_files("scienceqa", data_dir))
    rows = scienceqa_rows(9)
    assert [q.id for q in questions] == [str(i) for i in range(9)]
    for q, r in zip(questions, rows):
        assert (q.image is None) == (r["image"] is None)
        assert q.message == scienceqa_message(r["question"], r["hint"], r["choices"], r["image"] is not None)
        assert q.answer == "ABCDE"[r["answer"]] and q.n_choices == len(r["choices"])


def test_score_is_the_tasks_metric(data_dir):
    sqa = vqa_tasks.read_questions("scienceqa", vqa_tasks.task_files("scienceqa", data_dir))[0]
    assert vqa_tasks.score(sqa, sqa.answer) == 1.0
    assert vqa_tasks.score(sqa, f"{sqa.answer}. something") == 1.0
    assert vqa_tasks.score(sqa, "Z") == 0.0
    tvqa = vqa_tasks.read_questions("textvqa", vqa_tasks.task_files("textvqa", data_dir))[0]
    assert vqa_tasks.score(tvqa, tvqa.answer[0]) == vqa_accuracy(tvqa.answer[0], tvqa.answer) > 0


def test_save_data_copies_the_files_into_the_data_dir_layout(data_dir, tmp_path):
    files = vqa_tasks.task_files("textvqa", data_dir)
    copies = vqa_tasks.save_files(files, tmp_path / "saved", "textvqa")
    assert copies == vqa_tasks.task_files("textvqa", tmp_path / "saved")
    assert [c.read_bytes() for c in copies] == [f.read_bytes() for f in files]


# -----------------------------------------------------------------------------
# Bad input: one line, exit code 2, before any model work


def fake_model_dir(tmp_path: Path, model_type: str) -> Path:
    """A directory with only a config.json: enough for every check made before the model is loaded."""
    directory = tmp_path / f"model-{model_type}"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
    return directory


def run_command(capsys, *argv) -> tuple[int, str]:
    """eval_vqa's exit code and its stderr; argparse's errors exit through SystemExit."""
    try:
        code = eval_vqa.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, fragment", [
    (["--task", "vqav2"], "--task: invalid choice: 'vqav2'"),
    (["--task", "textvqa", "--calib", "c4"], "--calib: invalid choice: 'c4'"),
    (["--task", "textvqa", "--limit", "0"], "--limit: expected a positive integer, got 0"),
    (["--task", "textvqa", "--rho", "1.5"], "rho is the active-weight ratio"),
    (["--task", "textvqa", "--methods", "sparse"], "--methods: invalid choice: 'sparse'"),
])
def test_bad_arguments(capsys, tmp_path, argv, fragment):
    code, err = run_command(capsys, "--model", tmp_path, *argv)
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize("model_type, fragments", [
    ("opt", ["is a 'opt' model", "evaluates LLaVA-1.5 (model_type 'llava')"]),
    ("llava_next", ["LLaVA-NeXT", "is not supported"]),
    ("bert", ["model_type 'bert' is not supported"]),
])
def test_a_model_that_is_not_llava_is_refused(capsys, tmp_path, data_dir, model_type, fragments):
    code, err = run_command(capsys, "--model", fake_model_dir(tmp_path, model_type), "--task", "textvqa",
                            "--data-dir", data_dir, "--out", tmp_path / "out.json")
    assert_one_line_error(code, err, *fragments)


def test_a_parquet_file_without_a_column_is_named(capsys, tmp_path):
    bad = write_parquet(tmp_path / "data" / "textvqa" / "validation.parquet", textvqa_rows(3), drop=["ocr_tokens"])
    code, err = run_command(capsys, "--model", fake_model_dir(tmp_path, "llava"), "--task", "textvqa",
                            "--methods", "dense", "--data-dir", tmp_path / "data", "--out", tmp_path / "out.json")
    assert_one_line_error(code, err, str(bad), "no column ocr_tokens")


def test_a_file_that_is_not_parquet_is_named(capsys, tmp_path):
    bad = tmp_path / "data" / "scienceqa" / "test.parquet"
    bad.parent.mkdir(parents=True)
    bad.write_text("not parquet")
    code, err = run_command(capsys, "--model", fake_model_dir(tmp_path, "llava"), "--task", "scienceqa",
                            "--methods", "dense", "--data-dir", tmp_path / "data", "--out", tmp_path / "out.json")
    assert_one_line_error(code, err, str(bad), "not a readable parquet file")


def test_missing_data_is_named(capsys, tmp_path, data_dir):
    (data_dir / "scienceqa" / "test-00000-of-00001.parquet").unlink()
    code, err = run_command(capsys, "--model", fake_model_dir(tmp_path, "llava"), "--task", "textvqa",
                            "--data-dir", data_dir, "--out", tmp_path / "out.json")  # calibrated on ScienceQA
    assert_one_line_error(code, err, "no scienceqa data in --data-dir", "holds no .parquet file")


def test_too_few_calibration_prompts_is_refused(capsys, tmp_path, data_dir):
    code, err = run_command(capsys, "--model", fake_model_dir(tmp_path, "llava"), "--task", "textvqa",
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
    code, err = run_command(capsys, "--model", fake_model_dir(tmp_path, "llava"), "--task", "textvqa",
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
    code, err = run_command(capsys, "--model", fake_model_dir(tmp_path, "llava"), "--task", "textvqa",
                            "--data-dir", data_dir, "--out", tmp_path / "file" / "out.json")
    assert_one_line_error(code, err, "--out", "cannot be written")


# -----------------------------------------------------------------------------
# The command end to end: a tiny random LLaVA in the Hugging Face layout, a tiny tokenizer, tiny parquet files


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    return save_vqa_llava(tmp_path_factory.mktemp("tiny_llava"))


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
def test_every_method_runs_and_the_accuracy_is_the_rescored_predictions(tiny_llava, data_dir, tmp_path, task,
                                                                        capsys):
    out = tmp_path / "out.json"
    assert eval_vqa.main(vqa_command(tiny_llava, data_dir, out, "--task", task)) == 0
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
    # the pruned rows answer differently from the dense one (the model really was pruned / routed)
    dense = [p["prediction"] for p in report["results"][0]["predictions"]]
    for row in report["results"][1:]:
        assert [p["prediction"] for p in row["predictions"]] != dense, eval_vqa.label(row)

    for name in ["Dense", "Magnitude", "SparseGPT (" + eval_vqa.TASK_NAMES[calib] + ")", "Wanda", "μ-MoE",
                 "μ-MoE (one pass)", "60%", "40%", "100%"]:
        assert name in printed, name
    assert ("questions with an image" in printed) == (task == "scienceqa")
    assert "[" not in printed.split("accuracy (%)")[1]  # a tiny model: no paper figures beside ours


def test_the_accuracy_counts_right_answers(tiny_llava, data_dir, tmp_path):
    """TextVQA questions whose 10 answers are the dense model's own prediction score 100, the others 0: the
    dense row's accuracy is then the share of such questions, exactly."""
    import pyarrow.parquet

    first = tmp_path / "first.json"
    assert eval_vqa.main(vqa_command(tiny_llava, data_dir, first, "--task", "textvqa", "--methods", "dense")) == 0
    predictions = {p["id"]: p["prediction"] for p in json.loads(first.read_text())["results"][0]["predictions"]}
    for path in vqa_tasks.task_files("textvqa", data_dir):
        rows = pyarrow.parquet.read_table(path).to_pylist()
        for row in rows:
            right = row["question_id"] % 4 == 0  # 100, 104: 2 of the 8 questions
            row["answers"] = [predictions[str(row["question_id"])] if right else "no such answer"] * 10
        write_parquet(path, rows)
    out = tmp_path / "out.json"
    assert eval_vqa.main(vqa_command(tiny_llava, data_dir, out, "--task", "textvqa", "--methods", "dense")) == 0
    assert json.loads(out.read_text())["results"][0]["accuracy"] == pytest.approx(100 * 2 / 8)


def test_resume_answers_only_what_is_missing(tiny_llava, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out.json"
    argv = vqa_command(tiny_llava, data_dir, out, "--task", "textvqa", "--methods", "dense", "wanda", "mumoe",
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


def test_ctrl_c_saves_the_rows_answers_and_says_how_to_go_on(tiny_llava, data_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of a row: exit 130, one line with the count saved and the --resume command, and the
    row's answers so far in the file (not only those of the last once-a-minute save), which --resume keeps."""
    out = tmp_path / "out.json"
    argv = vqa_command(tiny_llava, data_dir, out, "--task", "textvqa", "--methods", "dense", "--limit", "4")
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


def test_resume_refuses_other_settings(tiny_llava, data_dir, tmp_path, capsys):
    out = tmp_path / "out.json"
    argv = vqa_command(tiny_llava, data_dir, out, "--task", "textvqa", "--methods", "dense", "--limit", "2")
    assert eval_vqa.main(argv) == 0
    capsys.readouterr()
    code, err = run_command(capsys, *argv, "--resume", "--max-new-tokens", "3")
    assert_one_line_error(code, err, "--resume", "max_new_tokens 6 there, 3 here")
    write_parquet(data_dir / "textvqa" / "validation-00001-of-00002.parquet", textvqa_rows(8, seed=1)[5:])
    code, err = run_command(capsys, *argv, "--resume")
    assert_one_line_error(code, err, "--resume", "other textvqa files (by sha256)")


def test_skip_bad_rows_goes_on_and_counts_them(tiny_llava, data_dir, tmp_path):
    break_image(data_dir, "textvqa", 2)
    out = tmp_path / "out.json"
    assert eval_vqa.main(vqa_command(tiny_llava, data_dir, out, "--task", "textvqa", "--methods", "dense",
                                 "--skip-bad-rows")) == 0
    report = json.loads(out.read_text())
    assert [s["id"] for s in report["settings"]["skipped_rows"]] == ["102"]
    assert report["settings"]["questions"] == 7 and "102" not in [q["id"] for q in report["questions"]]


def test_save_data_then_data_dir_gives_the_same_run(tiny_llava, data_dir, tmp_path):
    argv = ["--task", "scienceqa", "--methods", "dense", "wanda", "--rho", "0.5", "--limit", "3"]
    assert eval_vqa.main(vqa_command(tiny_llava, data_dir, tmp_path / "a.json", *argv, "--save-data",
                                 tmp_path / "saved")) == 0
    assert sorted(p.relative_to(tmp_path / "saved").as_posix() for p in (tmp_path / "saved").rglob("*.parquet")) == [
        "scienceqa/test-00000-of-00001.parquet", "textvqa/validation-00000-of-00002.parquet",
        "textvqa/validation-00001-of-00002.parquet"]  # the task's files and the calibration task's
    assert eval_vqa.main(vqa_command(tiny_llava, tmp_path / "saved", tmp_path / "b.json", *argv)) == 0
    a, b = (json.loads((tmp_path / name).read_text()) for name in ("a.json", "b.json"))
    assert [r["predictions"] for r in a["results"]] == [r["predictions"] for r in b["results"]]
    assert a["settings"]["data"] == b["settings"]["data"]  # the same files, by sha256


def test_each_pruned_row_starts_from_the_checkpoint(tiny_llava, data_dir, tmp_path):
    """Wanda after magnitude in one run answers as Wanda alone: every pruned row prunes a fresh model."""
    argv = ["--task", "textvqa", "--rho", "0.4", "--limit", "4"]
    assert eval_vqa.main(vqa_command(tiny_llava, data_dir, tmp_path / "both.json", *argv,
                                 "--methods", "magnitude", "wanda")) == 0
    assert eval_vqa.main(vqa_command(tiny_llava, data_dir, tmp_path / "alone.json", *argv, "--methods", "wanda")) == 0
    both, alone = (json.loads((tmp_path / f"{name}.json").read_text())["results"] for name in ("both", "alone"))
    assert both[1]["predictions"] == alone[0]["predictions"]


def test_summary_counts_all_questions_and_those_with_an_image():
    questions = {str(i): vqa_tasks.Question("scienceqa", str(i), "", "", b"png" if i < 3 else None, "A", 2)
                 for i in range(5)}
    predictions = [{"id": str(i), "prediction": "", "score": s} for i, s in enumerate([1.0, 0.0, 1.0, 1.0, 0.0])]
    assert eval_vqa.summary(predictions, questions) == {"accuracy": 60.0, "accuracy_image": pytest.approx(200 / 3),
                                                        "answered": 5, "answered_image": 3}


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


def test_the_hub_files_are_fetched_at_the_pinned_commit(monkeypatch, tmp_path):
    import huggingface_hub

    fetched = []

    def download(repo_id, filename, repo_type=None, revision=None):
        fetched.append((repo_id, filename, repo_type, revision))
        return str(tmp_path / filename.replace("/", "_"))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    files = vqa_tasks.task_files("textvqa")
    assert [f.name for f in files] == [f"data_validation-0000{i}-of-00003.parquet" for i in range(3)]
    assert {(repo, kind, revision) for repo, _, kind, revision in fetched} == {
        ("lmms-lab/textvqa", "dataset", "9c0699cd19768ac5ab97568f6b3cbac4c0062884")}
    vqa_tasks.task_files("scienceqa")
    assert fetched[-1] == ("lmms-lab/ScienceQA", "ScienceQA-FULL/test-00000-of-00001.parquet", "dataset",
                           "b6a4c32f378d00d47d5558a167abd5443ca10056")

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(vqa_tasks.UsageError, match="could not download ScienceQA-FULL/test-00000-of-00001.parquet "
                       "from the lmms-lab/ScienceQA dataset at b6a4c32f.*offline, pass --data-dir"):
        vqa_tasks.task_files("scienceqa")


def test_questions_of_both_tasks_with_the_same_id_keep_their_own_prompts(tiny_llava, data_dir, tmp_path):
    """TextVQA question ids 0-7 and ScienceQA row numbers 0-8 overlap: calibrating on ScienceQA must not change
    the TextVQA prompts the dense row answers."""
    write_parquet(data_dir / "textvqa" / "validation-00000-of-00002.parquet", textvqa_rows(8, first_id=0))
    (data_dir / "textvqa" / "validation-00001-of-00002.parquet").unlink()
    argv = ["--task", "textvqa", "--rho", "0.5", "--limit", "3"]
    assert eval_vqa.main(vqa_command(tiny_llava, data_dir, tmp_path / "a.json", *argv, "--methods", "dense")) == 0
    assert eval_vqa.main(vqa_command(tiny_llava, data_dir, tmp_path / "b.json", *argv, "--methods", "dense", "wanda")) == 0
    a, b = (json.loads((tmp_path / name).read_text())["results"][0] for name in ("a.json", "b.json"))
    assert a["predictions"] == b["predictions"]


def test_prompts_read_from_parquet_rows_are_llavas(tmp_path):
    """The whole way from a parquet row: llava_test_CQM-A.json's id 46 and the empty OCR list of TextVQA's
    97b1112b17015396, as LLaVA's scripts put them before the conversation."""
    write_parquet(tmp_path / "scienceqa.parquet", [dict(
        image={"bytes": png(0), "path": None}, question="Which property do these three objects have in common?",
        choices=["shiny", "slippery", "opaque"], answer=2, hint="Select the best answer.")])
    [q] = vqa_tasks.read_questions("scienceqa", [tmp_path / "scienceqa.parquet"])
    assert q.message == ("<image>\nContext: Select the best answer.\nWhich property do these three objects have in "
                         "common?\nA. shiny\nB. slippery\nC. opaque" + SCIENCEQA_INSTRUCTION)
    assert (q.answer, q.n_choices) == ("C", 3)
    write_parquet(tmp_path / "textvqa.parquet", [dict(
        image={"bytes": png(1), "path": None}, question_id=7, question="whats the lowest number yard line that you "
        "can see?", answers=["10"] * 10, ocr_tokens=[])])
    [q] = vqa_tasks.read_questions("textvqa", [tmp_path / "textvqa.parquet"])
    assert q.message == ("<image>\nWhats the lowest number yard line that you can see?\nReference OCR token: \n"
                         "Answer the question using a single word or phrase.")
