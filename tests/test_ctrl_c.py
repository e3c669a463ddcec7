"""Ctrl-C at any moment of a command: start-up, the imports, loading, data, calibration, evaluation, the results
write, the table, the interpreter's exit. Each press ends the run in one line with exit 130 (or 0, if the work had
finished), no traceback, a results file that parses, and no process left behind.

The moments are a list of delays spread over a run whose length is measured first, so that every phase is hit
whatever the machine's load; SIGINT goes to the run's whole process group, as a terminal's Ctrl-C does.
"""

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kit.checks import said_lines
from kit.commands import cli_args
from kit.data import REPO, sentence, write_multiple_choice_task, write_vqa_data
from kit.ranks import finish, launch
from kit.tiny_models import save_vqa_llava

EXIT_TIMEOUT = 60  # seconds from the press to the process's end before the test calls it a hang (it takes < 1 s)
FIRST_SECOND = (0.3, 0.6, 0.9)  # during `import torch`: the moments a traceback used to come from
SPREAD = (0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 0.97, 1.02, 1.1)  # fractions of a measured run, the exit included
SAVING = (0.1, 0.3, 0.5, 0.7)  # fractions of the time from a run's first saved row to its end
AT_ONCE = 4  # runs side by side (each mostly waits on its imports)


def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,  # its own group, as a terminal's job
                            env=dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"))


def press_ctrl_c_at(argv_for, delays: list[float]) -> list[tuple[float, int, str, Path]]:
    """Run the command once per delay (argv_for(i) -> argv, its own --out), SIGINT to its group after the delay:
    [(delay, exit code, stderr, out)]. A run that does not end within EXIT_TIMEOUT of the press is a hang."""
    results = []
    for first in range(0, len(delays), AT_ONCE):
        batch = [(delays[i], *argv_for(i)) for i in range(first, min(first + AT_ONCE, len(delays)))]
        procs = [(delay, start(argv), out, time.monotonic()) for delay, argv, out in batch]
        for delay, proc, out, began in sorted(procs, key=lambda p: p[0]):
            time.sleep(max(0.0, began + delay - time.monotonic()))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        for delay, proc, out, began in procs:
            try:
                _, err = proc.communicate(timeout=EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"{argv_for(0)[0]}: Ctrl-C after {delay:.2f} s: still running {EXIT_TIMEOUT} s later")
            results.append((delay, proc.returncode, err, out))
    return results


def assert_each_press_ends_cleanly(results, command: str, rows: int) -> None:
    """Each run ended cleanly; one interrupted inside its work, with some of its `rows` saved, says how to go on."""
    codes = {}
    for delay, code, err, out in results:
        moment = f"{command}, Ctrl-C after {delay:.2f} s"
        assert "Traceback" not in err, f"{moment}: a traceback\n{err[-3000:]}"
        assert code in (0, 130), f"{moment}: exit {code}\n{err[-3000:]}"
        if code == 130:
            said = [line for line in said_lines(err) if "interrupted" in line]
            assert len(said) == 1, f"{moment}: not one line about the interruption\n{err[-3000:]}"
        saved = json.loads(out.read_text())["results"] if out.exists() else []  # whole or none, never half a file
        if code == 130 and 0 < len(saved) < rows:
            assert "--resume" in said[0], f"{moment}: {len(saved)} of {rows} rows saved, and no --resume in {said}"
        codes[delay] = code
    assert 130 in codes.values(), f"{command}: no press interrupted the work: {codes}"
    for delay, code, err, out in results:
        assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and str(out) in read_cmdline(pid)], \
            f"{command}: a process of the run interrupted after {delay:.2f} s is still alive"


def read_cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # gone meanwhile
        return ""


def moments(argv_for) -> list[float]:
    """FIRST_SECOND, SPREAD of the length of an uninterrupted run, and SAVING moments between its first saved row
    and its end, when some rows are saved and some are not. The runs measured (which must succeed) go AT_ONCE side
    by side, as the interrupted ones will: medians of their first row and their length."""
    runs = [argv_for(-1 - i) for i in range(AT_ONCE)]
    began = time.monotonic()
    procs = [start(argv) for argv, _ in runs]
    first_rows, lengths = [None] * AT_ONCE, [None] * AT_ONCE
    while None in lengths:  # the output pipes stay small: a few lines of progress
        for i, (proc, (_, out)) in enumerate(zip(procs, runs)):
            if first_rows[i] is None and saved_rows(out):
                first_rows[i] = time.monotonic() - began
            if lengths[i] is None and proc.poll() is not None:
                lengths[i] = time.monotonic() - began
        time.sleep(0.02)
    for proc, (argv, _) in zip(procs, runs):
        _, err = proc.communicate()
        assert proc.returncode == 0, err[-3000:]
    assert None not in first_rows, f"{runs[0][0][0]} saved no row while it ran"
    first_row, length = statistics.median(first_rows), statistics.median(lengths)
    return (list(FIRST_SECOND) + [fraction * length for fraction in SPREAD]
            + [first_row + fraction * (length - first_row) for fraction in SAVING])


def saved_rows(path: Path) -> list:
    try:
        return json.loads(path.read_text())["results"]
    except (OSError, ValueError, KeyError):  # not there yet (the rename is atomic: never half a file)
        return []


needs_proc = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds processes left behind in /proc")


@needs_proc
def test_eval_ppl(tiny_with_tokenizer, cli_data, tmp_path):
    def argv_for(i):
        out = tmp_path / f"ppl{i}.json"
        return ["eval_ppl.py", *cli_args(tiny_with_tokenizer, cli_data, "--datasets", "ptb", "--methods", "dense",
                                         "wanda", "mumoe", "--calib", "ptb", "--rho", "0.5", "0.3", "--out", str(out))], out
    assert_each_press_ends_cleanly(press_ctrl_c_at(argv_for, moments(argv_for)), "eval_ppl.py", rows=5)


@needs_proc
def test_eval_tasks(tiny_with_tokenizer, tmp_path_factory, tmp_path):
    pytest.importorskip("lm_eval")
    tasks, rows = tmp_path_factory.mktemp("tasks"), tmp_path_factory.mktemp("rows")
    write_multiple_choice_task(tasks, docs=4)
    rng = random.Random(6)
    (rows / "ptb.train.jsonl").write_text("".join(json.dumps({"text": sentence(rng, 12)}) + "\n" for _ in range(20)))

    def argv_for(i):
        out = tmp_path / f"tasks{i}.json"
        return ["eval_tasks.py", "--model", str(tiny_with_tokenizer), "--include-path", str(tasks), "--tasks",
                "tiny_mc", "--methods", "dense", "wanda", "mumoe", "--rho", "0.5", "--calib", "ptb", "--data-dir",
                str(rows), "--nsamples", "2", "--seqlen", "32", "--out", str(out)], out
    assert_each_press_ends_cleanly(press_ctrl_c_at(argv_for, moments(argv_for)), "eval_tasks.py", rows=3)


@needs_proc
def test_eval_vqa(tmp_path_factory, tmp_path):
    model, data = save_vqa_llava(tmp_path_factory.mktemp("llava")), write_vqa_data(tmp_path_factory.mktemp("data"))

    def argv_for(i):
        out = tmp_path / f"vqa{i}.json"
        return ["eval_vqa.py", "--model", str(model), "--data-dir", str(data), "--task", "scienceqa", "--methods",
                "dense", "wanda", "mumoe", "--rho", "0.5", "--nsamples", "2", "--max-new-tokens", "4",
                "--device", "cpu", "--out", str(out)], out
    assert_each_press_ends_cleanly(press_ctrl_c_at(argv_for, moments(argv_for)), "eval_vqa.py", rows=3)


# eval_ppl.py run as `python eval_ppl.py ARGS` runs it (its Ctrl-C handling is the script's, under __main__)
AS_A_SCRIPT = "import runpy, sys; sys.argv[0] = 'eval_ppl.py'; runpy.run_path('eval_ppl.py', run_name='__main__')"


@needs_proc
def test_eval_ppl_on_two_ranks(tiny_with_tokenizer, cli_data, tmp_path):
    """As under torchrun: two ranks, each pressed at once. Each rank ends (130, or 0 once its
    work is done), no traceback, and the ranks say one line between them (torchrun's own agent, which prints a
    traceback of its own on SIGINT, is torch's and not run here)."""
    results = []
    for i, delay in enumerate(FIRST_SECOND + (2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 15.0)):
        out = tmp_path / f"ppl{i}.json"
        argv = cli_args(tiny_with_tokenizer, cli_data, "--datasets", "ptb", "--methods", "dense", "wanda", "mumoe",
                        "--calib", "ptb", "--rho", "0.5", "0.3", "--out", str(out))
        _store, procs = launch(AS_A_SCRIPT, argv, 2, tmp_path / f"writes{i}.log")  # the store: this run's rendezvous
        time.sleep(delay)
        for proc in procs:  # a terminal's Ctrl-C reaches every process of the job at once
            proc.send_signal(signal.SIGINT)
        ended = [(code, err) for code, _, err in finish(procs)]
        moment = f"eval_ppl.py on 2 ranks, Ctrl-C after {delay:.2f} s"
        for rank, (code, err) in enumerate(ended):
            assert "Traceback" not in err, f"{moment}: a traceback on rank {rank}\n{err[-3000:]}"
            assert code in (0, 130), f"{moment}: rank {rank} exit {code}\n{err[-3000:]}"
        said = [line for _, err in ended for line in said_lines(err) if "interrupted" in line]
        assert len(said) == (1 if 130 in [code for code, _ in ended] else 0), f"{moment}: {said}"
        saved_rows(out)  # whole or none
        results.append(ended[0][0])
    assert 130 in results and results[0] == 130, results


# The handler itself, in this process: the two ways a press used to be lost or misread

def test_a_press_python_drops_in_a_finalizer_comes_again(capfd):
    """A press inside a weakref callback (an import's module lock has one) is one Python drops: it printed
    "Exception ignored" and a traceback, and the run went on as if never pressed (CI saw it in eval_vqa)."""
    import weakref

    import ctrl_c

    class Dropped:
        pass

    def press(_):
        signal.raise_signal(signal.SIGINT)

    with ctrl_c.raises():
        with pytest.raises(KeyboardInterrupt):
            lost = Dropped()
            ref = weakref.ref(lost, press)  # noqa: F841  its callback runs at the `del`
            del lost
            began = time.monotonic()
            while time.monotonic() - began < 5:  # the press comes again within ctrl_c.AGAIN_AFTER
                pass
        assert ctrl_c.PRESSED.is_set()
    assert "Traceback" not in capfd.readouterr().err


def test_an_error_after_a_press_ends_as_the_press(capsys, tmp_path):
    """A native call may turn the interrupt into an error of its own (safetensors reading a tensor): after a
    press, the command ends in Ctrl-C's line, not in that error's traceback; with no press, the error is raised."""
    import argparse

    from command_line import main_of

    def parse_args(argv):
        return argparse.Namespace(resume=False, out=tmp_path / "out.json")

    def run_pressed(args):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            raise RuntimeError("a native call's own error") from None

    def run_unpressed(args):
        raise RuntimeError("a real error")

    assert main_of("cmd.py", ["--x"], parse_args, run_pressed, lambda args: "nothing saved") == 130
    said = [line for line in said_lines(capsys.readouterr().err) if "interrupted" in line]
    assert said and said[0].startswith("interrupted: nothing saved; to go on: ") and "--x --resume" in said[0]
    with pytest.raises(RuntimeError, match="a real error"):
        main_of("cmd.py", [], parse_args, run_unpressed, lambda args: "")
