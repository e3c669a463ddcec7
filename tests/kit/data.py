"""Data the tests and benchmarks make on the spot: random token ids, sentences of common words written as the
--data-dir rows, a local multiple-choice task for lm-eval, and ScienceQA / TextVQA as tiny parquet files with random
images in the hub's layout; where the real data are (../shared/data), when it is there.
"""

import io
import json
import random
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parents[2]  # tests/kit/data.py -> the repository


SHARED_DATA = REPO.parent / "shared" / "data"


TOKENIZER_DIR = SHARED_DATA / "opt-125m-tokenizer"


WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + " ."


def write_rows(directory: Path, dataset: str, split: str, rows: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{dataset}.{split}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))


def random_ids(B: int, T: int, vocab: int, seed: int = 1, low: int = 0) -> torch.Tensor:
    """(B, T) token ids drawn uniformly from [low, vocab), the same for the same seed."""
    return torch.randint(low, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def write_multiple_choice_task(directory, name="tiny_mc", docs=12, seed=5):
    """A three-way multiple-choice task YAML over a local JSON-lines file."""
    rng = random.Random(seed)
    rows = [{"context": sentence(rng, 6), "choices": rng.sample(WORDS, 3), "label": rng.randrange(3)}
            for _ in range(docs)]
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return rows


def png(seed: int, size=(24, 16), mode="RGB") -> bytes:
    from PIL import Image

    rng = random.Random(seed)
    image = Image.new(mode, size)
    image.putdata([tuple(rng.randrange(256) for _ in mode) for _ in range(size[0] * size[1])])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


VQA_WORDS = "red blue cat dog stop sign yes no two three the shop open".split()


def scienceqa_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        choices = [rng.choice(VQA_WORDS) for _ in range(rng.randint(2, 5))]
        rows.append(dict(image={"bytes": png(seed * 1000 + i), "path": None} if i % 3 else None,
                         question=f"Which one is {rng.choice(VQA_WORDS)}?", choices=choices,
                         answer=rng.randrange(len(choices)), hint=rng.choice(["", "Look closely."]),
                         lecture="", solution=""))
    return rows


def textvqa_rows(n: int, seed: int = 0, first_id: int = 100) -> list[dict]:
    rng = random.Random(seed)
    return [dict(image={"bytes": png(seed * 1000 + i, size=(20 + i, 30)), "path": None}, image_id=f"img{i}",
                 question_id=first_id + i, question=f"what does the {rng.choice(VQA_WORDS)} say?",
                 answers=[rng.choice(VQA_WORDS[:4]) for _ in range(10)],
                 ocr_tokens=[rng.choice(VQA_WORDS) for _ in range(rng.randint(0, 3))]) for i in range(n)]


def write_parquet(path: Path, rows: list[dict], drop=()) -> Path:
    import pyarrow
    import pyarrow.parquet

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{k: v for k, v in row.items() if k not in drop} for row in rows]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


def write_vqa_data(directory: Path) -> Path:
    """Both tasks in the --data-dir layout: ScienceQA in one file, TextVQA in two, as the hub shards them."""
    write_parquet(directory / "scienceqa" / "test-00000-of-00001.parquet", scienceqa_rows(9))
    rows = textvqa_rows(8)
    write_parquet(directory / "textvqa" / "validation-00000-of-00002.parquet", rows[:5])
    write_parquet(directory / "textvqa" / "validation-00001-of-00002.parquet", rows[5:])
    return directory
