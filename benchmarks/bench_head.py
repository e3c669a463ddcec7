"""The dense products of a decode step against their bytes: lm_head and each decoder Linear of SmolLM2-135M, one
token (or a few), torch's F.linear against packed_experts.streamed_linear against a plain streaming read.

A decode step multiplies each dense W by one token, so its time is the time to read W: a product is held to its
bytes at the machine's streaming rate, measured in the same run as a read of the same bytes (torch.sum on the same
threads). A step reads every weight once, and the model (538 MB for SmolLM2 in fp32) is larger than the caches, so
each product is timed on weights that come from memory: each shape is laid out in as many copies as fill
--cold-bytes, and a timed call multiplies every copy in turn (as a step multiplies 30 blocks' Linears one after
the other); the stream reads all the copies. Then one whole decode step of the dense model, every Linear and lm_head
by F.linear against the same step through the kernel (mumoe.generate's), and a read of the step's bytes.

    shape       per shape (lm_head, q/o, k/v, gate/up, down) and token count: ms a product, GB/s of F.linear, the
                kernel and the stream, medians of alternating calls with their spread (kit.timing), and each one's
                fraction of the streaming rate (issue 36's targets: >= 0.8 of it; lm_head <= 1.25x its bytes' time)
    step        the dense model's decode step (64 cached tokens): eager against streamed, and the stream

    flock /work/bench.lock python benchmarks/bench_head.py [--smollm2 /tmp/smollm2-135m] [--repeats 9]
        [--threads 2] [--tokens 1 4] [--cold-bytes 1e9] [--skip step] [--out docs/head_decode.json]

With GOMP_SPINCOUNT=300000 in the environment (thread_policy leaves a user's setting alone; docs/packed_decode.md
has both, the second in docs/head_decode_spinning.json) torch's threads spin between calls instead of sleeping.
"""

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the library, its thread policy first
import thread_policy  # noqa: E402  how torch's OpenMP threads wait: set before torch loads it
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the helpers the tests share
import models  # noqa: E402
from checkpoint import dense_linear  # noqa: E402
from packed_experts import decode_linear, kernel_problem, streamed_linear  # noqa: E402
from results_file import write_json  # noqa: E402
from kit.data import random_ids  # noqa: E402
from kit.timing import median_and_spread, timed  # noqa: E402

COLD_BYTES = 1e9  # each shape's copies fill this much: twice the 480 MiB of L3 this machine's CPU reports
CACHED = 64  # tokens in the KV cache when the whole step is timed, as bench_decode.py has it
STREAMING_TARGET = 0.8  # issue 36: every dense product of a decode step at >= 80% of the streaming rate
HEAD_TARGET = 1.25  # issue 36: lm_head within 1.25x its bytes' time at the streaming rate


def dense_shapes(model) -> dict[str, tuple[int, int]]:
    """lm_head's and each decoder Linear's (d_out, d_in), by name (Linears of one shape named together: q/o)."""
    shapes = {"lm_head": tuple(model.lm_head.weight.shape)}
    for name, layer in model.blocks[0].linears().items():
        short = name.split(".")[-1].removesuffix("_proj")
        same = next((key for key, shape in shapes.items() if shape == tuple(layer.weight.shape)), None)
        if same is None:
            shapes[short] = tuple(layer.weight.shape)
        else:
            shapes[f"{same}/{short}"] = shapes.pop(same)
    return shapes


def bench_shape(name: str, d_out: int, d_in: int, tokens: int, repeats: int, cold_bytes: float) -> dict:
    """F.linear, the kernel and a read of the same bytes, over copies of a (d_out, d_in) W that fill cold_bytes."""
    copies = max(2, round(cold_bytes / (d_out * d_in * 4)))
    generator = torch.Generator().manual_seed(0)
    W_all = torch.randn(copies, d_out, d_in, generator=generator)  # (copies, d_out, d_in): one read of it all
    Ws = list(W_all)
    x = torch.randn(1, tokens, d_in, generator=generator)  # a decode step's (B, T, hidden)
    seconds = timed({"F.linear": lambda: [F.linear(x, W) for W in Ws],
                     "kernel": lambda: [streamed_linear(x, W) for W in Ws],
                     "stream": lambda: W_all.sum()}, repeats)
    nbytes = W_all.numel() * 4
    med = {k: statistics.median(v) for k, v in seconds.items()}
    row = dict(shape=name, d_out=d_out, d_in=d_in, tokens=tokens, copies=copies, bytes_each=nbytes // copies,
               ms={k: {s: 1e3 * t / copies for s, t in median_and_spread(v).items()} for k, v in seconds.items()},
               gbps={k: nbytes / t / 1e9 for k, t in med.items()},
               of_stream={k: med["stream"] / med[k] for k in ("F.linear", "kernel")})
    del W_all, Ws
    print(f"{name:9s} {d_out:5d}x{d_in:<4d} ({row['bytes_each'] / 1e6:6.2f} MB, {copies:4d} copies), {tokens} token"
          + ("s" if tokens > 1 else " ") + ": "
          + " | ".join(f"{k} {row['ms'][k]['median']:.3f} ms [{row['ms'][k]['min']:.3f}-{row['ms'][k]['max']:.3f}] "
                       f"{row['gbps'][k]:5.1f} GB/s" for k in seconds)
          + f" | of the stream: F.linear {row['of_stream']['F.linear']:.2f}, kernel {row['of_stream']['kernel']:.2f}"
          + (f"; kernel {1 / row['of_stream']['kernel']:.2f}x the bytes' time (target <= {HEAD_TARGET})"
             if name == "lm_head" else ""), flush=True)
    return row


@torch.no_grad()
def bench_step(model, repeats: int) -> dict:
    """The dense model's decode step, every product by F.linear (dense_linear) against the kernel (decode_linear),
    and a read of its Linears' bytes."""
    cache = model.new_cache(CACHED + 1)
    model(random_ids(1, CACHED, model.config.vocab_size, seed=1), cache=cache)
    next_ids = random_ids(1, 1, model.config.vocab_size, seed=2)

    def step(linear):
        def run():
            model(next_ids, linear, cache, linear)
            for c in cache:
                c.length = CACHED
        return run

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    nbytes = sum(m.weight.numel() * 4 for m in {id(m.weight): m for m in linears}.values())
    data = torch.ones(nbytes // 4)
    seconds = timed({"eager": step(dense_linear), "streamed": step(decode_linear), "stream": lambda: data.sum()},
                    repeats)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    row = dict(bytes=nbytes, ms={k: {s: 1e3 * t for s, t in median_and_spread(v).items()} for k, v in seconds.items()},
               gbps={k: nbytes / t / 1e9 for k, t in med.items()}, streamed_over_eager=med["streamed"] / med["eager"])
    print(f"dense decode step ({nbytes / 1e6:.0f} MB of Linears, {CACHED} cached tokens): "
          + " | ".join(f"{k} {row['ms'][k]['median']:.1f} ms [{row['ms'][k]['min']:.1f}-{row['ms'][k]['max']:.1f}] "
                       f"{row['gbps'][k]:.1f} GB/s" for k in seconds)
          + f" | streamed / eager {row['streamed_over_eager']:.2f}", flush=True)
    return row


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", type=Path, default=Path("/tmp/smollm2-135m"), help="SmolLM2-135M's directory")
    parser.add_argument("--repeats", type=int, default=9, help="timed calls of each candidate (default 9)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="*", default=[1], help="tokens a product multiplies (1 to 4)")
    parser.add_argument("--cold-bytes", type=float, default=COLD_BYTES, help="bytes of each shape's copies")
    parser.add_argument("--skip", nargs="*", default=[], choices=["shapes", "step"])
    parser.add_argument("--out", type=Path, default=Path("docs/head_decode.json"))
    args = parser.parse_args()
    problem = kernel_problem("cpu", torch.float32)
    if problem is not None:
        sys.exit(f"bench_head.py: {problem}")
    if not (args.smollm2 / "config.json").is_file():
        sys.exit(f"bench_head.py: SmolLM2-135M not found at {args.smollm2}: make it with "
                 f"python ../shared/models/smollm2-135m/make.py {args.smollm2}")
    if any(not 1 <= t <= 4 for t in args.tokens):
        sys.exit(f"bench_head.py: --tokens takes 1 to 4 (the streamed product's), got {args.tokens}")
    print(thread_policy.use_threads(args.threads))
    print(f"torch {torch.__version__}, {cpu_name()}, {os.cpu_count()} CPUs, fp32; medians of {args.repeats} calls "
          f"alternating F.linear / kernel / stream", flush=True)
    model = models.load_model(args.smollm2)
    report = {"cpu": cpu_name(), **thread_policy.settings(), "repeats": args.repeats, "cold_bytes": args.cold_bytes,
              "shapes": [], "step": None}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, report)

    if "shapes" not in args.skip:
        for tokens in args.tokens:
            for name, (d_out, d_in) in dense_shapes(model).items():
                report["shapes"].append(bench_shape(name, d_out, d_in, tokens, args.repeats, args.cold_bytes))
                save()
    if "step" not in args.skip:
        report["step"] = bench_step(model, args.repeats)
        save()
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
