"""The fused decode step (decode_step.py, decode_step.c) against the eager one, the model's own forward, on every
block the fused step serves: OPT (LayerNorms, biases, ReLU), LLaMA with GQA, Qwen3 (q/k norms, a head_dim of its
own; with sliding layers and biases on q, k, v and o), Phi-3 (fused q/k/v and gate/up, a sliding window, partial
RoPE), Mistral's window, Gemma 3 (four norms a block, GeGLU, local and global RoPE) and LLaVA's language model; each
dense and μ-MoE-packed, over a cache that fills for longer than the windows."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import decode_step
import llava_model
import models
import mumoe
import packed_experts
from checkpoint import UsageError
from kit.tiny_models import IMAGE_ID, decoding_opt, random_opt, save_tiny_llama, save_tiny_llava
from opt_model import OPTConfig
from packed_experts import compiled_kernel, cpu_flags, decode_linear
from test_families import save_tiny
from test_gemma import save_tiny_gemma

REPO = Path(__file__).resolve().parent.parent
AVX512 = "avx512f" in cpu_flags().split()
needs_kernel = pytest.mark.skipif(compiled_kernel()[1] is not None, reason=f"no packed kernel: {compiled_kernel()[1]}")
STEPS = 12  # new tokens after the 12-token prompts: 24 keys, past the tiny models' 16-token windows
# The fused step's logits against the eager step's: max |diff| / max |eager logit|, 12 steps of each model here, dense
# and packed, measured on an Intel Xeon: 7.0e-7 at worst (OPT, whose logits reach 16: 1.1e-5 absolute; the others
# 0.5-1.1 and 6e-8 to 3.3e-7), the same with the AVX2 build under ATEN_CPU_CAPABILITY=avx2 (5.3e-7), 1 and 2 threads.
# The bound leaves 7x room; a skipped norm, bias or residual moves them by more than 1e-2.
RTOL = 5e-6
LLAMAS = {"llama (GQA)": "llama_gqa", "qwen3": "qwen3", "qwen3 sliding": "qwen3_sliding", "phi3": "phi3",
          "phi3 partial rope": "phi3_partial_rope", "mistral window": "mistral_window"}


def build_models(directory: Path) -> dict:
    """name -> (our model, a prompt: 12 ids, or LLaVA's embedded prompt), the checkpoints saved under `directory`
    (once: a second call, in another process, loads them)."""
    ids = torch.randint(3, 100, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    found = {"opt": (decoding_opt(), ids)}
    for name, kind in LLAMAS.items():
        path = directory / kind
        if not path.exists():
            (save_tiny_llama if kind == "llama_gqa" else save_tiny)(path, kind)
        found[name] = (models.load_model(path), ids)
    if not (directory / "gemma3").exists():
        save_tiny_gemma(directory / "gemma3")
    found["gemma3"] = (models.load_model(directory / "gemma3"), ids)
    if not (directory / "llava").exists():
        save_tiny_llava(directory / "llava")
    llava = llava_model.load_llava(directory / "llava")
    with torch.no_grad():
        pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(2))
        found["llava"] = (llava.language_model, llava.embed_prompt(torch.tensor([[1, IMAGE_ID, *ids[:6]]]), pixels))
    return found


def routed(model, prompt, rho: float | None):
    """The prompt routed (dense at rho None, else μ-MoE packed), its cache, and the products of a step."""
    prompts = prompt if torch.is_tensor(prompt) else torch.tensor([prompt])
    cache = model.new_cache(prompts.shape[1] + STEPS)
    moe = mumoe.DENSE if rho is None else mumoe.MuMoE(rho)
    x, chosen = mumoe.route_prompt(model, prompts, cache, moe, "masked" if rho is None else "packed")
    products = {layer: layer.weight if rho is None else experts[0] for layer, experts in chosen.items()}
    return x, cache, chosen, products


@torch.no_grad()
def worst_difference(model, prompt, rho: float | None) -> float:
    """max |fused - eager| / max |eager| of the logits over STEPS steps, both fed the eager step's greedy tokens."""
    x, cache, chosen, products = routed(model, prompt, rho)
    eager_cache = copy.deepcopy(cache)
    step = decode_step.FusedStep(model, cache, products)
    experts = decode_linear if rho is None else mumoe.decode_experts(chosen, "packed")
    next_id, worst = model.head(x[:, -1:]).argmax(-1), 0.0
    for _ in range(STEPS):
        eager = model(next_id, experts, eager_cache, decode_linear)
        fused = step(next_id)
        worst = max(worst, ((fused - eager).abs().max() / eager.abs().max()).item())
        next_id = eager[:, -1].argmax(-1, keepdim=True)
    return worst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fused-step")
    return directory, build_models(directory)


@needs_kernel
@pytest.mark.parametrize("rho", [None, 0.5], ids=["dense", "packed"])
@pytest.mark.parametrize("name", ["opt", *LLAMAS, "gemma3", "llava"])
def test_fused_step_gives_the_eager_logits(tiny, name, rho):
    """Catches: a block's phase skipped or swapped (a norm, q/k norm, RoPE, the cache write, the window, the residual,
    Gemma's post-norms), a bias dropped, the wrong cache position, a k/v head shared with the wrong q heads."""
    model, prompt = tiny[1][name]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            worst = worst_difference(model, prompt, rho)
        finally:
            torch.set_num_threads(2)
        assert worst <= RTOL, f"{name}, {threads} thread(s): fused vs eager logits, relative {worst:.2e} > {RTOL}"


@needs_kernel
def test_fused_step_under_avx2_gives_the_eager_logits(tiny):
    """A CPU with AVX2 only: the kernel's AVX2 build and torch held to AVX2, in a fresh process, 1 and 2 threads."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(REPO / 'tests')!r})
import packed_experts
packed_experts.compiled_kernel = lambda: packed_experts.build(("-mno-avx512f",) if {AVX512} else ())
from pathlib import Path
from test_decode_step import build_models, worst_difference
worst = 0.0
for threads in (1, 2):
    torch.set_num_threads(threads)
    for model, prompt in build_models(Path({str(tiny[0])!r})).values():
        for rho in (None, 0.5):
            worst = max(worst, worst_difference(model, prompt, rho))
print(torch.backends.cpu.get_cpu_capability(), worst)
"""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    capability, worst = run.stdout.split()
    assert capability == "AVX2", f"torch ran with {capability}, not AVX2"
    assert float(worst) <= RTOL, f"AVX2: fused vs eager logits, relative {float(worst):.2e} > {RTOL}"


@needs_kernel
@pytest.mark.parametrize("rho", [None, 0.5], ids=["dense", "packed"])
@pytest.mark.parametrize("name", ["opt", "llama (GQA)", "phi3", "gemma3", "llava"])
def test_generation_is_the_same_fused_or_eager(tiny, name, rho):
    """generate's tokens with the fused step and the eager one; "auto" takes the fused step (catches an auto that
    silently runs eager: nothing else would fail)."""
    model, prompt = tiny[1][name]
    moe = mumoe.DENSE if rho is None else mumoe.MuMoE(rho)
    runs = {}
    for step in ("auto", "eager"):
        timings = {}
        runs[step] = (mumoe.generate(model, prompt, STEPS, moe, timings=timings, step=step), timings["step"])
    assert runs["auto"][1] == "fused" and runs["eager"][1] == "eager (asked for)", runs
    assert runs["auto"][0] == runs["eager"][0], f"{name}: fused {runs['auto'][0]} vs eager {runs['eager'][0]}"


@needs_kernel
def test_where_the_fused_step_cannot_run_auto_runs_eager_and_fused_is_refused(tiny):
    """OPT-350m's LayerNorms after each sub-block, the masked decode, half precision: auto decodes eager and says
    why; --step fused is a UsageError naming the reason, before any work."""
    llama, prompt = tiny[1]["llama (GQA)"]
    torch.manual_seed(0)
    post_ln = random_opt(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                   vocab_size=128, max_position_embeddings=64, word_embed_proj_dim=32,
                                   do_layer_norm_before=False))
    cases = [(post_ln, {}, "OPT-350m"), (llama, {"moe": mumoe.MuMoE(0.5), "decode": "masked"}, "masked"),
             (copy.deepcopy(llama).to(torch.bfloat16), {}, "bfloat16")]
    for model, kwargs, reason in cases:
        timings = {}
        mumoe.generate(model, prompt, 3, timings=timings, **kwargs)
        assert timings["step"].startswith("eager (") and reason in timings["step"], timings["step"]
        with pytest.raises(UsageError, match=f"--step fused cannot run here: .*{reason}"):
            mumoe.generate(model, prompt, 3, step="fused", **kwargs)
    with pytest.raises(UsageError, match="step must be one of"):
        mumoe.generate(llama, prompt, 3, step="compiled")


@needs_kernel
def test_a_full_cache_is_refused(tiny):
    model, prompt = tiny[1]["llama (GQA)"]
    x, cache, _, products = routed(model, prompt, None)
    step = decode_step.FusedStep(model, cache, products)
    for _ in range(STEPS):
        step(torch.tensor([[5]]))
    with pytest.raises(ValueError, match="overflow a KV cache"):
        step(torch.tensor([[5]]))


@needs_kernel
def test_without_the_kernel_the_eager_step_gives_the_same_tokens(tiny, monkeypatch):
    """No C compiler: auto decodes eager, says the kernel's reason, and gives the fused step's tokens; --step fused is
    refused with that reason. Catches a fused step attempted without its library, or a reason lost."""
    model, prompt = tiny[1]["llama (GQA)"]
    fused = mumoe.generate(model, prompt, STEPS, step="fused")
    monkeypatch.setattr(packed_experts, "compiled_kernel", lambda: (None, "no C compiler found (planted)"))
    timings = {}
    eager = mumoe.generate(model, prompt, STEPS, timings=timings)
    assert timings["step"] == "eager (no C compiler found (planted))", timings["step"]
    assert eager == fused, f"eager {eager} vs fused {fused}"
    with pytest.raises(UsageError, match=r"--step fused cannot run here: no C compiler found \(planted\)"):
        mumoe.generate(model, prompt, STEPS, step="fused")
