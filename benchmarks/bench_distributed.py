"""The overhead of torchrun's collectives: 2 ranks x 1 thread against 1 process x 2 threads, on the same cores.

On one CPU the two set-ups have the same compute, so their time ratio shows what the distributed path
adds: starting, the shares, the all-reduce of the windows' NLLs and of every Linear's statistics (target:
<= 1.05). Two tasks on an OPT-125M-shaped model with random weights (bench_mumoe's), saved once as a
checkpoint that each process loads (memory-mapped: the ranks share its pages):

    perplexity   eval_ppl.perplexity, dense, on --windows windows of --seqlen tokens
    calibration  pruners.prune_model with Wanda on --windows calibration windows (statistics all-reduced per
                 Linear; the masks themselves are computed by every rank, with one thread where the single
                 process has two: that part does not scale, and is in the figure)

1 process x 1 thread is run too: half its time is what two ranks would take with free collectives and
nothing replicated, and it shows how well the single process uses its second thread on this machine.

Each set-up is a fresh launch (`python` or `torchrun --nproc-per-node 2` of this file with --worker) that
times each task once after a warm-up; the launches alternate, --repeats each, and the medians and spreads
(min-max) are printed with their ratio.

    python benchmarks/bench_distributed.py [--windows 8] [--seqlen 512] [--repeats 3]

With --commands it races the two other commands instead, whole, on 2 ranks x 1 thread against 1 process x 1 thread
(on the same questions, the same requests; target: <= 0.6 of the one process's time, and <= 5% of it inside the
collectives, rank 0's waits for the other rank included):

    eval_vqa     a small random LLaVA (LLaMA 4 x 256, CLIP 2 x 64), --questions ScienceQA-like questions with
                 images made here, dense and μ-MoE rows, 8 new tokens per answer
    eval_tasks   a random OPT of 4 x 256, --docs documents of a local 3-way multiple-choice task, dense and μ-MoE
                 (routed once per context)

Two times of rank 0: its `main()` (imports and the interpreter's start left out; loading the model and the data, and
lm-eval's building of its requests, in, as in a real run), and the rows' own seconds from the results file (the
answering, lm-eval's evaluation), the part that a run of hours spends nearly all its time in; each launch's
collective time comes from timing distributed.collective. On a CPU shared with other work the ranks may not get a
core each, and the wall times then say little: the CPU seconds of the busiest rank's main() (one thread each) are
printed too, what its wall time would be with a core of its own.

    python benchmarks/bench_distributed.py --commands [--questions 48] [--docs 96] [--repeats 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the library, its thread policy first
import thread_policy  # noqa: E402,F401  how torch's OpenMP threads wait: set before torch loads it
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the helpers the tests share
sys.path.insert(0, str(REPO / "benchmarks"))
import distributed  # noqa: E402
import eval_ppl  # noqa: E402
import pruners  # noqa: E402
from models import load_model  # noqa: E402
from opt_model import OPTConfig  # noqa: E402
from kit.data import random_ids  # noqa: E402
from kit.tiny_models import save_random_opt  # noqa: E402

TARGET = 1.05
COMMANDS_TARGET, COLLECTIVES_TARGET = 0.6, 0.05  # --commands: the time of 2 ranks over 1 process, and collectives' share
TORCHRUN = Path(sys.executable).with_name("torchrun")


def time_collectives() -> list[float]:
    """From now on, every collective of distributed.py adds its seconds (waits for the other ranks included) to the
    one-element list returned."""
    inside, collective = [0.0], distributed.collective

    def timed_collective(op, *args):
        start = time.perf_counter()
        result = collective(op, *args)
        inside[0] += time.perf_counter() - start
        return result

    distributed.collective = timed_collective
    return inside


def worker(args) -> None:
    """One launch: time each task once after a warm-up; rank 0 prints the seconds as JSON, and the seconds it
    spent inside the collectives (waiting for the other rank included)."""
    distributed.start("cpu")
    inside = time_collectives()
    ids = random_ids(1, args.windows * args.seqlen, OPTConfig().vocab_size).view(args.windows, args.seqlen)
    model = load_model(args.checkpoint)
    seconds = {}
    for task in ("perplexity", "calibration"):
        for timed in (False, True):
            if task == "calibration":
                model = load_model(args.checkpoint)  # unpruned
            distributed.barrier()
            start, inside[0] = time.perf_counter(), 0.0
            if task == "perplexity":
                eval_ppl.perplexity(model, ids, desc="")
            else:
                pruners.prune_model(model, ids, "wanda", 0.5, progress=False)
            distributed.barrier()  # the slowest rank's time
            if timed:
                seconds[task] = time.perf_counter() - start
                seconds[task + " collectives"] = inside[0]
    if distributed.is_main():
        print(json.dumps(seconds))
    distributed.stop()


def launch(args, ranks: int, threads: int, checkpoint: Path) -> dict:
    launcher = [str(TORCHRUN), "--nproc-per-node", str(ranks)] if ranks > 1 else [sys.executable]
    command = launcher + [__file__, "--worker", "--checkpoint", str(checkpoint), "--windows", str(args.windows),
                          "--seqlen", str(args.seqlen)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# -----------------------------------------------------------------------------
# --commands: eval_vqa.py and eval_tasks.py, whole


def command_worker(args) -> None:
    """One launch of a command (`args.command_worker`, its argv in args.argv): rank 0 writes the seconds of its main()
    and those it spent inside the collectives to args.result."""
    import eval_tasks
    import eval_vqa

    inside = time_collectives()
    rank = int(os.environ.get("RANK", "0"))
    start, cpu = time.perf_counter(), time.process_time()
    code = {"vqa": eval_vqa, "tasks": eval_tasks}[args.command_worker].main(json.loads(args.argv))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if code:
        sys.exit(code)
    Path(f"{args.result}.cpu{rank}").write_text(str(cpu))  # this rank's CPU seconds (one thread: its work)
    if rank == 0:  # and the rows' own seconds (answering, or lm-eval's evaluation), from the results file
        out = Path(json.loads(args.argv)[json.loads(args.argv).index("--out") + 1])
        rows = sum(row["seconds"] for row in json.loads(out.read_text())["results"])
        args.result.write_text(json.dumps({"seconds": seconds, "rows": rows, "collectives": inside[0]}))


def save_commands_inputs(tmp: Path, questions: int, docs: int) -> dict[str, list[str]]:
    """The models and data of both commands, saved under tmp; each command's argv."""
    import transformers

    from kit.data import (scienceqa_rows, write_multiple_choice_task, write_parquet)  # the tests' makers of models and data
    from kit.tiny_models import VQA_IMAGE_ID, save_tiny_opt
    from kit.tiny_tokenizers import save_llama_tokenizer, save_tiny_tokenizer

    torch.manual_seed(0)
    llava = tmp / "llava"
    text = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                                    bos_token_id=1, eos_token_id=2, initializer_range=0.3)
    vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=56, patch_size=14)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=VQA_IMAGE_ID,
                                      image_seq_length=16)
    transformers.LlavaForConditionalGeneration(config).save_pretrained(llava)
    save_llama_tokenizer(llava, "<s>")
    write_parquet(tmp / "vqa" / "scienceqa" / "test-00000-of-00001.parquet", scienceqa_rows(questions))
    vqa = ["--model", str(llava), "--task", "scienceqa", "--data-dir", str(tmp / "vqa"), "--methods", "dense",
           "mumoe", "--rho", "0.5", "--max-new-tokens", "8", "--device", "cpu", "--out", str(tmp / "vqa.json")]

    opt = tmp / "opt"
    save_tiny_tokenizer(opt)
    save_tiny_opt(opt, random_layer_norms=False, vocab_size=512, hidden_size=256, word_embed_proj_dim=256,
                  ffn_dim=1024, num_hidden_layers=4, num_attention_heads=8, max_position_embeddings=128)
    (tmp / "tasks").mkdir()
    write_multiple_choice_task(tmp / "tasks", docs=docs)
    tasks = ["--model", str(opt), "--include-path", str(tmp / "tasks"), "--tasks", "tiny_mc", "--methods", "dense",
             "mumoe", "--rho", "0.5", "--device", "cpu", "--out", str(tmp / "tasks.json")]
    return {"vqa": vqa, "tasks": tasks}


def launch_command(name: str, argv: list[str], ranks: int, result: Path) -> dict:
    launcher = [str(TORCHRUN), "--nproc-per-node", str(ranks)] if ranks > 1 else [sys.executable]
    command = launcher + [__file__, "--command-worker", name, "--argv", json.dumps(argv), "--result", str(result)]
    subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), check=True)
    # the busiest rank's CPU seconds: its wall time were each rank alone on a core
    return json.loads(result.read_text()) | {"cpu": max(float(Path(f"{result}.cpu{r}").read_text()) for r in range(ranks))}


def commands(args) -> None:
    setups = {"1 process x 1 thread": 1, "2 ranks x 1 thread": 2}
    runs = {(name, setup): [] for name in ("vqa", "tasks") for setup in setups}
    with tempfile.TemporaryDirectory() as tmp:
        argvs = save_commands_inputs(Path(tmp), args.questions, args.docs)
        for r in range(args.repeats):
            for name, argv in argvs.items():
                for setup in list(setups)[r % 2:] + list(setups)[:r % 2]:  # each repeat starts with the other
                    runs[name, setup].append(launch_command(name, argv, setups[setup], Path(tmp) / "result.json"))
                    print(f"repeat {r + 1}: {name}, {setup}: {runs[name, setup][-1]} (load average "
                          f"{os.getloadavg()[0]:.1f})", flush=True)
    print(f"\neval_vqa: {args.questions} questions x 2 rows; eval_tasks: {args.docs} documents x 3 choices x 2 rows; "
          f"CPU, median (min-max) of {args.repeats}")
    for name in ("vqa", "tasks"):
        for part, what in (("seconds", "main()"), ("rows", "the rows"), ("cpu", "CPU")):
            medians = {}
            for setup in setups:
                values = [t[part] for t in runs[name, setup]]
                medians[setup] = statistics.median(values)
                print(f"eval_{name:<5} {what:>8} {setup:>22}: {medians[setup]:6.2f} s ({min(values):.2f}-{max(values):.2f})")
            ratio = medians["2 ranks x 1 thread"] / medians["1 process x 1 thread"]
            print(f"eval_{name:<5} {what:>8} {'2 ranks / 1 process':>22}: {ratio:.3f} (target <= {COMMANDS_TARGET})")
        share = [t["collectives"] / t["seconds"] for t in runs[name, "2 ranks x 1 thread"]]
        print(f"eval_{name:<5} {'main()':>8} {'inside the collectives':>22}: {statistics.median(share):.1%} of its time "
              f"({min(share):.1%}-{max(share):.1%}; target <= {COLLECTIVES_TARGET:.0%}), rank 0's waits included")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--commands", action="store_true", help="race eval_vqa.py and eval_tasks.py instead")
    parser.add_argument("--questions", type=int, default=48, help="--commands: eval_vqa's questions (default: 48)")
    parser.add_argument("--docs", type=int, default=96, help="--commands: eval_tasks' documents (default: 96)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--command-worker", choices=("vqa", "tasks"), help=argparse.SUPPRESS)
    parser.add_argument("--argv", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.command_worker:
        return command_worker(args)
    if args.commands:
        return commands(args)

    setups = {"1 process x 2 threads": (1, 2), "2 ranks x 1 thread": (2, 1), "1 process x 1 thread": (1, 1)}
    runs = {name: [] for name in setups}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "opt-125m-random"
        save_random_opt(checkpoint, OPTConfig())
        for r in range(args.repeats):
            for name in list(runs)[r % 3:] + list(runs)[:r % 3]:  # each repeat starts with another
                runs[name].append(launch(args, *setups[name], checkpoint))
                print(f"repeat {r + 1}: {name}: {runs[name][-1]}", flush=True)
    print(f"\nOPT-125M shape, {args.windows} windows of {args.seqlen} tokens, CPU; median (min-max) of {args.repeats}")
    medians = {}
    for task in ("perplexity", "calibration"):
        for name, times in runs.items():
            values = [t[task] for t in times]
            medians[name, task] = statistics.median(values)
            print(f"{task:>12} {name:>22}: {medians[name, task]:6.2f} s ({min(values):.2f}-{max(values):.2f})")
        ratio = medians["2 ranks x 1 thread", task] / medians["1 process x 2 threads", task]
        print(f"{task:>12} {'2 ranks / 1 process':>22}: {ratio:.3f} (target <= {TARGET})")
        share = [t[task + " collectives"] / t[task] for t in runs["2 ranks x 1 thread"]]
        print(f"{task:>12} {'inside the collectives':>22}: {statistics.median(share):.1%} of the 2 ranks' time "
              f"({min(share):.1%}-{max(share):.1%}), rank 0's waits for rank 1 included")


if __name__ == "__main__":
    main()
