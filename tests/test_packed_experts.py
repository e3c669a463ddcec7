"""Tests for packed_experts (a prompt's experts packed, the decode kernel) and where μ-MoE decodes with them.

References: the masked dense product F.linear(x, W ⊙ M, b) that μ-MoE's gate computes, and packed_experts'
plain-PyTorch reference of the packed product; greedy generation and lm_harness's log-likelihoods with the masked
W ⊙ M (decode="masked"). Tiny random models in the Hugging Face layout (kit.tiny_models' LLaMA and LLaVA) and a
tiny OPT built here: nothing is downloaded. Where the kernel cannot be built (no C compiler, a CPU without AVX2),
the tests of the kernel itself skip and say why; the fallback's tests run everywhere.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mumoe
import packed_experts
import pruners
from checkpoint import UsageError
from mumoe import MuMoE, decode_path, generate, route_prompt
from opt_model import OPTConfig, OPTForCausalLM
from packed_experts import GROUP, ROWS, pack, packed_linear, unpack
from kit.tiny_models import IMAGE_ID, save_tiny_llama, save_tiny_llava

REPO = Path(__file__).resolve().parent.parent
PROBLEM = packed_experts.kernel_problem()
needs_kernel = pytest.mark.skipif(PROBLEM is not None, reason=f"the packed kernel cannot run here: {PROBLEM}")
AVX512 = "avx512f" in packed_experts.cpu_flags().split()
# The AVX2 path built on this CPU too, by turning AVX-512 off (a user's CPU may have AVX2 only)
BUILDS = [(), ("-mno-avx512f",)] if AVX512 else [()]

# Each output is a dot product of up to d_in terms summed in another order than F.linear's: measured on the shapes
# below, |packed - masked| <= 1.3e-7 · sum_j |x_j W_ij| (fp32 epsilon is 6e-8). A bug moves an output by a term.
PRODUCT_RTOL = 1e-6
# Log-likelihood sums of -16 to -65 here, packed vs masked decode: measured 7.6e-6 at most, 2 fp32 steps of a sum
# near -48 (its ulp is 3.8e-6). A bias left out or a wrong row moves a sum by far more than 1e-3.
HARNESS_ATOL, HARNESS_RTOL = 1e-5, 1e-6


def routed(W: torch.Tensor, rho: float, nm=None, seed=0, tied=False) -> torch.Tensor:
    """W ⊙ M with Wanda's mask on random input norms (μ-MoE's router); `tied`: every score of a row ties."""
    norms = torch.rand(W.shape[1], generator=torch.Generator().manual_seed(seed)) + 0.1
    if tied:
        W, norms = W.sign() * 0.5, torch.ones_like(norms)  # |W_ij| · ||X_j|| equal everywhere: ties to the lower index
    return pruners.wanda_gated_weight(W, norms, rho, "sort", nm)


def assert_product_close(y: torch.Tensor, x: torch.Tensor, W_gated: torch.Tensor, bias, what: str) -> None:
    """y against F.linear(x, W ⊙ M, bias), each output's error measured against sum_j |x_j W_ij|."""
    expected = F.linear(x, W_gated, bias)
    scale = F.linear(x.abs(), W_gated.abs()) + 1e-30
    worst = ((y - expected).abs() / scale).max().item()
    assert y.shape == expected.shape, f"{what}: shape {tuple(y.shape)}, expected {tuple(expected.shape)}"
    assert worst <= PRODUCT_RTOL, (f"{what}: error {worst:.2e} of sum |x W| (bound {PRODUCT_RTOL}); first outputs "
                                   f"{y.flatten()[:4].tolist()} vs {expected.flatten()[:4].tolist()}")


# -----------------------------------------------------------------------------
# The packed form and the kernel


@needs_kernel
def test_packed_layout_is_the_documented_one():
    """Blocks of ROWS rows, groups of 16 columns, one stream: for each block, group by group, each row's 16 mask bits
    (a little-endian uint16, the padding rows and columns pruned) and its kept W_ij, columns ascending; starts:
    where each block begins. Bytes per weight: rho · 4 + 1/8, the starts aside."""
    W = torch.randn(6, 37)  # 2 blocks (the second with 2 padding rows), 3 groups (the last with 11 padding columns)
    W_gated = routed(W, 0.5)
    packed = pack(W_gated)
    padded = torch.zeros(2 * ROWS, 3 * GROUP)
    padded[:6, :37] = W_gated
    stream = padded.reshape(2, ROWS, 3, GROUP).transpose(1, 2)  # (block, group, row, column): the stream's order
    bits = packed.bits.reshape(2, 3, ROWS, 2).long()
    assert torch.equal(bits[..., 0] | bits[..., 1] << 8, (stream != 0).long().mul(2 ** torch.arange(GROUP)).sum(-1)), (
        "mask bits differ from W ⊙ M's kept weights in (block, group, row) order")
    assert torch.equal(packed.values[: packed.starts[-1]], stream[stream != 0]), "values are not the stream's kept W"
    assert packed.starts.tolist() == [0, int((stream[0] != 0).sum()), int((stream != 0).sum())], "block starts"
    assert packed.values.numel() == packed.starts[-1] + packed_experts.PAD, "the values must end in PAD zeros"
    big = torch.randn(64, 4096)
    fractions = [pack(routed(big, rho)).nbytes / big.nbytes for rho in (0.6, 0.5, 0.4)]
    limits = [rho + 1 / 32 for rho in (0.6, 0.5, 0.4)]  # (rho · 4 + 1/8) / 4
    assert all(abs(f - limit) < 0.002 for f, limit in zip(fractions, limits)), f"bytes/dense {fractions}, not {limits}"


@needs_kernel
@pytest.mark.parametrize("build", BUILDS, ids=lambda flags: "avx2" if flags else "native")
@pytest.mark.parametrize("d_out, d_in, rho, nm, tied", [
    (5, 37, 0.5, None, False),     # d_in not a multiple of a group (16) nor of AVX2's 8; d_out not of a block
    (33, 300, 0.4, None, False),
    (9, 64, 1 / 64, None, False),  # k = 1: one weight per row
    (8, 50, 1.0, None, False),     # k = d_in: every weight (rho = 1 packs the dense W)
    (12, 40, 0.5, None, True),     # every score ties: the kept columns are the lowest-index ones
    (7, 48, 0.5, (2, 4), False),   # N:M
    (4, 16, 0.5, (4, 8), False),
    (3, 7, 0.6, None, False),      # fewer columns than one AVX2 group
])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
def test_packed_product_equals_masked_product(build, d_out, d_in, rho, nm, tied, T, bias, threads, monkeypatch):
    monkeypatch.setattr(packed_experts, "compiled_kernel", lambda: packed_experts.build(build))  # packs too
    generator = torch.Generator().manual_seed(d_out * d_in + T)
    W = torch.randn(d_out, d_in, generator=generator)
    b = torch.randn(d_out, generator=generator) if bias else None
    W_gated = routed(W, rho, nm, tied=tied)
    k = d_in - pruners.prune_count(d_in, rho) if nm is None else d_in // nm[1] * (nm[1] - nm[0])
    assert ((W_gated != 0).sum(dim=1) == k).all(), "the test's routing kept another count"
    x = torch.randn(T, d_in, generator=generator)
    packed = pack(W_gated, b)
    assert_product_close(packed_linear(x, packed), x, W_gated, b, f"kernel {build or 'native'}, T={T}")
    assert torch.equal(unpack(packed), W_gated), "the packed form does not unpack to W ⊙ M"
    batch = torch.randn(3, 2, d_in, generator=generator)  # continuations of one context sharing its experts
    assert_product_close(packed_linear(batch, packed), batch, W_gated, b, "a batch of sequences")


@needs_kernel
def test_the_kernel_boundary_refuses_what_it_would_misread():
    """C reads raw pointers: a float64 x (its bytes read as float32), a tensor of the wrong width (silently
    reflowed into other rows), a float64 or 1-d W ⊙ M, a bias of the wrong length: each a clear error instead."""
    W_gated = routed(torch.randn(8, 32), 0.5)
    packed = pack(W_gated)
    for x, what in [(torch.randn(2, 32, dtype=torch.float64), "float32"), (torch.randn(4, 16), "features")]:
        with pytest.raises(ValueError, match=what):
            packed_linear(x, packed)
    for W, bias, what in [(W_gated.double(), None, "float32"), (W_gated[0], None, "dimensions"),
                          (W_gated, torch.zeros(7), "bias of 7")]:
        with pytest.raises(ValueError, match=what):
            pack(W, bias)


@needs_kernel
def test_tokens_beyond_one_pass_and_large_rows(threads):
    """More tokens than TOKENS_PER_PASS (several passes per row block) on a row longer than the caches' lines."""
    W_gated = routed(torch.randn(70, 1000), 0.5)
    x = torch.randn(11, 1000)
    assert_product_close(packed_linear(x, pack(W_gated)), x, W_gated, None, "11 tokens")


# -----------------------------------------------------------------------------
# Decoding with packed experts: generation and lm_harness, against the masked W ⊙ M


def tiny_opt() -> OPTForCausalLM:
    torch.manual_seed(0)
    config = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                       max_position_embeddings=64, word_embed_proj_dim=32)
    model = OPTForCausalLM(config).requires_grad_(False).eval()
    for block in model.blocks:  # weights of std 2/sqrt(d_in): every block matters to the greedy tokens
        for layer in block.linears().values():
            layer.weight.normal_(0, 2.0 / layer.in_features ** 0.5)
            layer.bias.normal_(0, 0.1)  # a bias the packed Linear must add
    return model


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """name -> (our language model, a prompt: ids or an embedded LLaVA prompt with its image features)."""
    import llama_model
    import llava_model

    ids = torch.randint(3, 100, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    llama_dir = tmp_path_factory.mktemp("llama_gqa")
    save_tiny_llama(llama_dir, "llama_gqa")
    llama = llama_model.load_model(llama_dir)
    llava_dir = tmp_path_factory.mktemp("llava")
    save_tiny_llava(llava_dir)
    llava = llava_model.load_llava(llava_dir)
    with torch.no_grad():
        pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(2))  # the tiny tower's size
        embedded = llava.embed_prompt(torch.tensor([[1, IMAGE_ID, *ids[:6]]]), pixels)
    return {"opt": (tiny_opt(), ids), "llama (GQA)": (llama, ids), "llava": (llava.language_model, embedded)}


@needs_kernel
@pytest.mark.parametrize("name", ["opt", "llama (GQA)", "llava"])
@pytest.mark.parametrize("rho, nm, routing", [(0.5, None, "block"), (0.4, None, "linear"), (1.0, (2, 4), "block")])
def test_greedy_generation_packed_equals_masked(tiny_models, name, rho, nm, routing, monkeypatch):
    model, prompt = tiny_models[name]
    timings, products = {}, []
    masked = generate(model, prompt, 16, MuMoE(rho, routing=routing, nm=nm), decode="masked")
    monkeypatch.setattr(mumoe, "packed_linear", lambda x, P: products.append(x.shape) or packed_linear(x, P))
    packed = generate(model, prompt, 16, MuMoE(rho, routing=routing, nm=nm), decode="packed", timings=timings)
    assert packed == masked, f"{name}: packed decode {packed} vs masked {masked}"
    linears, blocks = sum(len(block.linears()) for block in model.blocks), len(model.blocks)
    # the first step: one product per Linear; then q/k/v and gate/up (fc1 alone in OPT) as one each: 4 products
    # per block and step, OPT and LLaMA alike
    assert len(products) == linears + 14 * 4 * blocks, (
        f"{len(products)} packed products for 15 steps of {linears} Linears in {blocks} blocks")
    assert len(set(masked)) > 2, f"{name}: a degenerate test, the tokens repeat: {masked}"
    assert set(timings) == {"prompt", "pack", "decode", "experts_bytes"}, timings


@needs_kernel
def test_packed_decode_steps_equal_masked_logits(tiny_models):
    """Each step's logits, not only the argmax: the packed experts give the masked W ⊙ M's numbers."""
    model, prompt = tiny_models["llama (GQA)"]
    logits = {}
    for path in ("masked", "packed"):
        cache = model.new_cache(len(prompt) + 4)
        _, chosen = route_prompt(model, torch.tensor([prompt]), cache, MuMoE(0.5))
        experts = mumoe.decode_experts(chosen, path)
        logits[path] = torch.cat([model(torch.tensor([[t]]), experts, cache) for t in (5, 17, 9, 40)], dim=1)
    assert (logits["packed"] - logits["masked"]).abs().max() < 1e-5, "packed decode moved the logits"


@needs_kernel
def test_lm_harness_loglikelihoods_packed_equal_masked(tmp_path):
    pytest.importorskip("lm_eval")
    from lm_harness import HarnessLM

    class Tokenizer:  # HarnessLM reads what the tokenizer puts before any text; the requests here are token ids
        def encode(self, text):
            return [0]

    model = tiny_opt()
    gen = torch.Generator().manual_seed(5)
    context = torch.randint(3, 128, (10,), generator=gen).tolist()
    requests = [(None, context, torch.randint(3, 128, (n,), generator=gen).tolist()) for n in (1, 3, 6, 4, 2)]
    scores = {}
    for decode in ("masked", "packed"):
        lm = HarnessLM(model, Tokenizer(), batch_size=2, moe=MuMoE(0.5), decode=decode)
        assert lm.decode_path == decode
        scores[decode] = [logprob for logprob, _ in lm._loglikelihood_tokens(requests)]
    assert torch.allclose(torch.tensor(scores["packed"]), torch.tensor(scores["masked"]), HARNESS_RTOL, HARNESS_ATOL), (
        f"log-likelihoods packed {scores['packed']} vs masked {scores['masked']}")


# -----------------------------------------------------------------------------
# Where the kernel cannot run: the masked product, said; `packed` asked for: one clear error


def test_auto_falls_back_to_masked_with_the_same_tokens(tiny_models, monkeypatch):
    model, prompt = tiny_models["opt"]
    masked = generate(model, prompt, 12, MuMoE(0.5), decode="masked")
    monkeypatch.setattr(packed_experts, "compiled_kernel", lambda *flags: (None, "no C compiler found (test)"))
    assert decode_path("auto", "cpu", torch.float32) == "masked"
    monkeypatch.setattr(mumoe, "pack", None)  # the fallback must not touch the packed form at all
    monkeypatch.setattr(mumoe, "route_and_pack", None)
    assert generate(model, prompt, 12, MuMoE(0.5), decode="auto") == masked
    with pytest.raises(UsageError, match="--decode packed cannot run here: no C compiler found"):
        generate(model, prompt, 12, MuMoE(0.5), decode="packed")


@pytest.mark.parametrize("device, dtype, reason", [
    ("cuda", torch.float32, "on CUDA is triton_experts': triton is not installed"),
    ("cpu", torch.bfloat16, "serves float32 weights, not bfloat16"),
])
def test_packed_is_refused_where_it_cannot_run(device, dtype, reason, monkeypatch):
    import triton_experts

    monkeypatch.setattr(triton_experts, "TRITON_MISSING", "triton is not installed (test)")  # CUDA's kernel
    assert decode_path("auto", device, dtype) == "masked"
    with pytest.raises(UsageError, match=reason):
        decode_path("packed", device, dtype)
    with pytest.raises(UsageError, match="decode must be one of"):
        decode_path("sparse", device, dtype)


@pytest.mark.parametrize("compiler, reason", [("/nonexistent/cc", "no C compiler found"),
                                              ("false", "did not compile with false")])
def test_missing_or_failing_compiler_is_one_line(tmp_path, compiler, reason):
    """A machine without a compiler, or one whose build fails: the reason in one line, nothing raised; the
    compiler's whole output is kept in a log the line names."""
    code = "import packed_experts; print(packed_experts.kernel_problem())"
    env = {**os.environ, "CC": compiler, "MUMOE_CACHE": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0 and reason in run.stdout and len(run.stdout.splitlines()) == 1, run.stdout + run.stderr
    if compiler == "false":
        assert (tmp_path / "packed_experts-build.log").read_text().startswith("false "), "the build log is missing"


def test_a_compile_error_names_the_file_and_line(tmp_path, monkeypatch):
    """A broken source: the one line gives the compiler's first error, at its file and line in packed_experts.c."""
    source = tmp_path / "packed_experts.c"
    source.write_text(packed_experts.KERNEL_SOURCE.read_text() + "\nthis is not C;\n")
    monkeypatch.setattr(packed_experts, "KERNEL_SOURCE", source)
    monkeypatch.setattr(packed_experts, "CACHE_DIR", tmp_path / "cache")
    lib, problem = packed_experts.build.__wrapped__()
    lines = len(source.read_text().splitlines())
    assert lib is None and f"packed_experts.c:{lines}:" in problem and "error" in problem, problem
