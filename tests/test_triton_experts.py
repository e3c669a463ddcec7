"""Tests for triton_experts (a prompt's experts packed for CUDA, the Triton decode kernel) and μ-MoE's use of it.

References: the masked product F.linear(x, W ⊙ M, b) that μ-MoE's gate computes, in the model's dtype, and
triton_experts' plain-PyTorch reference of the packed product; greedy generation with the masked W ⊙ M
(decode="masked"). Without a GPU the kernel runs on CPU tensors through Triton's interpreter (the kernel calls
builtins only, so no TRITON_INTERPRET is needed, even after another module imported triton); on a GPU the same
tests run the compiled kernel on CUDA (marked `cuda`: benchmarks/gpu_check.py runs them). Where triton is not
installed (a CPU install) the file skips and says why. Tiny random models (kit.tiny_models' LLaMA and LLaVA, an OPT
built here): nothing is downloaded.
"""

import weakref

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed (an optional GPU dependency; pip install triton)")

import mumoe  # noqa: E402
import packed_experts  # noqa: E402
import pruners  # noqa: E402
import triton_experts  # noqa: E402
from checkpoint import UsageError  # noqa: E402
from mumoe import MuMoE, decode_path, generate, route_prompt  # noqa: E402
from kit.tiny_models import decoding_models, decoding_opt  # noqa: E402
from triton_experts import GROUP, ROWS, pack, packed_linear, packed_linear_reference, unpack  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: Triton's interpreter
DTYPES = [torch.float16, torch.bfloat16, torch.float32]

# Each output against the masked product summed in float32 and rounded to the dtype once: the kernel does the same
# in another order, so the two may differ by one ulp of the dtype where their sums fall on either side of a rounding
# boundary, plus float32's reordering, FP32_ORDER · (sum_j |x_j W_ij| + |b_i|) (fp32 epsilon is 6e-8). Measured
# through the interpreter on the shapes below, a (64, 1000) one, 3 seeds, ATen default and AVX2, 1 and 2 threads:
# 0.99 of that allowance in float16, 1.0 in bfloat16, 0.49 in float32. Bound: 2 (the GPU's sums go in another order
# again). Rounding each group's partial sum to the dtype (no float32 accumulation) measured 145 in float16 and 3275
# in bfloat16; a wrong weight moves an output by a whole term x_j W_ij.
FP32_ORDER = 2.5e-7
BOUND = 2.0


def routed(W: torch.Tensor, rho: float, nm=None, seed=0, tied=False) -> torch.Tensor:
    """W ⊙ M with Wanda's mask on random input norms (μ-MoE's router); `tied`: every score of a row ties."""
    norms = torch.rand(W.shape[1], generator=torch.Generator().manual_seed(seed)) + 0.1
    if tied:
        W, norms = W.sign() * 0.5, torch.ones_like(norms)  # |W_ij| · ||X_j|| equal everywhere: ties to the lower index
    return pruners.wanda_gated_weight(W, norms, rho, "sort", nm)


def worst_error(y: torch.Tensor, x: torch.Tensor, W_gated: torch.Tensor, bias) -> float:
    """max over outputs of |y - e| / (one ulp of the dtype at e + FP32_ORDER · (sum_j |x_j W_ij| + |b_i|)), e the
    masked product x (W ⊙ M)^T + b summed in float32 and rounded to the dtype once, as the kernel promises (a GPU's
    float16 GEMM may reduce in float16): at most 1 where the two differ by their roundings only."""
    expected = F.linear(x.float(), W_gated.float(), bias.float() if bias is not None else None).to(x.dtype).float()
    scale = F.linear(x.abs().float(), W_gated.abs().float()) + (bias.abs().float() if bias is not None else 0)
    finfo = torch.finfo(x.dtype)
    ulp = finfo.eps * torch.exp2(torch.floor(torch.log2(expected.abs().clamp_min(finfo.tiny))))
    assert y.shape == expected.shape and y.dtype == x.dtype, f"{tuple(y.shape)} {y.dtype}, expected {expected.shape}"
    return ((y.float() - expected).abs() / (ulp + FP32_ORDER * scale)).max().item()


# -----------------------------------------------------------------------------
# The packed form


def test_packed_layout_is_the_documented_one():
    """Blocks of ROWS rows, groups of GROUP columns: bits[b, g, r] bit j is M[ROWS b + r, GROUP g + j]; values in
    (block, group, row, column) order; starts: where each block begins. Built here by loops, as the docstring says."""
    d_out, d_in = 20, 70  # 2 blocks (the second with 12 padding rows), 3 groups (the last with 26 padding columns)
    W_gated = routed(torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(1)), 0.5).half()
    packed = pack(W_gated)
    blocks, groups = 2, 3
    bits, values, starts = torch.zeros(blocks, groups, ROWS, dtype=torch.int64), [], [0]
    for b in range(blocks):
        for g in range(groups):
            for r in range(ROWS):
                for j in range(GROUP):
                    i, column = b * ROWS + r, g * GROUP + j
                    if i < d_out and column < d_in and W_gated[i, column] != 0:
                        bits[b, g, r] |= 1 << j
                        values.append(W_gated[i, column])
        starts.append(len(values))
    assert torch.equal(packed.bits.long() & 0xFFFFFFFF, bits), "mask bits differ from the documented ones"
    assert torch.equal(packed.values, torch.stack(values)), "values are not the kept W in (block, group, row) order"
    assert packed.starts.tolist() == starts, f"block starts {packed.starts.tolist()}, expected {starts}"
    assert packed.bits.dtype == torch.int32 and packed.values.dtype == torch.float16, "bits int32, values fp16"
    assert torch.equal(unpack(packed), W_gated), "unpacking does not give W ⊙ M back"


@pytest.mark.parametrize("dtype, per_weight", [(torch.float16, 2), (torch.float32, 4)])
def test_packed_bytes_per_weight(dtype, per_weight):
    """rho · (value bytes) + 1/8 per weight, and packed_bytes says what pack makes."""
    W = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0))
    for rho in (0.6, 0.5, 0.4):
        packed = pack(routed(W, rho).to(dtype))
        limit = (rho * per_weight + 1 / 8) / per_weight
        assert abs(packed.nbytes / (W.numel() * per_weight) - limit) < 0.001, f"rho {rho}: {packed.nbytes} bytes"
        kept = 4096 - pruners.prune_count(4096, rho)
        assert packed.nbytes == triton_experts.packed_bytes(64, 4096, kept, dtype), "packed_bytes disagrees"


# -----------------------------------------------------------------------------
# The kernel, on CUDA where present, else through Triton's interpreter


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("d_out, d_in, rho, nm, tied", [
    (5, 37, 0.5, None, False),      # d_in not a multiple of GROUP, d_out not of ROWS
    (33, 100, 0.4, None, False),    # several blocks and groups, the last of each partial
    (20, 300, 0.5, None, False),    # 10 groups: where partial sums rounded to the dtype would show
    (9, 64, 1 / 64, None, False),   # k = 1: one weight per row
    (18, 50, 1.0, None, False),     # k = d_in: every weight
    (16, 40, 0.5, None, True),      # every score ties: the kept columns are the lowest-index ones
    (7, 48, 0.5, (2, 4), False),    # N:M
])
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
def test_kernel_equals_masked_product(dtype, d_out, d_in, rho, nm, tied, T, bias):
    generator = torch.Generator().manual_seed(d_out * d_in + T)
    W = torch.randn(d_out, d_in, generator=generator)
    b = torch.randn(d_out, generator=generator).to(DEVICE, dtype) if bias else None
    W_gated = routed(W, rho, nm, tied=tied).to(DEVICE, dtype)
    k = d_in - pruners.prune_count(d_in, rho) if nm is None else d_in // nm[1] * (nm[1] - nm[0])
    assert ((W_gated != 0).sum(dim=1) == k).all(), "the test's routing kept another count"
    x = torch.randn(T, d_in, generator=generator).to(DEVICE, dtype)
    packed = pack(W_gated, b)
    assert torch.equal(unpack(packed), W_gated), "packing lost or moved a kept weight"
    reference = worst_error(packed_linear_reference(x, packed), x, W_gated, b)
    assert reference <= BOUND, f"the plain-PyTorch reference is {reference:.2f} ulps + fp32 reordering off"
    y = packed_linear(x, packed)
    error = worst_error(y, x, W_gated, b)
    assert error <= BOUND, (f"{dtype}, T={T}: error {error:.2f} ulps + fp32 reordering (bound {BOUND}); first "
                            f"outputs {y.flatten()[:4].tolist()} vs {F.linear(x, W_gated, b).flatten()[:4].tolist()}")


@pytest.mark.cuda
def test_more_tokens_than_a_pass_and_a_batch_of_sequences():
    """6 tokens: two passes of TOKENS_PER_PASS (the second partial); (3, 2, d_in): continuations sharing experts."""
    generator = torch.Generator().manual_seed(7)
    W_gated = routed(torch.randn(21, 45, generator=generator), 0.5).to(DEVICE)
    b = torch.randn(21, generator=generator).to(DEVICE)
    packed = pack(W_gated, b)
    for x in (torch.randn(6, 45, generator=generator), torch.randn(3, 2, 45, generator=generator)):
        x = x.to(DEVICE)
        error = worst_error(packed_linear(x, packed), x, W_gated, b)
        assert error <= BOUND, f"x {tuple(x.shape)}: error {error:.2f} ulps + fp32 reordering"


def test_boundary_checks_say_what_is_wrong():
    W_gated = routed(torch.randn(40, 40), 0.5)
    packed = pack(W_gated)  # 3 blocks, 2 groups
    strided_bits = packed.bits.transpose(0, 1).contiguous().transpose(0, 1)  # the same values, not contiguous
    cases = [(lambda: packed_linear(torch.randn(1, 41), packed), "x has 41 features, the packed experts 40"),
             (lambda: packed_linear(torch.randn(1, 40).half(), packed), "x is torch.float16, the packed experts"),
             (lambda: packed_linear(torch.randn(1, 40), triton_experts.PackedLinear(
                 strided_bits, packed.values, packed.starts, 40, 40, None)), "must be contiguous"),
             (lambda: packed_linear(torch.randn(1, 40), triton_experts.PackedLinear(
                 packed.bits.long(), packed.values, packed.starts, 40, 40, None)), "bits must be int32"),
             (lambda: pack(W_gated.long()), "packed experts hold"),
             (lambda: pack(W_gated, keep=(W_gated != 0).float()), "the mask must be bool"),
             (lambda: pack(W_gated[0]), "must be (d_out, d_in)")]
    for call, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            call()


# -----------------------------------------------------------------------------
# μ-MoE decoding through the Triton kernel: packed while routing, the masked path's tokens


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return decoding_models(tmp_path_factory.mktemp, DEVICE)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["opt", "llama (GQA)", "llava"])
@pytest.mark.parametrize("rho, nm, routing", [(0.5, None, "block"), (1.0, (2, 4), "linear")])
def test_greedy_generation_triton_equals_masked(tiny_models, name, rho, nm, routing, monkeypatch):
    """generate on the Triton path (decode_path's answer on CUDA, forced here where it is the CPU): the masked
    path's tokens, every later token through the kernel, the prompt's experts held packed (56% of W ⊙ M's bytes)."""
    model, prompt = tiny_models[name]
    moe, new = MuMoE(rho, routing=routing, nm=nm), 8
    masked_timings, timings, products = {}, {}, []
    masked = generate(model, prompt, new, moe, decode="masked", timings=masked_timings)
    kernel = triton_experts.packed_linear
    monkeypatch.setattr(mumoe, "decode_path", lambda *args: "triton")
    monkeypatch.setattr(triton_experts, "packed_linear", lambda x, P: products.append(x.shape) or kernel(x, P))
    assert generate(model, prompt, new, moe, timings=timings) == masked, f"{name}: the Triton path's tokens differ"
    linears = sum(len(block.linears()) for block in model.blocks)
    assert len(products) == (new - 1) * linears, f"{len(products)} Triton products for {new - 1} steps of {linears}"
    assert len(set(masked)) > 2, f"{name}: a degenerate test, the tokens repeat: {masked}"
    held = timings["experts_bytes"] / masked_timings["experts_bytes"]
    assert 0.5 < held < 0.62 and timings["pack"] > 0, f"packed experts hold {held:.2f} of W ⊙ M's bytes, {timings}"


def test_routing_keeps_one_linear_of_gated_weights_at_most(tiny_models, monkeypatch):
    """route_prompt(path="triton"): each Linear's W ⊙ M is packed as soon as it is routed, and when the next one is
    packed no earlier one is alive any more: never a second copy of the model. (The CPU's packed route builds no
    W ⊙ M at all: test_packed_experts.)"""
    model, prompt = tiny_models["llama (GQA)"]
    linears = [layer for block in model.blocks for layer in block.linears().values()]
    alive = []  # a weak reference to each W ⊙ M handed to pack

    def pack_noting(W_gated, bias):
        assert all(ref() is None for ref in alive), f"packing Linear {len(alive)}, an earlier W ⊙ M is still alive"
        alive.append(weakref.ref(W_gated))
        return triton_experts.pack(W_gated, bias)

    monkeypatch.setattr(mumoe, "packer", lambda path: pack_noting)
    cache = model.new_cache(len(prompt))
    _, chosen = route_prompt(model, torch.tensor([prompt], device=DEVICE), cache, MuMoE(0.5), "triton")
    assert len(alive) == len(linears) and all(ref() is None for ref in alive), "a W ⊙ M outlived routing"
    assert not any(torch.is_tensor(e) for experts in chosen.values() for e in experts), "chosen holds a W ⊙ M"


def test_decode_path_answers_triton_on_cuda_where_it_runs(monkeypatch):
    monkeypatch.setattr(triton_experts, "kernel_problem", lambda device, dtype: None)
    assert decode_path("auto", "cuda", torch.float16) == "triton"
    assert decode_path("packed", "cuda", torch.bfloat16) == "triton"
    assert decode_path("masked", "cuda", torch.float16) == "masked"
    monkeypatch.setattr(triton_experts, "kernel_problem", lambda device, dtype: "triton is not installed (test)")
    assert decode_path("auto", "cuda", torch.float16) == "masked"
    with pytest.raises(UsageError, match="--decode packed cannot run here: .*triton is not installed"):
        decode_path("packed", "cuda", torch.float16)


def test_kernel_problem_says_why_not():
    assert "runs on CUDA, not on cpu" in triton_experts.kernel_problem("cpu", torch.float16)
    if torch.cuda.is_available():
        assert triton_experts.kernel_problem("cuda", torch.float16) is None
        assert "not torch.int8" in triton_experts.kernel_problem("cuda", torch.int8)
    else:
        assert triton_experts.kernel_problem("cuda", torch.float16) == "CUDA is not available to this torch"


def test_lm_harness_loglikelihoods_triton_equal_masked():
    """A routed context's continuations scored through the Triton kernel (the context's experts packed while it
    is routed): the masked path's log-likelihoods."""
    pytest.importorskip("lm_eval")
    from lm_harness import HarnessLM

    class Tokenizer:  # HarnessLM reads what the tokenizer puts before any text; the requests here are token ids
        def encode(self, text):
            return [0]

    model = decoding_opt().to(DEVICE)
    gen = torch.Generator().manual_seed(5)
    context = torch.randint(3, 128, (10,), generator=gen).tolist()
    requests = [(None, context, torch.randint(3, 128, (n,), generator=gen).tolist()) for n in (1, 3, 4)]
    scores = {}
    for path in ("masked", "triton"):
        lm = HarnessLM(model, Tokenizer(), batch_size=2, moe=MuMoE(0.5), decode="masked")
        lm.decode_path = path  # decode_path's answer on CUDA, forced here where it is the CPU
        scores[path] = torch.tensor([logprob for logprob, _ in lm._loglikelihood_tokens(requests)])
    # sums of -17 to -47: measured 3.8e-6 (AVX2) and 7.6e-6 (ATen default), 1 to 2 fp32 ulps of a sum near -47
    # (3.8e-6); a bias left out or a wrong weight moves a sum by far more than the 1e-5 + 1e-6 relative allowed
    assert torch.allclose(scores["triton"], scores["masked"], rtol=1e-6, atol=1e-5), scores
