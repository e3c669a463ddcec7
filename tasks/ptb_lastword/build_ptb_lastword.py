"""Build two small local lm-eval tasks from the PTB test sentences: LAMBADA-style last-word prediction.

    ptb_lastword     each sentence's last word from the rest of it: greedy accuracy (is the word the argmax,
                     token by token) and perplexity of the word, as lm-eval's lambada_openai scores LAMBADA
    ptb_lastword_mc  the same sentences, the last word among four: it and the last words of three other
                     sentences, drawn with a fixed seed (accuracy; chance is 25%)

Sentences are kept when they have at least MIN_WORDS words and end in a word (letters only, not PTB's `N` for
numbers or `<unk>`), the first SENTENCES of them in file order. The rows are read from a `ptb.test.jsonl` of
`{"text": sentence}` lines: ../shared/data/rows has one, and `python eval_ppl.py --model ... --datasets ptb
--save-data DIR` writes one online. Run from the repository root; it writes the JSON lines beside this file,
where the task YAMLs read them (`python eval_tasks.py --include-path tasks/ptb_lastword --tasks ptb_lastword`).

    python tasks/ptb_lastword/build_ptb_lastword.py [--rows ../shared/data/rows/ptb.test.jsonl]

Imports: the standard library only.
"""

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIN_WORDS = 8  # a context of at least seven words, so that there is something to predict the word from
SENTENCES = 500  # enough for a percent-level accuracy (standard error ~2%), small enough for a CPU in minutes
CHOICES = 4
SEED = 0


def is_word(word: str) -> bool:
    return word.isalpha() and word != "N"


def sentences(rows: list[str]) -> list[tuple[str, str]]:
    """(context, last word) of the first SENTENCES rows that qualify."""
    kept = []
    for row in rows:
        words = row.split()
        if len(words) >= MIN_WORDS and is_word(words[-1]):
            kept.append((" ".join(words[:-1]), words[-1]))
    return kept[:SENTENCES]


def multiple_choice(pairs: list[tuple[str, str]], seed: int = SEED) -> list[dict]:
    """Each sentence with its word among CHOICES - 1 distinct others that end other kept sentences."""
    rng = random.Random(seed)
    pool = sorted({word for _, word in pairs})
    docs = []
    for context, word in pairs:
        others = rng.sample([w for w in pool if w != word], CHOICES - 1)
        label = rng.randrange(CHOICES)
        docs.append({"context": context, "choices": others[:label] + [word] + others[label:], "label": label})
    return docs


def write_jsonl(path: Path, docs: list[dict]) -> None:
    path.write_text("".join(json.dumps(doc) + "\n" for doc in docs), encoding="utf-8")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=Path, default=Path("../shared/data/rows/ptb.test.jsonl"),
                        help="PTB test rows, one {\"text\": sentence} per line")
    args = parser.parse_args(argv)
    rows = [json.loads(line)["text"] for line in args.rows.read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = sentences(rows)
    write_jsonl(HERE / "ptb_lastword.test.jsonl", [{"context": c, "word": w} for c, w in pairs])
    write_jsonl(HERE / "ptb_lastword_mc.test.jsonl", multiple_choice(pairs))
    print(f"{len(pairs)} sentences of {len(rows)} rows -> {HERE}/ptb_lastword{{,_mc}}.test.jsonl")


if __name__ == "__main__":
    main()
