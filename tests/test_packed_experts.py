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
from checkpoint import dense_linear
from mumoe import MuMoE, decode_path, generate, route_prompt
from packed_experts import GROUP, ROWS, TOKENS_PER_PASS, decode_linear, pack, packed_linear, streamed_linear, unpack
from kit.tiny_models import decoding_models, decoding_opt

REPO = Path(__file__).resolve().parent.parent
PROBLEM = packed_experts.kernel_problem()
needs_kernel = pytest.mark.skipif(PROBLEM is not None, reason=f"the packed kernel cannot run here: {PROBLEM}")
AVX512 = "avx512f" in packed_experts.cpu_flags().split()
# The AVX2 path built on this CPU too, by turning AVX-512 off (a user's CPU may have AVX2 only)
BUILDS = [(), ("-mno-avx512f",)] if AVX512 else [()]

# Each output is a dot product of up to d_in terms summed in another order than F.linear's: measured on the shapes
# below, |packed - masked| <= 1.3e-7 · sum_j |x_j W_ij| (fp32 epsilon is 6e-8), and the streamed dense product's
# |streamed - F.linear| <= 2.0e-7 of sum_j |x_j W_ij| + |b_i| (1 to 4 tokens, the shapes of its tests and up to
# 130 x 1536; both builds, 1 and 2 threads, and with ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2): 1e-6
# leaves 5x. A bug moves an output by a term.
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
    """y against F.linear(x, W ⊙ M, bias), each output's error measured against sum_j |x_j W_ij| + |b_i|."""
    expected = F.linear(x, W_gated, bias)
    scale = F.linear(x.abs(), W_gated.abs(), None if bias is None else bias.abs()) + 1e-30
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
# The dense product of a few tokens (streamed_linear), against F.linear

STREAMED_SHAPES = [  # (d_out, d_in)
    (1, 1),
    (3, 7),       # fewer rows than a block (4), fewer columns than AVX2's 8
    (5, 16),      # one whole AVX-512 vector; one row past the block
    (7, 17),      # a tail of 1 column, 3 rows past the block
    (13, 37),     # a tail of 5 columns (AVX2: of 5 after 4 vectors of 8)
    (67, 577),    # many blocks, taken by both threads in runs; a tail of 1 column
    (1031, 96),   # runs of many blocks (CHUNK_BYTES over 4 rows of 96); 3 rows past the last block
]


@needs_kernel
@pytest.mark.parametrize("build", BUILDS, ids=lambda flags: "avx2" if flags else "native")
@pytest.mark.parametrize("d_out, d_in", STREAMED_SHAPES)
@pytest.mark.parametrize("T", range(1, TOKENS_PER_PASS + 1))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
def test_streamed_product_equals_linear(build, d_out, d_in, T, bias, threads, monkeypatch):
    monkeypatch.setattr(packed_experts, "compiled_kernel", lambda: packed_experts.build(build))
    generator = torch.Generator().manual_seed(d_out * d_in + T)
    W = torch.randn(d_out, d_in, generator=generator)
    b = torch.randn(d_out, generator=generator) if bias else None
    x = torch.randn(T, d_in, generator=generator)
    assert_product_close(streamed_linear(x, W, b), x, W, b, f"streamed {build or 'native'}, T={T}")
    if T <= 2:  # (B, T, d_in): the tokens of every sequence, as a decode step of a batch hands them over
        x = torch.randn(2, T, d_in, generator=generator)
        assert_product_close(streamed_linear(x, W, b), x, W, b, f"streamed, batch of 2 x {T} tokens")


@needs_kernel
@pytest.mark.parametrize("threads", [2], indirect=True, ids=["2 threads"])
def test_two_threads_each_sum_their_own_rows(threads):
    """Many short rows, 4 tokens, 2 threads taking runs of blocks side by side: a partial sum that the threads share
    instead of each holding its own is overwritten by the other thread (planted, it failed every run)."""
    generator = torch.Generator().manual_seed(7)
    W, b, x = (torch.randn(40_000, 16, generator=generator), torch.randn(40_000, generator=generator),
               torch.randn(TOKENS_PER_PASS, 16, generator=generator))
    for attempt in range(3):
        assert_product_close(streamed_linear(x, W, b), x, W, b, f"2 threads, attempt {attempt}")


@needs_kernel
def test_streamed_product_under_avx2_aten_equals_linear():
    """A CPU with AVX2 only: the kernel's AVX2 build against F.linear as torch and MKL compute it there
    (ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2), in a fresh process, 1 and 2 threads."""
    code = f"""
import torch, torch.nn.functional as F
import packed_experts
packed_experts.compiled_kernel = lambda: packed_experts.build(("-mno-avx512f",) if {AVX512} else ())
worst = 0.0
for threads in (1, 2):
    torch.set_num_threads(threads)
    for d_out, d_in in {STREAMED_SHAPES}:
        for T in range(1, {TOKENS_PER_PASS} + 1):
            g = torch.Generator().manual_seed(d_out + d_in + T)
            W, b = torch.randn(d_out, d_in, generator=g), torch.randn(d_out, generator=g)
            x = torch.randn(T, d_in, generator=g)
            error = (packed_experts.streamed_linear(x, W, b) - F.linear(x, W, b)).abs()
            worst = max(worst, (error / F.linear(x.abs(), W.abs(), b.abs())).max().item())
print(torch.backends.cpu.get_cpu_capability(), worst)
"""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    capability, worst = run.stdout.split()
    assert capability == "AVX2", f"torch ran with {capability}, not AVX2"
    assert float(worst) <= PRODUCT_RTOL, f"AVX2: error {float(worst):.2e} of sum |x W| + |b| (bound {PRODUCT_RTOL})"


@needs_kernel
def test_the_streamed_boundary_refuses_what_it_would_misread():
    """C reads raw pointers: a float64 x or W, a tensor of the wrong width, a W whose rows are not where its shape
    says (a transposed view), a bias of the wrong length, or more tokens than one pass: each a clear error."""
    W, x = torch.randn(8, 32), torch.randn(2, 32)
    for x_, W_, b, what in [(x.double(), W, None, "float32"), (x, W.double(), None, "float32"),
                            (torch.randn(2, 16), W, None, "features"), (x, torch.randn(32, 8).t(), None, "contiguous"),
                            (x, W[0], None, "dimensions"), (x, W, torch.zeros(7), r"\(8,\) tensor"),
                            (torch.randn(TOKENS_PER_PASS + 1, 32), W, None, "1 to 4 tokens")]:
        with pytest.raises(ValueError, match=what):
            streamed_linear(x_, W_, b)


def counting(monkeypatch) -> list:
    """The shapes of x that packed_experts.streamed_linear is called with from here on."""
    calls, kernel = [], packed_experts.streamed_linear
    monkeypatch.setattr(packed_experts, "streamed_linear",
                        lambda x, W, b=None: calls.append(x.shape) or kernel(x, W, b))
    return calls


@needs_kernel
def test_decode_linear_streams_few_float32_tokens_only(monkeypatch):
    """decode_linear takes the kernel for 1 to TOKENS_PER_PASS float32 CPU tokens, and the Linear itself for more
    tokens, another dtype, or where the kernel cannot run: the same numbers either way."""
    layer = torch.nn.Linear(40, 12).requires_grad_(False)
    calls = counting(monkeypatch)
    for shape in [(1, 1, 40), (1, TOKENS_PER_PASS, 40), (2, 2, 40), (1, TOKENS_PER_PASS + 1, 40)]:
        x = torch.randn(shape)
        assert_product_close(decode_linear(layer, x), x, layer.weight, layer.bias, f"decode_linear, x {shape}")
    assert calls == [(1, 1, 40), (1, TOKENS_PER_PASS, 40), (2, 2, 40)], f"the kernel ran for {calls}"
    half = torch.nn.Linear(40, 12).to(torch.bfloat16)
    assert decode_linear(half, torch.randn(1, 1, 40, dtype=torch.bfloat16)).dtype == torch.bfloat16
    monkeypatch.setattr(packed_experts, "compiled_kernel", lambda *flags: (None, "no C compiler found (test)"))
    x = torch.randn(1, 1, 40)
    assert torch.equal(decode_linear(layer, x), layer(x)), "the fallback is the Linear itself"
    assert len(calls) == 3, "the kernel ran where it cannot"


# -----------------------------------------------------------------------------
# Decoding with packed experts: generation and lm_harness, against the masked W ⊙ M


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return decoding_models(tmp_path_factory.mktemp)


@needs_kernel
@pytest.mark.parametrize("name", ["opt", "llama (GQA)", "llava"])
@pytest.mark.parametrize("rho, nm, routing", [(0.5, None, "block"), (0.4, None, "linear"), (1.0, (2, 4), "block")])
def test_greedy_generation_packed_equals_masked(tiny_models, name, rho, nm, routing, monkeypatch):
    model, prompt = tiny_models[name]
    timings, products = {}, []
    masked = generate(model, prompt, 16, MuMoE(rho, routing=routing, nm=nm), decode="masked")
    fused = generate(model, prompt, 16, MuMoE(rho, routing=routing, nm=nm), decode="packed")  # decode_step.py's
    assert fused == masked, f"{name}: packed decode, fused steps {fused} vs masked {masked}"
    monkeypatch.setattr(mumoe, "packed_linear", lambda x, P: products.append(x.shape) or packed_linear(x, P))
    packed = generate(model, prompt, 16, MuMoE(rho, routing=routing, nm=nm), decode="packed", timings=timings,
                      step="eager")  # the model's forward, each Linear through packed_linear
    assert packed == masked, f"{name}: packed decode, eager steps {packed} vs masked {masked}"
    linears, blocks = sum(len(block.linears()) for block in model.blocks), len(model.blocks)
    # the first step: one product per Linear; then q/k/v and gate/up (fc1 alone in OPT) as one each: 4 products
    # per block and step, OPT and LLaMA alike
    assert len(products) == linears + 14 * 4 * blocks, (
        f"{len(products)} packed products for 15 steps of {linears} Linears in {blocks} blocks")
    assert len(set(masked)) > 2, f"{name}: a degenerate test, the tokens repeat: {masked}"
    assert set(timings) == {"prompt", "pack", "decode", "experts_bytes", "step"}, timings


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

    model = decoding_opt()
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


@needs_kernel
@pytest.mark.parametrize("name", ["opt", "llama (GQA)", "llava"])
def test_dense_decode_streams_every_product_with_eager_tokens(tiny_models, name, monkeypatch):
    """The dense model's decode: every block Linear and lm_head of each step through the streamed kernel, the greedy
    tokens those of eager F.linear (the kernel made unavailable: decode_linear's fallback), each step's logits within
    1e-5 of eager's."""
    model, prompt = tiny_models[name]
    calls = counting(monkeypatch)
    streamed = generate(model, prompt, 16, step="eager")  # the model's forward, each Linear through decode_linear
    linears = sum(len(block.linears()) for block in model.blocks)
    assert len(calls) == 1 + 15 * (linears + 1), (  # the first token's head, then every Linear and the head a step
        f"{len(calls)} streamed products for 15 steps of {linears} Linears and lm_head")
    assert all(shape[:-1] == (1, 1) for shape in calls), f"products of more than one token: {set(calls)}"
    steps = {}
    for linear in (decode_linear, dense_linear):
        cache = model.new_cache(30)
        route_prompt(model, torch.tensor([[3, 8, 13, 21]]), cache, MuMoE(1.0))
        steps[linear] = torch.cat([model(torch.tensor([[t]]), linear, cache, linear) for t in (5, 17, 9, 40)], dim=1)
    assert (steps[decode_linear] - steps[dense_linear]).abs().max() < 1e-5, "the streamed decode moved the logits"
    before = len(calls)
    monkeypatch.setattr(packed_experts, "compiled_kernel", lambda *flags: (None, "no C compiler found (test)"))
    eager = generate(model, prompt, 16)
    assert streamed == eager, f"{name}: streamed decode {streamed} vs eager {eager}"
    assert len(set(eager)) > 2, f"{name}: a degenerate test, the tokens repeat: {eager}"
    assert len(calls) == before, "the kernel ran where it cannot"


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
    """A broken source: the one line gives the compiler's first error, at its file and line in decode_step.c."""
    source = tmp_path / "decode_step.c"
    source.write_text(packed_experts.KERNEL_SOURCE.read_text() + "\nthis is not C;\n")
    monkeypatch.setattr(packed_experts, "KERNEL_SOURCE", source)
    monkeypatch.setattr(packed_experts, "CACHE_DIR", tmp_path / "cache")
    lib, problem = packed_experts.build.__wrapped__()
    lines = len(source.read_text().splitlines())
    assert lib is None and f"decode_step.c:{lines}:" in problem and "error" in problem, problem
