"""vqa_tasks: ScienceQA's letter rule, the EvalAI answer processor and the VQA accuracy, the prompts, and reading
the tasks' parquet files. Each test can fail.

References: the rules of LLaVA's `eval_science_qa.py` and of the EvalAI answer processor with the VQA
accuracy (LLaVA's `m4c_evaluator.py`), written out case by case below; for the prompts, lines of LLaVA's own
question files (`llava_test_CQM-A.json`, `llava_textvqa_val_v051_ocr.jsonl`) quoted character for character.
The data are tiny parquet files of each task made here with random images: nothing is downloaded.
"""

import random

import pytest

import vqa_tasks
from kit.data import png, scienceqa_rows, textvqa_rows, write_parquet
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


def test_the_hub_files_are_fetched_at_the_pinned_commit(monkeypatch, tmp_path, hub_online):
    import huggingface_hub

    fetched = []

    def download(repo_id, filename, repo_type=None, revision=None, local_files_only=False):
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
