"""Everything worth checking on a GPU, in one command and under 8 minutes, every figure into one JSON.

The machine this code is written on has no GPU; a session lent one runs

    python benchmarks/gpu_check.py                  # on CUDA: about 5 minutes on one GPU
    python benchmarks/gpu_check.py --dry-run        # on the CPU, tiny sizes, seconds: checks that it runs

and reads gpu_check.json (`--out`). The steps, each with its own time limit so that one that hangs or fails
does not stop the others (a failed step is recorded with its error, and the exit code is then 1):

    tests       the CUDA tests: those that take a device or a half-precision dtype (offload to CUDA, the selects
                on CUDA against the CPU, float16 / bfloat16 runs), selected by their mark (pytest -m cuda)
    selection   benchmarks/bench_selection.py on CUDA: the paper's Figure 3, kthvalue against sort / topk
    forward     μ-MoE forward / dense forward on an OPT-125M-shaped model at T = 512 and 2048, float16, both
                routings (lm_head included; median and spread of REPEATS, CUDA-synchronized)
    generate    greedy generation with the KV cache, dense and μ-MoE, 256-token prompt, 64 new tokens: tokens/s;
                μ-MoE's new tokens decode as --decode says (auto: the packed kernel where it runs, the masked
                W ⊙ M elsewhere, which on CUDA is today's only path); the path that ran is recorded
    eval        eval_ppl.py on a tiny random OPT in float16 with --offload, every method, a --data-dir of
                random sentences: the perplexities (finite) and the run's time (the step's seconds)
    triton      the prompt's experts packed for CUDA and read by triton_experts' Triton kernel: a decode step
                (64 cached tokens, float16) packed / dense on an OPT-125M-shaped model and one LLaMA-7B block at
                rho 0.6, 0.5, 0.4 and 2:4, with the bytes limit (the packed step's bytes over dense's) and the GB/s
                of each; the memory per routed prompt (mumoe.experts_bytes, and CUDA's peak allocated memory during
                a 256-token prompt's routing beyond dense's, over the decoder Linears' bytes); the generation of
                256 + 64 tokens on the Triton path, tokens/s against dense

`--dry-run` runs the same steps on the CPU at tiny sizes in float32 and skips what needs CUDA (the tests:
CI runs them anyway), so that CI can check that the script has not rotted (test_distributed.py); its triton step
runs the kernel through Triton's interpreter where triton is installed, the masked product where it is not.
"""

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the library, its thread policy first
import thread_policy  # noqa: E402,F401  how torch's OpenMP threads wait: set before torch loads it
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the helpers the tests share
sys.path.insert(0, str(REPO / "benchmarks"))
import mumoe  # noqa: E402
import triton_experts  # noqa: E402
from bench_decode import CACHED, OPT_125M, SETTINGS, llama_7b_block, step_bytes, stepper  # noqa: E402
from checkpoint import dense_linear  # noqa: E402
from kit.data import random_ids  # noqa: E402
from kit.timing import forward_modes, median_and_spread, timed  # noqa: E402
from kit.tiny_models import random_opt, save_random_opt  # noqa: E402
from llama_model import LlamaConfig, LlamaForCausalLM  # noqa: E402
from opt_model import OPTConfig  # noqa: E402
from pruners import default_select  # noqa: E402

REPEATS = 5
# per step, seconds: 470 in all, under the 8 minutes a lent GPU is asked for (the triton step's 60 are a guess
# until a GPU has run it: Triton compiles one kernel per dtype, bias and tokens per pass on first use)
TIME_LIMITS = {"tests": 180, "selection": 90, "forward": 50, "generate": 50, "eval": 40, "triton": 60}
# the tests whose name or parameters say CUDA, offload or half precision: where a GPU changes what runs
TINY = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4)  # --dry-run's model
TINY_LLAMA = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, head_dim=16, vocab_size=256, max_position_embeddings=256)
TRITON_TARGET = 0.75  # packed / dense decode step at rho 0.5 in float16 on a LLaMA-7B block (issue 34)


def subprocess_step(command: list[str], limit: int) -> dict:
    """Run a command of the repository; its last lines of output are kept."""
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}: " + " | ".join(tail))
    return dict(command=" ".join(command[1:]), tail=tail)


# -----------------------------------------------------------------------------
# The steps: each returns its figures as a dict


def tests(args, device, work: Path) -> dict:
    result = subprocess_step([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "-m", "cuda"],
                             TIME_LIMITS["tests"])
    summary = result["tail"][-1]  # "256 passed, 1 skipped in 44.88s"
    return dict(result, summary=summary)


def selection(args, device, work: Path) -> dict:
    sizes = ["--square", "64", "--opt-hidden"] if args.dry_run else []
    out = work / "selection.json"
    result = subprocess_step([sys.executable, "benchmarks/bench_selection.py", "--devices", device.type, *sizes,
                              "--out", str(out), "--plot", str(work / "selection.png")], TIME_LIMITS["selection"])
    rows = json.loads(out.read_text())["results"]
    return dict(command=result["command"], ms={f"{r['label']} rho={r['rho']} {r['select']}": 1e3 * r["seconds"]
                                               for r in rows})


@torch.no_grad()
def forward(args, device, work: Path) -> dict:
    config, tokens = (TINY, [16, 32]) if args.dry_run else (OPTConfig(), [512, 2048])
    model = random_opt(config).to(device, args.dtype)
    figures = {}
    for T in tokens:
        ids = random_ids(1, T, OPTConfig().vocab_size).to(device)
        modes = forward_modes(model, ids, 0.5, [default_select(device)])
        seconds = {name: timed(fn, args.repeats, device) for name, fn in modes.items()}
        dense = statistics.median(seconds["dense"])
        figures[f"T={T}"] = {name: dict(median_and_spread(s), ratio_to_dense=statistics.median(s) / dense)
                             for name, s in seconds.items()}
    return dict(dtype=str(args.dtype), figures=figures)


@torch.no_grad()
def generate(args, device, work: Path) -> dict:
    config, prompt, new = (TINY, 8, 4) if args.dry_run else (OPTConfig(), 256, 64)
    model = random_opt(config).to(device, args.dtype)
    prompt_ids = random_ids(1, prompt, OPTConfig().vocab_size)[0].tolist()
    figures, decode = {}, mumoe.decode_path(args.decode, device, args.dtype)  # --decode packed on CUDA: this step fails
    for name, rho, routing in [("dense", 1.0, "block"), ("mumoe block", 0.5, "block"),
                               ("mumoe linear", 0.5, "linear")]:
        seconds = timed(lambda: mumoe.generate(model, prompt_ids, new, mumoe.MuMoE(rho, routing=routing),
                                               decode=args.decode),
                        args.repeats, device)
        figures[name] = dict(median_and_spread(seconds), tokens_per_s=new / statistics.median(seconds))
    return dict(prompt=prompt, new=new, dtype=str(args.dtype), decode=decode, figures=figures)


def evaluate(args, device, work: Path) -> dict:
    from kit.data import sentence  # a tiny BPE tokenizer, no download
    from kit.tiny_tokenizers import save_tiny_tokenizer

    model, data = work / "tiny-opt", work / "data"
    save_random_opt(model, TINY)
    save_tiny_tokenizer(model)
    rng = random.Random(0)
    data.mkdir()
    for dataset, split in [("wikitext2", "train"), ("wikitext2", "test"), ("ptb", "train"), ("ptb", "test"),
                           ("c4", "train"), ("c4", "validation")]:
        rows = [sentence(rng, rng.randint(3, 40)) for _ in range(100)]
        (data / f"{dataset}.{split}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    out = work / "eval.json"
    quick = ["--datasets", "ptb", "--calib", "ptb"] if args.dry_run else []  # every method still runs
    subprocess_step([sys.executable, "eval_ppl.py", "--model", str(model), "--data-dir", str(data), "--seqlen",
                     "16", "--nsamples", "4", "--max-windows", "4", "--device", device.type, "--dtype",
                     str(args.dtype).removeprefix("torch."), "--out", str(out), *quick]
                    + ([] if device.type == "cpu" else ["--offload"]),  # the CPU has nowhere to offload to
                    TIME_LIMITS["eval"])
    report = json.loads(out.read_text())
    ppl = {eval_label(r): r["ppl"] for r in report["results"]}
    if any(p is None for row in ppl.values() for p in row.values()):
        raise RuntimeError(f"a perplexity is not finite: {ppl}")
    return dict(dtype=report["settings"]["dtype"], ppl=ppl)


@torch.no_grad()
def triton(args, device, work: Path) -> dict:
    path = mumoe.decode_path("auto", device, args.dtype)  # "triton" on CUDA where the kernel runs
    if args.dry_run and triton_experts.TRITON_MISSING is None:
        path = "triton"  # on CPU tensors: Triton's interpreter, slow, so the dry run's sizes are tiny
    if args.dry_run:  # one setting, the interpreter runs a few products a second
        llama = LlamaForCausalLM(TINY_LLAMA).requires_grad_(False).eval()
        models, settings, prompt, new = {"opt tiny": random_opt(TINY), "llama tiny": llama}, ["rho 0.5"], 8, 3
    else:
        models, settings = {"opt-125m": random_opt(OPT_125M), "llama-7b block": llama_7b_block()}, SETTINGS
        prompt, new = 256, 64
    steps, memory = [], {}
    for name, model in models.items():
        model = model.to(device, args.dtype)
        vocab = model.config.vocab_size
        prompts, next_ids = random_ids(1, CACHED, vocab, seed=1).to(device), random_ids(1, 1, vocab, seed=2).to(device)
        for label in settings:
            rho, nm = SETTINGS[label]
            cache = model.new_cache(CACHED + 1)
            _, chosen = mumoe.route_prompt(model, prompts, cache, mumoe.MuMoE(rho, nm=nm), path)
            seconds = timed({"dense": stepper(model, dense_linear, cache, next_ids),
                             "packed": stepper(model, mumoe.decode_experts(chosen, path), cache, next_ids)},
                            args.repeats, device)
            med = {k: statistics.median(v) for k, v in seconds.items()}
            dense_bytes, packed_bytes = step_bytes(model, None), step_bytes(model, chosen)
            steps.append(dict(model=name, setting=label, path=path, packed_over_dense=med["packed"] / med["dense"],
                              bytes_limit=packed_bytes / dense_bytes, dense_gbps=dense_bytes / med["dense"] / 1e9,
                              packed_gbps=packed_bytes / med["packed"] / 1e9,
                              target=TRITON_TARGET if (name, label) == ("llama-7b block", "rho 0.5") else None,
                              seconds={k: median_and_spread(v) for k, v in seconds.items()}))
            del chosen, cache
        if "opt" in name:  # the memory per routed prompt and a generation, on the OPT-shaped model
            memory, generation = routed_prompt_memory(model, prompt, new, device, args.dtype)
    return dict(dtype=str(args.dtype), path=path, steps=steps, memory=memory, generation=generation)


def routed_prompt_memory(model, prompt_tokens: int, new: int, device, dtype) -> tuple[dict, dict]:
    """A generation of `new` tokens after a `prompt_tokens` prompt, dense and μ-MoE at rho 0.5, decoded as
    --decode auto does (the Triton kernel on CUDA; on the CPU of the dry run, packed_experts' or masked): the bytes
    the prompt's experts hold, CUDA's peak allocated memory beyond dense's (on CUDA), and tokens/s."""
    prompt = random_ids(1, prompt_tokens, model.config.vocab_size, seed=3)[0].tolist()
    linears = sum(layer.weight.nbytes for block in model.blocks for layer in block.linears().values())
    memory, figures, timings = {"path": mumoe.decode_path("auto", device, dtype)}, {}, {}
    for name, moe in (("dense", mumoe.DENSE), ("mumoe", mumoe.MuMoE(0.5))):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        new_ids = mumoe.generate(model, prompt, new, moe, timings=timings)
        if device.type == "cuda":
            torch.cuda.synchronize()
            memory[f"{name}_peak_bytes"] = torch.cuda.max_memory_allocated()
        figures[f"{name}_seconds"] = time.perf_counter() - start
        figures[f"{name}_tokens_per_s"] = len(new_ids) / figures[f"{name}_seconds"]
        memory[f"{name}_experts_bytes"] = timings["experts_bytes"]
    memory.update(decoder_linears_bytes=linears, experts_over_linears=memory["mumoe_experts_bytes"] / linears)
    if device.type == "cuda":
        memory["extra_peak_over_linears"] = (memory["mumoe_peak_bytes"] - memory["dense_peak_bytes"]) / linears
    return memory, dict(prompt=prompt_tokens, new=new, **figures)


def eval_label(row: dict) -> str:
    return " ".join(str(row[k]) for k in ("method", "rho", "calib") if row.get(k) is not None)


STEPS = {"tests": tests, "selection": selection, "forward": forward, "generate": generate, "eval": evaluate,
         "triton": triton}
NEEDS_CUDA = {"tests"}  # skipped by --dry-run; the others run there on the CPU at tiny sizes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny sizes, skipping what needs CUDA")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--decode", choices=mumoe.DECODES, default="auto", help="how μ-MoE's new tokens decode in "
                        "the generate step (auto: packed where its kernel runs, masked elsewhere)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check.py: error: no CUDA device here; --dry-run checks the script on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    args.dtype = torch.float32 if args.dry_run else torch.float16
    args.repeats = 1 if args.dry_run else REPEATS
    report = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", dry_run=args.dry_run,
                  torch=torch.__version__, steps={})
    with tempfile.TemporaryDirectory() as work:
        for name in args.steps:
            start = time.perf_counter()
            if args.dry_run and name in NEEDS_CUDA:
                report["steps"][name] = dict(status="skipped", reason="needs CUDA")
                continue
            (Path(work) / name).mkdir()
            try:
                figures = STEPS[name](args, device, Path(work) / name)
                report["steps"][name] = dict(status="ok", seconds=time.perf_counter() - start, **figures)
            except Exception as e:  # recorded, and the next step runs
                report["steps"][name] = dict(status="failed", seconds=time.perf_counter() - start,
                                             error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            print(f"{name}: {report['steps'][name]['status']} ({time.perf_counter() - start:.0f} s)", flush=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"figures: {args.out}")
    return 1 if any(step["status"] == "failed" for step in report["steps"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
