"""Memory per routed prompt: the peak resident memory of a μ-MoE generation against the dense model's.

A routed prompt's experts are kept for its new tokens (mumoe.route_prompt). Masked, they are each Linear's dense
W ⊙ M: a second copy of the decoder Linears. Packed (mumoe.generate's packed decode), each block's W ⊙ M is packed
right after the block's gated pass and dropped, so that what stays is the packed form (rho · 4 + 1/8 bytes per
weight in float32) and one block's W ⊙ M at most exists at a time.

Each case runs in a fresh process (the peak resident set, ru_maxrss, is per process): load the model, generate
--new tokens greedily after a --prompt-token prompt of random ids, then report the process's peak. The extra peak
of a μ-MoE case is its peak minus the dense case's, beside the decoder Linears' bytes and the bytes that the
prompt's experts hold (mumoe.experts_bytes). The target (issue 34): extra peak <= 0.6 x the decoder Linears' bytes
at rho 0.5 with packed decode.

    python benchmarks/bench_memory.py --model /tmp/smollm2-135m [--rho 0.5] [--prompt-tokens 128] [--new 4]
        [--out memory.json]

(SmolLM2-135M: python ../shared/models/smollm2-135m/make.py /tmp/smollm2-135m.) float32 on the CPU.
"""

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the library, its thread policy first
import thread_policy  # noqa: E402,F401  how torch's OpenMP threads wait: set before torch loads it
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import models  # noqa: E402
from mumoe import DENSE, MuMoE, experts_bytes, generate, pack_experts, packed_experts, route_prompt  # noqa: E402

TARGET = 0.6  # extra peak / decoder Linears' bytes, packed decode at rho 0.5
# case -> generate's decode (None: the dense model); "packed late": every Linear's W ⊙ M first, then all packed,
# as generate did before issue 34 (and lm_harness's continuations still do)
CASES = {"dense": None, "packed": "packed", "masked": "masked", "packed late": "packed"}


def peak_resident_bytes() -> int:
    """The process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.no_grad()
def one_case(args) -> dict:
    """Run one case in this process: its peak resident memory and what the prompt's experts hold."""
    model = models.load_model(args.model)
    loaded = peak_resident_bytes()
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt_tokens,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    decode = CASES[args.case]
    timings = {}
    if args.case == "packed late":
        cache = model.new_cache(args.prompt_tokens + 1)
        _, chosen = route_prompt(model, torch.tensor([prompt]), cache, MuMoE(args.rho))
        packed = pack_experts(chosen, decode)  # all of them, beside every W ⊙ M
        del chosen
        new = [model(torch.tensor([[prompt[-1]]]), packed_experts(packed), cache)[0, -1].argmax().item()]
        timings["experts_bytes"] = experts_bytes(packed)
    else:
        new = generate(model, prompt, args.new, DENSE if decode is None else MuMoE(args.rho), timings=timings,
                       decode=decode or "auto")
    linears = [layer for block in model.blocks for layer in block.linears().values()]
    return dict(case=args.case, loaded_peak=loaded, peak=peak_resident_bytes(), new_tokens=len(new),
                experts_bytes=timings["experts_bytes"],
                decoder_linears_bytes=sum(layer.weight.numel() * layer.weight.element_size() for layer in linears))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new", type=int, default=4)
    parser.add_argument("--case", choices=CASES, help="(internal) run one case in this process, print its JSON")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(one_case(args)))
        return
    rows = {}
    for case in CASES:
        command = [sys.executable, __file__, "--model", args.model, "--rho", str(args.rho), "--prompt-tokens",
                   str(args.prompt_tokens), "--new", str(args.new), "--case", case]
        run = subprocess.run(command, capture_output=True, text=True, check=True)
        rows[case] = json.loads(run.stdout.strip().splitlines()[-1])
    linears, dense = rows["dense"]["decoder_linears_bytes"], rows["dense"]["peak"]
    mb = 2 ** 20
    print(f"{args.model}, rho {args.rho}, {args.prompt_tokens}-token prompt, {args.new} new tokens, float32; "
          f"decoder Linears {linears / mb:.0f} MiB")
    print(f"{'case':8} {'peak MiB':>9} {'extra MiB':>10} {'extra / Linears':>16} {'experts held MiB':>17}")
    for case, row in rows.items():
        extra = row["peak"] - dense
        row.update(extra_peak=extra, extra_over_linears=extra / linears)
        print(f"{case:8} {row['peak'] / mb:9.0f} {extra / mb:10.0f} {extra / linears:16.2f} "
              f"{row['experts_bytes'] / mb:17.0f}")
    packed = rows["packed"]["extra_over_linears"]
    print(f"packed: extra peak {packed:.2f} x the decoder Linears' bytes (target <= {TARGET} at rho 0.5)")
    if args.out:
        args.out.write_text(json.dumps(dict(settings=vars(args) | {"out": str(args.out)}, rows=rows), indent=1))


if __name__ == "__main__":
    main()
