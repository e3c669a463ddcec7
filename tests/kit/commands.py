"""The commands run in this process, as a user would run them: eval_ppl's and generate's main with (exit code,
stdout, stderr) back, and the short argument lists of a quick run on the tiny models.
"""

import json
from pathlib import Path


def cli_args(model: Path, data: Path, *extra) -> list[str]:
    return ["--model", str(model), "--data-dir", str(data), "--seqlen", "16", "--nsamples", "2",
            "--max-windows", "3", "--device", "cpu", *extra]


def run_main(argv, capsys) -> tuple[int, str, str]:
    """Run eval_ppl.main in this process: (exit code, stdout, stderr)."""
    import eval_ppl  # a command: imported only by the tests that run it

    return run_command(eval_ppl.main, argv, capsys)


def run_generate(argv, capsys) -> tuple[int, str, str]:
    """Run generate.main in this process: (exit code, stdout, stderr)."""
    import generate  # a command: imported only by the tests that run it

    return run_command(generate.main, argv, capsys)


def run_command(main, argv, capsys) -> tuple[int, str, str]:
    """A command's main in this process: (exit code, stdout, stderr); argparse's errors exit through SystemExit."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def report_of(argv: list[str], capsys) -> dict:
    """Run eval_ppl.main in this process; it must succeed. Returns its JSON report (argv names --out)."""
    code, _, err = run_main(argv, capsys)
    assert code == 0, f"exit {code}: {err[-2000:]}"
    return json.loads(Path(argv[argv.index("--out") + 1]).read_text())


def vqa_command(model_dir, data_dir, out, *extra) -> list[str]:
    """eval_vqa.py's arguments for a quick run on save_vqa_llava's model and write_vqa_data's questions: two ratios, every method, both μ-MoE routings, 4 calibration prompts, short answers."""
    return [str(a) for a in ["--model", model_dir, "--data-dir", data_dir, "--out", out, "--rho", "0.6", "0.4",
                             "--mumoe-routing", "block", "linear", "--nsamples", "4", "--max-new-tokens", "6",
                             "--device", "cpu", *extra]]
