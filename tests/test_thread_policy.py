"""Tests for thread_policy: how torch's OpenMP threads wait, set before torch loads in every command; --threads.

The policy's effect on speed is measured by benchmarks/bench_threads.py (docs/speed.md), never in a test: these
check that it is in force where it must be, that a user's own variables win, and that results files record it.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import thread_policy
from kit.commands import cli_args, run_main

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ["eval_ppl", "eval_tasks", "eval_vqa", "generate"]


def clean_environment(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in thread_policy.USER_VARIABLES}
    return {**env, **extra}


def python(code: str, env: dict) -> str:
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip()


def test_the_policy_is_set_unless_the_user_chose():
    code = ("import os, thread_policy; print(os.environ.get('GOMP_SPINCOUNT'), thread_policy.policy()['by'], "
            "thread_policy.spin_count(thread_policy.BUSY))")
    spin, by, chosen = python(code, clean_environment()).split()
    assert by == "mumoe" and spin == chosen and int(spin) in (thread_policy.SPIN_QUIET, thread_policy.SPIN_SHARED)
    for name, value in [("OMP_WAIT_POLICY", "PASSIVE"), ("OMP_NUM_THREADS", "1"), ("GOMP_SPINCOUNT", "5")]:
        shown = python(code, clean_environment(**{name: value})).split()[:2]
        expected = value if name == "GOMP_SPINCOUNT" else "None"
        assert shown == [expected, "user"], f"with {name}={value} set by the user: {shown}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_sets_it_before_torch_loads(command):
    """libgomp reads its variables once, when torch loads it: a command that imports torch (directly or through
    another module) before thread_policy runs with torch's own spinning threads."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {command}"], cwd=REPO,
                         env=clean_environment(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    imported = [line.split("|")[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")]
    assert "thread_policy" in imported and "torch" in imported, f"{command} imports neither? {imported[:20]}"
    assert imported.index("thread_policy") < imported.index("torch"), f"{command} loads torch before thread_policy"


def test_threads_are_applied_and_recorded(tiny_with_tokenizer, cli_data, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = cli_args(tiny_with_tokenizer, cli_data, "--datasets", "ptb", "--methods", "dense", "--out", str(out),
                    "--threads", "1")
    code, stdout, err = run_main(argv, capsys)
    assert code == 0, err[-2000:]
    assert stdout.startswith("threads: 1 ("), stdout[:200]
    settings = json.loads(out.read_text())["settings"]
    assert settings["threads"] == 1 and settings["thread_policy"] == thread_policy.policy(), settings
    code, _, err = run_main(argv[:-1] + ["0"], capsys)
    assert code == 2 and "--threads: expected a positive integer, got 0" in err, err


def test_a_process_started_by_a_command_chooses_for_itself():
    """The spin count this module set is passed on in the environment to the processes a command starts; they read
    it as mumoe's, not the user's, and look at the cores themselves."""
    code = "import os, thread_policy; print(thread_policy.policy()['by'], os.environ['GOMP_SPINCOUNT'])"
    ours = python(code, clean_environment(GOMP_SPINCOUNT="30000", MUMOE_GOMP_SPINCOUNT="30000")).split()
    assert ours[0] == "mumoe" and int(ours[1]) in (thread_policy.SPIN_QUIET, thread_policy.SPIN_SHARED), ours
    theirs = python(code, clean_environment(GOMP_SPINCOUNT="5", MUMOE_GOMP_SPINCOUNT="30000")).split()
    assert theirs == ["user", "5"], theirs


def test_the_spin_follows_how_busy_the_cores_are():
    """Another process keeping a core busy when a command starts: the short spin; free cores (or no /proc/stat to
    tell): the longer one, which keeps a quiet machine's speed where waking a thread is dear."""
    assert thread_policy.spin_count(None) == thread_policy.SPIN_QUIET
    assert thread_policy.spin_count(0.0) == thread_policy.SPIN_QUIET
    assert thread_policy.spin_count(thread_policy.SHARED_AT - 0.01) == thread_policy.SPIN_QUIET
    assert thread_policy.spin_count(thread_policy.SHARED_AT) == thread_policy.SPIN_SHARED
    assert thread_policy.spin_count(1.0) == thread_policy.SPIN_SHARED
    assert thread_policy.SPIN_SHARED < thread_policy.SPIN_QUIET


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc/stat (Linux)")
def test_busy_processes_are_seen():
    """A process spinning on each of this process's cores keeps them all busy: busy_elsewhere sees nearly all of
    them (the window is longer here than a command's, for the jiffies' 10 ms grain)."""
    cores = len(os.sched_getaffinity(0))
    loop = "import time\nend = time.time() + 30\nwhile time.time() < end: pass"
    spinning = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(cores)]
    try:
        time.sleep(0.3)  # their interpreters started and spinning
        busy = thread_policy.busy_elsewhere(window=0.5)
    finally:
        for spin in spinning:
            spin.kill()
            spin.wait()
    assert busy is not None and cores - 0.5 <= busy <= cores + 0.01, f"{cores} spinning processes, seen as {busy}"
    assert thread_policy.spin_count(busy) == thread_policy.SPIN_SHARED
