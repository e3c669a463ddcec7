"""Dense forward of an OPT-125M-shaped model: our opt_model against transformers' OPTForCausalLM.

Both run on the same random weights, in the same process, alternating, so machine noise hits both.
Prints the median times and their ratio (target: ours / transformers <= 1.0), and the peak resident
memory of `load_model` on the saved checkpoint (every weight touched, since safetensors maps files
lazily), measured in a fresh subprocess: about 1x the parameter bytes means no second copy was made.

    python benchmarks/bench_forward.py [--tokens 2048] [--repeats 5] [--dtype float32]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the library, its thread policy first
import thread_policy  # noqa: E402,F401  how torch's OpenMP threads wait: set before torch loads it
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the helpers the tests share
from opt_model import load_model  # noqa: E402
from kit.timing import timed  # noqa: E402

# The peak is read from VmHWM (this process's own peak resident size), not ru_maxrss: Linux carries
# ru_maxrss over from the parent through fork and exec, so it would start at this big process's peak.
MEASURE_LOAD = """
import sys, torch
sys.path.insert(0, {root!r})
from opt_model import load_model
def peak_kb():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1])
before = peak_kb()
model = load_model({directory!r}, dtype=torch.{dtype})
sum(float(p.float().sum()) for p in model.parameters())  # fault in every page: safetensors maps files lazily
after = peak_kb()
print(before, after, sum(p.numel() * p.element_size() for p in model.parameters()))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    import transformers

    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12,
                                    num_attention_heads=12, max_position_embeddings=2048, word_embed_proj_dim=768)
    reference = transformers.OPTForCausalLM(config).eval().to(getattr(torch, args.dtype))
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        ours = load_model(directory, dtype=getattr(torch, args.dtype))
        load = subprocess.run([sys.executable, "-c", MEASURE_LOAD.format(
            root=str(Path(__file__).resolve().parent.parent), directory=directory, dtype=args.dtype)],
            capture_output=True, text=True, check=True).stdout.split()
    before_kb, after_kb, param_bytes = map(int, load)

    ids = torch.randint(0, config.vocab_size, (1, args.tokens))
    with torch.inference_mode():
        assert (ours(ids) - reference(ids).logits).abs().max() < 1e-3  # same weights, same answer
        times = timed({"ours": lambda: ours(ids), "transformers": lambda: reference(ids).logits}, args.repeats)
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "tokens": args.tokens, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "ours_s": median["ours"], "transformers_s": median["transformers"],
        "ratio_ours_over_transformers": median["ours"] / median["transformers"],
        "load_peak_rss_increase_mb": (after_kb - before_kb) / 1024, "parameter_mb": param_bytes / 2**20,
    }
    print(f"dense forward, OPT-125M shape, T={args.tokens}, {args.dtype}, {result['threads']} threads, "
          f"median of {args.repeats}")
    print(f"  ours          {median['ours']:.3f} s")
    print(f"  transformers  {median['transformers']:.3f} s")
    print(f"  ratio         {result['ratio_ours_over_transformers']:.3f}  (target <= 1.0)")
    print(f"load_model peak RSS increase {result['load_peak_rss_increase_mb']:.0f} MB "
          f"for {result['parameter_mb']:.0f} MB of parameters")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
