"""ScienceQA and TextVQA as LLaVA-1.5's evaluation poses and scores them: questions, prompts, metrics, data.

This file owns the two tasks of the paper's LLaVA tables, everything about them that needs no model:

    question     one parquet row -> the user message LLaVA-1.5 is asked (`<image>\\n` in front when the row
                 has an image) and what scores its answer
    metric       ScienceQA: the letter parsed from the answer by the rules of LLaVA's `eval_science_qa.py`,
                 right or wrong.  TextVQA: the VQA accuracy of LLaVA's `m4c_evaluator.py` (the EvalAI
                 answer processor, then the mean over the 10 leave-one-out subsets of the human answers)
    data         the parquet files of lmms-lab/ScienceQA (ScienceQA-FULL, test: 4241 questions, 2017 of
                 them with an image) and lmms-lab/textvqa (validation: 5000 questions), downloaded at a
                 pinned commit or read from a local folder; an image that does not decode is named by row

Prompts, with the facts they follow (LLaVA's `llava_test_CQM-A.json` and `llava_textvqa_val_v051_ocr.jsonl`
and lmms-eval's `scienceqa` and `textvqa` tasks, which rebuild them from these same parquet rows):

    ScienceQA  [<image>\\n][Context: {hint}\\n]{question}\\nA. {choice}\\nB. {choice}...
               \\nAnswer with the option's letter from the given choices directly.
               "Context:" only when the hint is not empty; the image line only when the row has an image
    TextVQA    <image>\\n{question.capitalize()}\\nReference OCR token: {tokens joined by ", "}
               \\nAnswer the question using a single word or phrase.
               (the OCR line stays when the list is empty; LLaVA's questions are str.capitalize()d: first
               letter upper, the rest lower, as in all 5000 lines of its file)

The conversation around the message (system text, USER/ASSISTANT) is the model's, not the task's.
"""

import hashlib
import io
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from checkpoint import UsageError, hub_offline, offline_hint

TASKS = ("scienceqa", "textvqa")
IMAGE_PLACEHOLDER = "<image>"  # where LLaVA puts the image's features in the prompt

# -----------------------------------------------------------------------------
# Prompts: the user message of one question

SCIENCEQA_LETTERS = ("A", "B", "C", "D", "E")  # the options of LLaVA's eval_science_qa.py; ScienceQA has 2-5 choices
SCIENCEQA_INSTRUCTION = "Answer with the option's letter from the given choices directly."
TEXTVQA_INSTRUCTION = "Answer the question using a single word or phrase."


def scienceqa_message(question: str, hint: str, choices: list[str], has_image: bool) -> str:
    """LLaVA's ScienceQA message (the CQM-A format with its single-prediction instruction). The question
    with its options is stripped, as model_vqa_science.py strips each line of the question file."""
    context = f"Context: {hint}\n" if hint else ""
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(SCIENCEQA_LETTERS, choices))
    text = f"{context}{question}\n{options}".strip() + f"\n{SCIENCEQA_INSTRUCTION}"
    return f"{IMAGE_PLACEHOLDER}\n{text}" if has_image else text


def textvqa_message(question: str, ocr_tokens: list[str]) -> str:
    """LLaVA's TextVQA message, with the OCR tokens of the image (the '_ocr' question file of LLaVA-1.5)."""
    return (f"{IMAGE_PLACEHOLDER}\n{question.capitalize()}\nReference OCR token: {', '.join(ocr_tokens)}\n"
            f"{TEXTVQA_INSTRUCTION}")


# -----------------------------------------------------------------------------
# ScienceQA: the letter of an answer


def scienceqa_letter(prediction: str, n_choices: int) -> str | None:
    """The option letter LLaVA's `eval_science_qa.py` reads from a prediction, or None (scored wrong).

    In order: the prediction is a bare letter A-E; else it has 3+ characters and starts with a letter A-E
    followed by ". "; else `The answer is ([A-Z]).` (any character after the letter: the reference's dot is
    unescaped) matches exactly once. The letter counts only if it names one of the question's n_choices
    options. The prediction is taken as generated and stripped, as LLaVA's script strips its outputs.
    """
    if prediction in SCIENCEQA_LETTERS:
        letter = prediction
    elif len(prediction) >= 3 and prediction[0] in SCIENCEQA_LETTERS and prediction[1:3] == ". ":
        letter = prediction[0]
    else:
        found = re.findall(r"The answer is ([A-Z]).", prediction)
        letter = found[0] if len(found) == 1 else None
    return letter if letter in SCIENCEQA_LETTERS[:n_choices] else None


# -----------------------------------------------------------------------------
# TextVQA: the EvalAI answer processor and the VQA accuracy

# Number words the processor writes as digits
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# Punctuation removed where a space is beside it somewhere in the answer, else turned into a space
PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
# A period not followed by a digit is removed ("3.5" keeps its point). The reference's pattern also starts
# with "(?!<=\d)", a lookahead (not the lookbehind it resembles) that never fails before a period; and it
# passes re.UNICODE (= 32) where re.sub takes `count`: only the first 32 such periods go.
PERIOD = re.compile(r"\.(?!\d)")
PERIODS_REMOVED = 32
# Words spelled without their apostrophe, and the spelling the processor gives them. (The reference's table
# also has keys with capitals, never met in the lowercased answer, and two keys mapped to themselves.)
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}


def normalize_answer(answer: str) -> str:
    """The EvalAI answer processor: an answer as the VQA metric compares it.

        1. lowercase; drop "," and "?"; "'s" -> " 's"; whitespace (newlines, tabs) to spaces, trimmed
        2. each punctuation mark: removed if it stands beside a space anywhere in the answer, else a space
           ("x-ray" -> "x ray", but "x-ray - yes" -> "xray yes"); a period not before a digit: removed
        3. word by word: number words to digits ("two" -> "2"), articles dropped, contractions spelled
           with their apostrophe ("dont" -> "don't")
    """
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # (the reference also removes every mark when a comma stands between digits; step 1 dropped the commas)
    marked = text  # each mark is tested on the answer as it was before any mark went
    for mark in PUNCTUATION:
        beside_space = f"{mark} " in text or f" {mark}" in text
        marked = marked.replace(mark, "" if beside_space else " ")
    text = PERIOD.sub("", marked, count=PERIODS_REMOVED)
    words = [NUMBERS.get(word, word) for word in text.split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy: the mean, over the subsets that leave out one of the human answers, of
    min(1, (answers in the subset equal to the prediction) / 3), every answer normalized first.

    With 10 answers of which k equal the prediction: leaving out one of the k leaves k - 1 matches, leaving
    out one of the others leaves k; so 1 match scores 0.3, 2 score 0.6, 3 score 0.9, 4 or more 1.0.
    """
    predicted = normalize_answer(prediction)
    matches = [normalize_answer(a) == predicted for a in answers]
    k = sum(matches)
    return sum(min(1.0, (k - match) / 3) for match in matches) / len(answers)


# -----------------------------------------------------------------------------
# Questions: one per parquet row, with what scores its answer


@dataclass(frozen=True)
class Question:
    task: str
    id: str                  # TextVQA: its question_id; ScienceQA (no id column): its row number in the split
    where: str               # the file and row it came from, to name it in a message
    message: str             # the user message, "<image>\n" in front when there is an image
    image: bytes | None      # the encoded image (PNG, JPEG, ...) as the parquet file holds it; None: text only
    answer: str | list[str]  # ScienceQA: the right letter; TextVQA: the human answers
    n_choices: int = 0       # ScienceQA: how many options the question has


def score(question: Question, prediction: str) -> float:
    """1.0 for a right ScienceQA letter, else 0.0; TextVQA: the VQA accuracy, in [0, 1]."""
    if question.task == "scienceqa":
        return float(scienceqa_letter(prediction, question.n_choices) == question.answer)
    return vqa_accuracy(prediction, question.answer)


def open_image(question: Question):
    """The question's image as a Pillow image, decoded in full (so a broken file fails here, not later)."""
    from PIL import Image

    image = Image.open(io.BytesIO(question.image))
    image.load()
    return image


def check_images(questions: list[Question], skip_bad_rows: bool) -> tuple[list[Question], list[dict]]:
    """Decode every image once, before any model work. An image that does not decode is a UsageError naming
    its row, or, with skip_bad_rows, the question is left out and reported: (kept questions, skipped)."""
    from PIL import Image

    kept, skipped = [], []
    for q in questions:
        if q.image is not None:
            try:
                open_image(q).close()
            # what Pillow raises for bytes it cannot read (UnidentifiedImageError is an OSError)
            except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
                reason = f"{type(e).__name__}: {e}"
                if not skip_bad_rows:
                    raise UsageError(f"{q.task} question {q.id} ({q.where}): its image does not decode ({reason}); "
                                     "pass --skip-bad-rows to leave such questions out") from None
                skipped.append({"id": q.id, "where": q.where, "reason": reason})
                continue
        kept.append(q)
    return kept, skipped


# -----------------------------------------------------------------------------
# Reading the parquet files

# The columns each task reads (the files have more: ScienceQA's lecture and solution, TextVQA's image_id, ...)
COLUMNS = {"scienceqa": ("image", "question", "choices", "answer", "hint"),
           "textvqa": ("image", "question_id", "question", "answers", "ocr_tokens")}


def read_questions(task: str, files: list[Path]) -> list[Question]:
    """The questions of a task's parquet files, in file order then row order; a file that is not parquet or
    lacks a column is named with what it lacks."""
    import pyarrow
    import pyarrow.parquet

    questions = []
    for path in files:
        try:
            names = pyarrow.parquet.ParquetFile(path).schema_arrow.names
            missing = [c for c in COLUMNS[task] if c not in names]
            if missing:
                raise UsageError(f"{path} is not a {task} file: it has no column {', '.join(missing)} (expected "
                                 f"{', '.join(COLUMNS[task])})")
            rows = pyarrow.parquet.read_table(path, columns=list(COLUMNS[task])).to_pylist()
        except (pyarrow.ArrowException, OSError) as e:
            raise UsageError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from None
        for i, row in enumerate(rows):
            questions.append(question_from_row(task, row, number=len(questions), where=f"{path.name}, row {i}"))
    return questions


def question_from_row(task: str, row: dict, number: int, where: str) -> Question:
    image = row["image"]
    if isinstance(image, dict):  # the datasets library's Image feature: {"bytes": ..., "path": ...}
        image = image.get("bytes")
    if task == "scienceqa":
        choices = row["choices"]
        if not 2 <= len(choices) <= len(SCIENCEQA_LETTERS) or not 0 <= row["answer"] < len(choices):
            raise UsageError(f"scienceqa {where}: {len(choices)} choices and answer {row['answer']}; ScienceQA "
                             f"questions have 2 to {len(SCIENCEQA_LETTERS)} choices and one of them is the answer")
        message = scienceqa_message(row["question"], row["hint"], choices, image is not None)
        return Question(task, str(number), where, message, image, SCIENCEQA_LETTERS[row["answer"]], len(choices))
    if image is None:
        raise UsageError(f"textvqa {where}: the row has no image (every TextVQA question is about one)")
    message = textvqa_message(row["question"], row["ocr_tokens"])
    return Question(task, str(row["question_id"]), where, message, image, list(row["answers"]))


# -----------------------------------------------------------------------------
# The files: from the hub at a pinned commit, or from a local folder


@dataclass(frozen=True)
class HubFiles:
    repo: str
    revision: str
    files: tuple[str, ...]
    questions: int  # how many questions the files hold


# The split the paper's table evaluates, at the commit that was the head of each repo when this was written
# (lmms-lab/ScienceQA "Update README.md"; lmms-lab/textvqa "Update README.md", after the data upload). No
# sha256 of these files could be verified from here (no public record of them was found), so none is pinned:
# a commit's files cannot change, and every run writes the sha256 of the files it read into its JSON.
# The ScienceQA file name is the one the hub lists; the three TextVQA names follow the repo's data/validation-*
# pattern and its 3-shard conversion, not a listing: if one is wrong the download says so.
HUB = {
    "scienceqa": HubFiles("lmms-lab/ScienceQA", "b6a4c32f378d00d47d5558a167abd5443ca10056",
                          ("ScienceQA-FULL/test-00000-of-00001.parquet",), 4241),
    "textvqa": HubFiles("lmms-lab/textvqa", "9c0699cd19768ac5ab97568f6b3cbac4c0062884",
                        tuple(f"data/validation-{i:05d}-of-00003.parquet" for i in range(3)), 5000),
}


def task_files(task: str, data_dir=None) -> list[Path]:
    """The parquet files of a task: `{data_dir}/{task}/*.parquet` in name order, or the hub's (downloaded once
    into the Hugging Face cache)."""
    if data_dir is not None:
        folder = Path(data_dir) / task
        files = sorted(folder.glob("*.parquet"))
        if not files:
            raise UsageError(f"no {task} data in --data-dir {data_dir}: {folder} holds no .parquet file")
        return files
    return [hub_file(HUB[task], filename) for filename in HUB[task].files]


def hub_file(hub: HubFiles, filename: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    offline = hub_offline()
    try:
        return Path(hf_hub_download(hub.repo, filename, repo_type="dataset", revision=hub.revision,
                                    local_files_only=bool(offline)))
    except (OSError, EntryNotFoundError, RevisionNotFoundError) as e:  # no network, no such file or commit
        if offline:
            raise offline_hint(f"{filename} of the {hub.repo} dataset", offline, "pass --data-dir") from None
        raise UsageError(f"could not download {filename} from the {hub.repo} dataset at {hub.revision} "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "offline, pass --data-dir") from None


def save_files(files: list[Path], data_dir, task: str) -> list[Path]:
    """Copy a task's parquet files into the `--data-dir` layout, `{data_dir}/{task}/`; return the copies."""
    folder = Path(data_dir) / task
    folder.mkdir(parents=True, exist_ok=True)
    copies = [folder / path.name for path in files]
    for path, copy in zip(files, copies):
        if path.resolve() != copy.resolve():
            shutil.copyfile(path, copy)
    return copies


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
