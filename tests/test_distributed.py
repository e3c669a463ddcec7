"""Tests for distributed.py and what it changes in the commands: several ranks give one process's numbers.

Ranks are real processes on the CPU with gloo, started as torchrun starts them: RANK, LOCAL_RANK, WORLD_SIZE
and the rendezvous address in the environment, the rendezvous store hosted outside the ranks (here by the
test, under torchrun by its agent), so that each rank's exit code and output can be read on its own.
The references are the same commands in one process: perplexities to 1e-6 relative (the per-window NLLs
are gathered exactly, so most are equal to the bit), pruned weights equal but for summation-order ties,
counted. Also here: results files written atomically, Ctrl-C, and benchmarks/gpu_check.py --dry-run.
Tiny random OPT models and tokenizers come from tests/kit and conftest; nothing is downloaded.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import distributed
import eval_ppl
import pruners
from models import load_model
from kit.checks import n_diff, said_lines
from kit.commands import cli_args, run_main
from kit.ranks import RANK_TIMEOUT, finish, launch
from kit.tiny_models import save_tiny_opt

REPO = Path(__file__).resolve().parent.parent

# A rank: eval_ppl.main, noting in WRITES_LOG each write of the results file by rank, and failing on purpose
# with a UsageError on rank FAIL_RANK ("every": on every rank, all alike) when the perplexity is first evaluated
RANK_SCRIPT = """
import os, sys
import eval_ppl
write_results, perplexity = eval_ppl.write_results, eval_ppl.perplexity
def noting(*args):
    with open(os.environ["WRITES_LOG"], "a") as f:
        f.write(os.environ["RANK"] + "\\n")
    write_results(*args)
def failing(*args, **kw):
    if os.environ.get("FAIL_RANK") == os.environ["RANK"]:
        raise eval_ppl.UsageError("rank " + os.environ["RANK"] + " planted this error")
    if os.environ.get("FAIL_RANK") == "every":
        raise eval_ppl.UsageError("every rank planted this error")
    return perplexity(*args, **kw)
eval_ppl.write_results, eval_ppl.perplexity = noting, failing
sys.exit(eval_ppl.main())
"""


def run_ranks(argv, ranks, tmp_path, script=RANK_SCRIPT, **env):
    store, procs = launch(script, argv, ranks, tmp_path / "writes.log", **env)
    return finish(procs)


# -----------------------------------------------------------------------------
# The shares


@pytest.mark.parametrize("n, ranks", [(3, 2), (2, 3), (128, 8), (7, 7), (0, 2)])
def test_shares_cover_every_window_once(n, ranks, monkeypatch):
    shares = []
    for r in range(ranks):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        monkeypatch.setattr(distributed, "world_size", lambda: ranks)
        shares.append(list(range(n))[distributed.shard(n)])
    assert sum(shares, []) == list(range(n)), f"{n} windows on {ranks} ranks: {shares}"
    assert max(map(len, shares)) - min(map(len, shares)) <= 1, f"unbalanced shares {shares}"


def test_alone_every_collective_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    t = torch.arange(3.0)
    distributed.all_reduce_sum(t)
    distributed.barrier()
    assert t.tolist() == [0.0, 1.0, 2.0] and distributed.total(5) == 5 and distributed.shard(4) == slice(0, 4)
    assert distributed.start("cpu") == torch.device("cpu") and not dist.is_initialized()


# -----------------------------------------------------------------------------
# Bad input under torchrun: one line, exit code 2, on every rank


def test_devices_refused_under_torchrun(monkeypatch):
    """Without GPUs here, torch.cuda is made to say it has one; init_process_group is not called for real."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(eval_ppl.UsageError, match="torchrun started 2 ranks on this node, which has 1 GPUs: "
                                                  "give --nproc-per-node at most 1, or --device cpu"):
        distributed.start(None)
    with pytest.raises(eval_ppl.UsageError, match="each rank takes cuda:LOCAL_RANK; give --device cuda"):
        distributed.start("cuda:0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    assert distributed.start("cuda") == torch.device("cuda", 1)
    assert distributed.start("cpu") == torch.device("cpu"), "--device cpu on a node with GPUs: gloo, on the CPU"


RUN_SETTINGS = ("threads", "thread_policy")  # how this process used the cores (ranks take one thread each)


def without_timings(report: dict) -> dict:
    """The report less what differs between two runs of the same rows: the rows' times, --out and the threads."""
    settings = {k: v for k, v in report["settings"].items() if k not in ("out", *RUN_SETTINGS)}
    return dict(settings=settings, results=[{k: v for k, v in row.items() if k != "seconds"}
                                            for row in report["results"]])


# (ranks, windows = calibration samples): shares of 2 and 1, then more ranks than windows (one rank has none)
WORLDS = [(2, 3), (3, 2)]
# SparseGPT's Hessian is a float32 sum over the ranks' windows, added in another order than one process adds it:
# its perplexities moved by at most 1.75e-6 (relative) on an AMD EPYC with AVX2 (torch's avx2 and default kernels,
# 1 and 2 threads), 1e-6 on a Xeon with AVX-512; the bound leaves ~6x. A rank's statistics lost or counted twice
# move a perplexity by percents. Every other method is equal to the bit: no statistics are summed across ranks.
PPL_RTOL = 1e-5


@pytest.mark.parametrize("ranks, windows", WORLDS, ids=[f"{r}ranks-{w}windows" for r, w in WORLDS])
def test_ranks_give_the_one_process_file(ranks, windows, tiny_with_tokenizer, cli_data, tmp_path, capsys):
    """Every method and both routings, by rank 0 alone; then --resume in one process keeps every row."""
    argv = cli_args(tiny_with_tokenizer, cli_data, "--datasets", "ptb", "c4", "--calib", "ptb", "--rho", "0.4",
                    "--mumoe-routing", "block", "linear", "--max-windows", str(windows), "--nsamples", str(windows))
    one, many = tmp_path / "one.json", tmp_path / "many.json"
    assert run_main(argv + ["--out", str(one)], capsys)[0] == 0
    ranks_out = run_ranks(argv + ["--out", str(many)], ranks, tmp_path)
    for r, (code, out, err) in enumerate(ranks_out):
        assert code == 0, f"rank {r} exit {code}: {err[-3000:]}"
        assert r == 0 or out == err == "", f"rank {r} is not quiet: {out[-500:]} {err[-500:]}"
    rows = len(json.loads(one.read_text())["results"])
    writes = (tmp_path / "writes.log").read_text().split()
    assert writes == ["0"] * rows, f"the results file was written by ranks {writes}, expected rank 0 once per row"

    expected, got = without_timings(json.loads(one.read_text())), without_timings(json.loads(many.read_text()))
    assert got["settings"] == expected["settings"]
    settings_of = lambda row: {k: v for k, v in row.items() if k not in ("ppl", "avg")}
    assert [settings_of(r) for r in got["results"]] == [settings_of(r) for r in expected["results"]]
    for mine, theirs in zip(got["results"], expected["results"]):
        for d, p in theirs["ppl"].items():
            diff = abs(mine["ppl"][d] / p - 1)
            assert diff <= PPL_RTOL, f"{eval_ppl.label(theirs)} on {d}: {mine['ppl'][d]} on {ranks} ranks, {p} alone"
            if theirs["method"] in ("dense", "magnitude", "mumoe"):  # no statistics summed: the same windows' NLLs
                assert mine["ppl"][d] == p, f"{eval_ppl.label(theirs)} on {d}: not exact ({diff:.1e})"

    code, out, _ = run_main(argv + ["--out", str(many), "--resume"], capsys)  # another world size: same numbers
    assert code == 0 and out.count(f"(kept from {many})") == rows


# A rank that prunes the tiny model with each calibrated method on the first n of the saved calibration windows
# and saves the pruned weights: argv model directory, windows file, output directory
PRUNE_SCRIPT = """
import sys, torch
import distributed, pruners
from models import load_model
model_dir, windows, out = sys.argv[1:]
distributed.start("cpu")
calib_ids = torch.load(windows)
for method in ("wanda", "sparsegpt"):
    for n in (len(calib_ids), 1):
        model = load_model(model_dir)
        pruners.prune_model(model, calib_ids[:n], method, 0.5, progress=False)
        torch.save(model.state_dict(), f"{out}/{method}-{n}-rank{distributed.rank()}.pt")
distributed.stop()
"""
# SparseGPT's weights on 2 ranks against 1 process (measured: 9.6e-7 at most on this model); H's float32 sums
# add in another order, and every weight of a row moves with the columns pruned before it
SPARSEGPT_ATOL = 1e-5


def test_ranks_prune_as_one_process(tmp_path):
    """Three windows on two ranks (their sums add in another order than one process's) and one window (the other
    rank has none, and adds zeros: exact). Wanda's masks equal and SparseGPT's weights to SPARSEGPT_ATOL."""
    directory = tmp_path / "model"
    save_tiny_opt(directory, num_hidden_layers=3)
    calib_ids = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(12))
    torch.save(calib_ids, tmp_path / "calib.pt")
    ranks_out = run_ranks([str(directory), str(tmp_path / "calib.pt"), str(tmp_path)], 2, tmp_path, PRUNE_SCRIPT)
    assert all(code == 0 for code, _, _ in ranks_out), [err[-2000:] for _, _, err in ranks_out]
    for method in ("wanda", "sparsegpt"):
        for n in (3, 1):
            model = load_model(directory)
            pruners.prune_model(model, calib_ids[:n], method, 0.5, progress=False)
            alone = model.state_dict()
            rank0, rank1 = (torch.load(tmp_path / f"{method}-{n}-rank{r}.pt") for r in (0, 1))
            for key, W in alone.items():
                assert n_diff(rank0[key], rank1[key]) == 0, f"{method}, {n} windows: the ranks pruned {key} apart"
                flips = n_diff(rank0[key] == 0, W == 0)
                assert flips == 0, f"{method}, {n} windows: {flips} weights of {key} pruned on one side only"
                worst = (rank0[key] - W).abs().max().item()
                if method == "wanda" or n == 1:
                    assert worst == 0, f"{method}, {n} windows, {key}: max |Δ| {worst:.2e}, expected 0"
                assert worst <= SPARSEGPT_ATOL, f"{method}, {n} windows, {key}: max |Δ| {worst:.2e}"


# -----------------------------------------------------------------------------
# A rank that fails ends the run: its one line, its exit code on every rank, no hang


@pytest.mark.parametrize("case", ["rank 1 fails alone", "every rank fails alike", "rank 0 refuses the input"])
def test_a_failing_rank_ends_the_run_in_one_line(case, tiny_with_tokenizer, cli_data, tmp_path):
    argv = cli_args(tiny_with_tokenizer, cli_data, "--datasets", "ptb", "--methods", "dense", "mumoe",
                    "--out", str(tmp_path / "r.json"))
    if case == "rank 1 fails alone":  # while rank 0 waits for it in the perplexity's all-reduce
        ranks_out, line = run_ranks(argv, 2, tmp_path, FAIL_RANK="1"), "eval_ppl.py: error: rank 1 planted this error"
    elif case == "every rank fails alike":  # said once
        ranks_out = run_ranks(argv, 2, tmp_path, FAIL_RANK="every")
        line = "eval_ppl.py: error: every rank planted this error"
    else:  # seen by rank 0 while the others wait for it at the barrier
        ranks_out = run_ranks(argv + ["--mumoe-prefix", "16"], 2, tmp_path)
        line = "eval_ppl.py: error: --mumoe-prefix 16 leaves no token to score in a window of --seqlen 16"
    assert [code for code, _, _ in ranks_out] == [2, 2], [err[-2000:] for _, _, err in ranks_out]
    said = [said_lines(err) for _, _, err in ranks_out]
    assert sorted(map(len, said)) == [0, 1] and line in sum(said, [])[0], said
    assert not (tmp_path / "r.json").exists() or case != "rank 0 refuses the input"


# -----------------------------------------------------------------------------
# Results never lost: atomic writes, Ctrl-C


def test_a_write_cut_short_leaves_the_previous_file(tiny_with_tokenizer, cli_data, tmp_path, capsys, monkeypatch):
    """The write of the second row dies between the temporary file and the rename: the first row's file is left
    whole, and --resume goes on from it."""
    out = tmp_path / "r.json"
    argv = cli_args(tiny_with_tokenizer, cli_data, "--datasets", "ptb", "--methods", "dense", "magnitude",
                    "--out", str(out))
    writes, replace = [], os.replace

    def dying_replace(src, dst):
        writes.append(Path(src).read_text())
        if len(writes) == 2:
            raise KeyboardInterrupt  # as a kill would, after the temporary file is complete
        replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    code, _, err = run_main(argv, capsys)
    assert code == 130 and len(writes) == 2, err
    assert out.read_text() == writes[0], "the results file is not the first row's complete file"
    assert json.loads(writes[1])["results"][1]["method"] == "magnitude", "the cut write was not the second row's"
    assert err.strip().endswith(f"interrupted: 1 rows saved in {out}; to go on: python eval_ppl.py "
                                + " ".join(argv) + " --resume"), err

    monkeypatch.setattr(os, "replace", replace)
    code, stdout, _ = run_main(argv + ["--resume"], capsys)
    assert code == 0 and stdout.count("(kept from") == 1 and "Magnitude, rho 0.5" in stdout
    assert [r["method"] for r in json.loads(out.read_text())["results"]] == ["dense", "magnitude"]


def saved_rows(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())["results"]
    except (OSError, ValueError):
        return []


def test_ctrl_c_saves_the_rows_and_says_how_to_go_on(tiny_with_tokenizer, cli_data, tmp_path):
    """SIGINT to a running command, once its first rows are saved: exit 130, one line, the rows intact."""
    out = tmp_path / "r.json"
    rhos = [f"0.{i}" for i in range(1, 10)]
    argv = cli_args(tiny_with_tokenizer, cli_data, "--datasets", "ptb", "--methods", "dense", "magnitude", "wanda",
                    "--calib", "ptb", "--rho", *rhos, "--out", str(out))
    proc = subprocess.Popen([sys.executable, "eval_ppl.py", *argv], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + RANK_TIMEOUT
    while not saved_rows(out) and proc.poll() is None and time.time() < deadline:  # (--out exists an instant
        time.sleep(0.05)                                                           # before, checked writable)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=RANK_TIMEOUT)
    saved = saved_rows(out)
    assert proc.returncode == 130 and 1 <= len(saved) < 1 + 2 * len(rhos), (proc.returncode, err[-2000:])
    lines = said_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0].startswith(f"interrupted: {len(saved)} rows saved in {out}; to go on: python eval_ppl.py")
    assert lines[0].endswith(" --resume")


# -----------------------------------------------------------------------------
# Memory across ranks: the ranks of a node share the checkpoint's pages


def mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose memory mapping holds the tensor's data (Linux), or None."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split()
        start, end = (int(a, 16) for a in span.split("-"))
        if start <= address < end:
            return rest[4] if len(rest) > 4 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the memory map of Linux's /proc")
def test_loaded_weights_are_the_files_pages(tiny_with_tokenizer):
    """In the checkpoint's dtype on the CPU (--offload), every weight is a view of the memory-mapped file: the
    page cache holds one copy for all the ranks of a node. Another dtype converts: a copy per process."""
    model = load_model(tiny_with_tokenizer)
    shared = {name: mapped_file(p) for name, p in model.named_parameters()}
    file = str(tiny_with_tokenizer / "model.safetensors")
    assert set(shared.values()) == {file}, f"weights not mapped from {file}: {shared}"
    converted = load_model(tiny_with_tokenizer, dtype=torch.bfloat16)
    assert mapped_file(converted.lm_head.weight) != file


# -----------------------------------------------------------------------------
# benchmarks/gpu_check.py must not rot where no GPU is


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=RANK_TIMEOUT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    report = json.loads(out.read_text())
    failed = {name: step["traceback"] for name, step in report["steps"].items() if step["status"] == "failed"}
    assert proc.returncode == 0 and not failed, f"exit {proc.returncode}: {failed or proc.stderr[-2000:]}"
    steps = report["steps"]
    assert steps["tests"]["status"] == "skipped" and report["dry_run"] and report["device"] == "cpu"
    assert steps["forward"]["figures"]["T=32"]["dense"]["ratio_to_dense"] == 1.0
    assert set(steps["generate"]["figures"]) == {"dense", "mumoe block", "mumoe linear"}
    assert len(steps["eval"]["ppl"]) == 5 and all(p > 1 for row in steps["eval"]["ppl"].values() for p in row.values())
    assert any(key.endswith("kthvalue") for key in steps["selection"]["ms"])
    memory = steps["triton"]["memory"]  # the packed experts hold rho · 4 + 1/8 bytes a weight of W's 4, the masked 4
    assert steps["triton"]["steps"] and (memory["path"] != "packed" or 0.5 < memory["experts_over_linears"] < 0.6), memory
