"""Task scoring speed: our dense lm-eval model against lm-eval's own HFLM, and μ-MoE routed per context against dense.

The 4-way multiple-choice task tasks/ptb_lastword/ptb_lastword_mc (each PTB test sentence's last word among four),
its first --questions questions as lm-eval's loglikelihood requests (4 per question: context, " " + choice), on
the trained opt-ptb-tiny of ../shared/models (fp32, CPU). HFLM reads the same checkpoint through transformers'
OPTForCausalLM and the same tokenizer files. Targets and what is reported:

    ours dense / HFLM            requests per second >= 1.0 (both batch --batch-size requests, longest first)
    μ-MoE (context) / dense      reported: each question's context is routed once (block routing: a dense
                                 statistics pass of every block, then the gated pass with the selection),
                                 then its four continuations run through the cache in one batch; dense runs
                                 every request (context + choice) in batches, so the ratio is about the cost
                                 of one routed pass per question against a quarter of a batch of four
    μ-MoE (full) / dense         reported: routed on context + continuation, one routed pass per request

Modes run in a rotating order, repeat after repeat, so that noise from the rest of the machine hits them all;
medians with their spread (min - max). Every mode must give the same log-likelihoods it gave on its first run,
and ours dense those of HFLM (to 1e-3).

    python benchmarks/bench_tasks.py [--questions 100] [--batch-size 16] [--repeats 3] [--threads 1] [--rho 0.5]

About a minute with one thread on a 2-core CPU.
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the library, its thread policy first
import thread_policy  # noqa: E402,F401  how torch's OpenMP threads wait: set before torch loads it
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import models  # noqa: E402
from lm_harness import HarnessLM  # noqa: E402
from mumoe import MuMoE  # noqa: E402

MODEL = REPO.parent / "shared" / "models" / "opt-ptb-tiny"
TASK_DATA = REPO / "tasks" / "ptb_lastword" / "ptb_lastword_mc.test.jsonl"
PARITY_ATOL = 1e-3  # a benchmark's sanity check, not the test (test_lm_harness.py checks 1e-4 on tiny models)


def hflm(batch_size: int):
    """lm-eval's HFLM over transformers' OPTForCausalLM and OPT's tokenizer files, read from MODEL."""
    import transformers
    from lm_eval.models.huggingface import HFLM

    directory = Path(tempfile.mkdtemp())
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(MODEL / name, directory / name)
    special = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "add_prefix_space": False, **special}))
    model = transformers.OPTForCausalLM.from_pretrained(MODEL).eval()
    return HFLM(pretrained=model, tokenizer=transformers.AutoTokenizer.from_pretrained(directory),
                batch_size=batch_size)


def requests(questions: int):
    from lm_eval.api.instance import Instance

    docs = [json.loads(line) for line in TASK_DATA.read_text().splitlines()[:questions]]
    return [Instance("loglikelihood", {}, (doc["context"], " " + choice), i)
            for i, doc in enumerate(docs) for choice in doc["choices"]]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rho", type=float, default=0.5)
    args = parser.parse_args(argv)
    if not MODEL.is_dir() or not TASK_DATA.is_file():
        sys.exit(f"needs {MODEL} and {TASK_DATA} (python tasks/ptb_lastword/build_ptb_lastword.py)")
    torch.set_num_threads(args.threads)
    model, tokenizer = models.load_model(MODEL), models.load_tokenizer(MODEL)
    reqs = requests(args.questions)
    modes = {"HFLM": hflm(args.batch_size), "ours dense": HarnessLM(model, tokenizer, args.batch_size),
             "μ-MoE context": HarnessLM(model, tokenizer, args.batch_size, MuMoE(args.rho)),
             "μ-MoE full": HarnessLM(model, tokenizer, args.batch_size, MuMoE(args.rho), routing_scope="full")}
    first = {name: [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)] for name, lm in modes.items()}  # warm-up
    worst = max(abs(a - b) for a, b in zip(first["ours dense"], first["HFLM"]))
    assert worst <= PARITY_ATOL, f"ours dense vs HFLM: max |diff| {worst:.2e}"
    seconds = {name: [] for name in modes}
    for repeat in range(args.repeats):
        names = list(modes)[repeat % len(modes):] + list(modes)[:repeat % len(modes)]
        for name in names:
            modes[name].routed = 0
            start = time.perf_counter()
            got = [ll for ll, _ in modes[name].loglikelihood(reqs, disable_tqdm=True)]
            seconds[name].append(time.perf_counter() - start)
            assert got == first[name], f"{name} changed its log-likelihoods between runs"

    print(f"opt-ptb-tiny, {args.questions} questions x 4 choices = {len(reqs)} requests, batch {args.batch_size}, "
          f"{args.threads} thread(s), rho {args.rho}; ours dense vs HFLM max |diff| {worst:.1e}")
    median = {name: statistics.median(s) for name, s in seconds.items()}
    for name, s in seconds.items():
        routed = f", {modes[name].routed} routings" if name.startswith("μ-MoE") else ""
        print(f"  {name:<14} {len(reqs) / median[name]:7.1f} requests/s  (median {median[name]:.2f} s, "
              f"{min(s):.2f} - {max(s):.2f}{routed})")
    print(f"ours dense / HFLM, requests/s: {median['HFLM'] / median['ours dense']:.2f} (target >= 1.0)")
    print(f"μ-MoE routed on the context / dense, time: {median['μ-MoE context'] / median['ours dense']:.2f}")
    print(f"μ-MoE routed on everything / dense, time: {median['μ-MoE full'] / median['ours dense']:.2f}")


if __name__ == "__main__":
    main()
