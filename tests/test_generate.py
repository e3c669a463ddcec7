"""generate.py, the generation command: dense beside μ-MoE, timed by alternating medians, the decode path named;
its bad input is one line and exit code 2. (The generation itself is tested in test_mumoe.py and, packed against
masked, in test_packed_experts.py; the command on a LLaMA and a LLaVA in test_llama.py and test_llava.py.)"""

import re
import subprocess
import sys

import pytest
import torch

import packed_experts
from kit.checks import assert_one_line_error
from kit.commands import run_generate
from kit.data import REPO

PROMPT = "Hello, my dog is"


def test_command_generates(tiny_with_tokenizer):
    run = subprocess.run([sys.executable, str(REPO / "generate.py"), "--model", str(tiny_with_tokenizer), "--rho",
                          "0.5", "--prompt", PROMPT, "--max-new-tokens", "4"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"--- dense:\n{PROMPT}" in run.stdout and "--- μ-MoE, rho = 0.5" in run.stdout
    assert "(50.00%)" in run.stdout, "hidden 32 and ffn 64 split exactly in half at rho = 0.5"
    assert run.stdout.count(" tokens/s; prompt ") == 2 and "routing on the prompt, once: " in run.stdout
    line = re.search(r"\n  dense (\S+), μ-MoE (\S+) \(routing \S+\): (-?[\d.]+)% saved", run.stdout)
    assert line, "no MAC line"
    dense, routed = (float(v[:-1]) * {"k": 1e3, "M": 1e6, "G": 1e9}[v[-1]] for v in line.groups()[:2])
    assert abs(float(line[3]) - 100 * (1 - routed / dense)) < 1, f"{line[0]!r}: the saving is not 1 - μ-MoE / dense"
    assert "the medians of 3 generations of each, alternating, after a warm-up of each" in run.stdout


@pytest.mark.skipif(packed_experts.kernel_problem() is not None, reason="the packed kernel cannot run here")
def test_command_names_the_packed_path_and_its_bytes(tiny_with_tokenizer, capsys):
    code, out, err = run_generate(["--model", str(tiny_with_tokenizer), "--rho", "0.5", "--prompt", PROMPT,
                                   "--max-new-tokens", "5", "--repeats", "2"], capsys)
    assert code == 0, err
    decode = [line for line in out.splitlines() if line.startswith("decode: ")]
    assert len(decode) == 1 and "packed experts" in decode[0] and "packed in one pass" in decode[0], out
    # rows of 32 or 64 inputs: (16 or 32 kept values · 4 + 4 or 8 mask bytes + 8 / 4 of a block's start) / (4 · d_in),
    # and PAD values after each Linear's: measured, as the prompt's experts hold them
    memory = [line for line in out.splitlines() if line.startswith("memory per routed prompt: ")]
    assert len(memory) == 1 and "56% of the decoder Linears'" in memory[0], out
    assert "a decode step: dense" in out, out
    upfront = [line for line in out.splitlines() if line.startswith("up-front cost")]
    assert len(upfront) == 1 and "dense decode steps; break-even: μ-MoE" in upfront[0], out


def test_command_runs_masked_where_the_kernel_cannot(tiny_with_tokenizer, capsys, monkeypatch):
    """The fallback: the kernel made unavailable, the same tokens come out and the output names the masked path."""
    argv = ["--model", str(tiny_with_tokenizer), "--rho", "0.5", "--prompt", PROMPT, "--max-new-tokens", "6",
            "--repeats", "1"]
    code, masked_out, err = run_generate(argv + ["--decode", "masked"], capsys)
    assert code == 0 and "decode: the masked W ⊙ M, as many bytes as dense (--decode masked)" in masked_out, err
    assert "100% of the decoder Linears'" in masked_out, masked_out  # W ⊙ M: a copy
    monkeypatch.setattr(packed_experts, "compiled_kernel", lambda *flags: (None, "no C compiler found (test)"))
    code, auto_out, err = run_generate(argv, capsys)
    assert code == 0, err
    assert "decode: the masked W ⊙ M, as many bytes as dense (no C compiler found (test))" in auto_out, auto_out
    texts = [out.split("--- μ-MoE")[1].splitlines()[1] for out in (masked_out, auto_out)]
    assert texts[0] == texts[1], f"masked {texts[0]!r} vs the fallback {texts[1]!r}"
    code, _, err = run_generate(argv + ["--decode", "packed"], capsys)
    assert_one_line_error(code, err, "generate.py: error: --decode packed cannot run here: no C compiler found")


def test_command_warms_up_then_alternates(tiny_with_tokenizer, capsys, monkeypatch):
    """Honest timings: one warm-up generation of each, then dense and μ-MoE in turn, the medians printed."""
    import mumoe

    calls, timings = [], iter([0.5, 0.1, 0.3, 0.9, 0.2])  # the dense prompt passes' seconds, in call order
    real = mumoe.generate

    def recorded(model, prompt, n, moe=mumoe.DENSE, **kw):
        calls.append(("dense" if moe.dense else "μ-MoE", n))
        new = real(model, prompt, n, moe, **kw)
        if moe.dense and kw.get("timings") is not None:
            kw["timings"]["prompt"] = next(timings)
        return new

    monkeypatch.setattr(mumoe, "generate", recorded)
    code, out, err = run_generate(["--model", str(tiny_with_tokenizer), "--rho", "0.5", "--prompt", PROMPT,
                                   "--max-new-tokens", "4", "--repeats", "5"], capsys)
    assert code == 0, err
    assert calls == [("dense", 2), ("μ-MoE", 2)] + [("dense", 4), ("μ-MoE", 4)] * 5, calls
    assert "prompt 0.300 s" in out.split("--- dense:")[1], "the dense prompt's median of 0.5, 0.1, 0.3, 0.9, 0.2"


@pytest.mark.parametrize("args, message", [
    (["--rho", "0"], "rho"),
    (["--rho", "1.5"], "rho"),
    (["--prompt", "  "], "prompt is empty"),
    (["--mumoe-prefix", "99"], "--mumoe-prefix 99"),
    (["--prefix", "99"], "--mumoe-prefix 99"),  # the old spelling, a quiet alias
    (["--model", "opt-7b"], "unknown model"),
    (["--model", "/nonexistent/dir/opt"], "unknown model"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--rho", "half"], "invalid active_ratio value: 'half'"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["--max-new-tokens", "63"], "+ 63 new tokens (--max-new-tokens) exceed the model's max_position_embeddings=64"),
    (["--prompt", "Hello " * 70, "--max-new-tokens", "4"], "+ 4 new tokens (--max-new-tokens) exceed"),  # not the
                                                                                               # warm-up's count
    (["--decode", "sparse"], "argument --decode: invalid choice: 'sparse'"),
    (["--repeats", "0"], "expected a positive integer, got 0"),
    (["--decode", "packed", "--dtype", "bfloat16"], "--decode packed cannot run here: the packed decode kernel "
                                                   "serves float32 weights, not bfloat16"),
])
def test_command_bad_input(tiny_with_tokenizer, capsys, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = run_generate(["--model", str(tiny_with_tokenizer), "--rho", "0.5", "--prompt", "Hello"] + args,
                                capsys)
    assert_one_line_error(code, err, message)
