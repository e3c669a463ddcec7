"""Tests for thread_policy: how torch's OpenMP threads wait, set before torch loads in every command; --threads.

The policy's effect on speed is measured by benchmarks/bench_threads.py (docs/speed.md), never in a test: these
check that it is in force where it must be, that a user's own variables win, and that results files record it.
"""

import json
import os
import subprocess
import sys
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
    code = "import os, thread_policy; print(os.environ.get('GOMP_SPINCOUNT'), thread_policy.policy()['by'])"
    assert python(code, clean_environment()) == f"{thread_policy.SPIN_COUNT} mumoe"
    for name, value in [("OMP_WAIT_POLICY", "PASSIVE"), ("OMP_NUM_THREADS", "1"), ("GOMP_SPINCOUNT", "5")]:
        shown = python(code, clean_environment(**{name: value}))
        expected = value if name == "GOMP_SPINCOUNT" else "None"
        assert shown == f"{expected} user", f"with {name}={value} set by the user: {shown}"


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
