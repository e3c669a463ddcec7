"""A prompt's micro-experts packed on CUDA, and the Triton decode kernel that reads only them: y = x (W ⊙ M)^T + b.

packed_experts.py does this on the CPU in float32 with a compiled C kernel; this file is its GPU sibling, in the
model's own dtype (float16, bfloat16 or float32). After μ-MoE routes a prompt (mumoe.route_prompt) every later
token multiplies the same W ⊙ M, and a decode step reads every weight once: it is bound by the bytes it reads.
Packed, only the kept weights are read, with one mask bit per weight saying where each one goes.

Layout. Rows go in blocks of ROWS = 16 (the last block padded with empty rows), columns in groups of GROUP = 32
(the last group padded with pruned columns), so that a block's mask for one group is ROWS words of 32 bits:

    bits    (blocks, groups, ROWS) int32     bits[b, g, r] bit j  =  M[ROWS·b + r, GROUP·g + j]
    values  (nnz,) the model's dtype         the kept W_ij in stream order: block by block, in a block group by
                                             group, in a group row by row, in a row columns ascending
    starts  (blocks + 1,) int64              block b's values are values[starts[b] : starts[b + 1]]

                group 0 (32 columns)   group 1 (32 columns)     values of block b, one stream:
              +----------------------+----------------------+
      row 0   | 1001101. bits[b,0,0] | 0110... bits[b,1,0]  |    [ row 0's kept in group 0,
      row 1   | 0110010. bits[b,0,1] | 1100... bits[b,1,1]  |      row 1's kept in group 0, ...,
      ...     |                      |                      |      row 15's kept in group 0,
      row 15  | ...     bits[b,0,15] | ...    bits[b,1,15]  |      row 0's kept in group 1, ... ]
              +----------------------+----------------------+

so a weight costs 1/8 byte of mask and, if kept, its value's bytes: a step reads rho · 2 + 1/8 bytes per weight in
float16 instead of 2 (0.56 of dense at rho 0.5), rho · 4 + 1/8 in float32. A block's values for one group are one
contiguous run that its program reads at once; the starts add 8 bytes per 16 rows.

The kernel: one program per row block (and per TOKENS tokens of the input), walking the block's groups in order.
For a group, each row's word is unpacked into GROUP bits; a running sum of the bits along the row gives each kept
weight's place among the row's kept ones, the rows' kept counts before it (a running sum down the rows) its row's
place in the group's run, and the run begins where the previous group's ended:

    keep_rj  = bits[b, g, r] >> j & 1                                  (ROWS, GROUP)
    w_rj     = values[p + sum_{r' < r} count_r' + sum_{j' <= j} keep_rj' - 1]   where keep_rj, else 0
    acc_tr  += sum_j x[t, GROUP·g + j] · w_rj                          in float32
    p       += sum_r count_r
    y[t, i]  = acc_ti + b_i                                            in x's dtype

On CPU tensors the same kernel runs through Triton's interpreter (what the tests do on machines without a GPU):
slow, for correctness only. The kernel calls Triton builtins only (tl.reduce and tl.associative_scan with tl.sum's
combine function, not tl.sum and tl.cumsum, which are themselves jitted), so the interpreter needs no
TRITON_INTERPRET in the environment before triton is imported: a process that imported triton first runs it too.

    pack(W_gated, bias, keep)          W ⊙ M (d_out, d_in) on its device -> PackedLinear, in W's dtype
    packed_bytes(d_out, d_in, kept, dtype)  what that costs (the bytes a decode step reads of it)
    packed_linear(x, packed)           the kernel: x (..., d_in) -> (..., d_out)
    packed_linear_reference(x, packed) the same product in plain PyTorch from the packed form (unpack: W ⊙ M back)
    kernel_problem(device, dtype)      None where the kernel runs (CUDA with triton), else why not, in one line

Triton is an optional dependency (it comes with CUDA builds of torch on Linux): without it this file still
imports, `kernel_problem` says so, and μ-MoE decodes with the masked product (mumoe.decode_path).
"""

from __future__ import annotations  # the kernel's `tl.constexpr` annotations are read as text, triton or not

from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    TRITON_MISSING = None
except ImportError as e:  # a CPU install: the kernel below is never launched
    triton = tl = None
    TRITON_MISSING = f"triton is not installed ({e}); it comes with CUDA builds of torch on Linux"

ROWS = 16  # rows per block: one program's rows, their words read together
GROUP = 32  # columns per mask word: one int32 of bits per row and group
TOKENS_PER_PASS = 4  # tokens that share each loaded weight in one program: a continuation's few tokens
DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the values' dtype is the model's; sums are float32


def jit(fn):
    """triton.jit where triton is installed; the plain function (never launched) where it is not."""
    return triton.jit(fn) if triton is not None else fn


# a + b: tl.sum's own combine function, which the kernel's sums and running sums (tl.reduce, tl.associative_scan)
# take. Triton's interpreter recognizes this one and sums with numpy; any other it calls element by element.
add = tl.standard._sum_combine if tl is not None else None


# -----------------------------------------------------------------------------
# The packed form


@dataclass(frozen=True)
class PackedLinear:
    """One Linear's experts for one prompt, W ⊙ M packed on its device (the layout in the module's docstring)."""
    bits: torch.Tensor     # (blocks, groups, ROWS) int32
    values: torch.Tensor   # (nnz,) the model's dtype
    starts: torch.Tensor   # (blocks + 1,) int64
    d_out: int
    d_in: int
    bias: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        """Bytes of the packed experts (what a decode step reads of them), the bias (the model's own) excluded."""
        return sum(t.numel() * t.element_size() for t in (self.bits, self.values, self.starts))


def packed_bytes(d_out: int, d_in: int, kept: int, dtype: torch.dtype) -> int:
    """The bytes `pack` makes of a (d_out, d_in) W ⊙ M of `dtype` that keeps `kept` weights per row."""
    blocks, groups = -(-d_out // ROWS), -(-d_in // GROUP)
    value_bytes = torch.empty((), dtype=dtype).element_size()
    return blocks * groups * ROWS * 4 + d_out * kept * value_bytes + (blocks + 1) * 8  # bits, values, starts


def pack(W_gated: torch.Tensor, bias: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> PackedLinear:
    """W ⊙ M (d_out, d_in) -> its packed form, on W's device, in W's dtype. `keep` (bool, W's shape) is the mask M;
    without it a weight is kept where W ⊙ M is nonzero (a kept weight that is exactly 0 adds nothing either way).
    Memory beside W ⊙ M while packing: its mask and, if a dimension is not a multiple of ROWS or GROUP, one padded
    copy of it; kept is the packed form only."""
    if W_gated.ndim != 2:
        raise ValueError(f"W ⊙ M must be (d_out, d_in), got shape {tuple(W_gated.shape)}")
    if W_gated.dtype not in DTYPES:
        raise ValueError(f"packed experts hold {DTYPES} values, not {W_gated.dtype}")
    keep = W_gated != 0 if keep is None else keep
    if keep.shape != W_gated.shape or keep.dtype != torch.bool or keep.device != W_gated.device:
        raise ValueError(f"the mask must be bool of W's shape {tuple(W_gated.shape)} on {W_gated.device}, got "
                         f"{keep.dtype} {tuple(keep.shape)} on {keep.device}")
    d_out, d_in = W_gated.shape
    blocks, groups = -(-d_out // ROWS), -(-d_in // GROUP)
    pad = (0, groups * GROUP - d_in, 0, blocks * ROWS - d_out)  # F.pad's order: last dimension first
    stream_order = (blocks, ROWS, groups, GROUP)  # then (block, group, row, column): the stream's order
    keep = F.pad(keep, pad).view(stream_order).transpose(1, 2)
    W_stream = F.pad(W_gated.detach(), pad).view(stream_order).transpose(1, 2)
    values = W_stream[keep]  # (nnz,): boolean indexing walks (block, group, row, column) in order
    place = torch.arange(GROUP, device=W_gated.device, dtype=torch.int64)
    words = (keep.to(torch.int64) << place).sum(dim=-1)  # (blocks, groups, ROWS) in [0, 2^32)
    bits = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)  # the same 32 bits, signed
    counts = keep.sum(dim=(1, 2, 3))  # (blocks,)
    starts = F.pad(counts.cumsum(dim=0), (1, 0))  # (blocks + 1,): block b's values begin at starts[b]
    return PackedLinear(bits.contiguous(), values, starts, d_out, d_in, bias)


def unpack(packed: PackedLinear) -> torch.Tensor:
    """The packed form -> W ⊙ M (d_out, d_in), in plain PyTorch (the reference and the tests read it)."""
    blocks, groups = packed.bits.shape[:2]
    place = torch.arange(GROUP, device=packed.bits.device, dtype=torch.int32)
    keep = (packed.bits[..., None] >> place & 1).bool()  # (block, group, row, column): the stream's order
    W_stream = torch.zeros(keep.shape, dtype=packed.values.dtype, device=packed.values.device)
    W_stream[keep] = packed.values
    return W_stream.transpose(1, 2).reshape(blocks * ROWS, groups * GROUP)[: packed.d_out, : packed.d_in]


def packed_linear_reference(x: torch.Tensor, packed: PackedLinear) -> torch.Tensor:
    """x (..., d_in) -> x (W ⊙ M)^T + b in float32 from the packed form, rounded to x's dtype as the kernel does."""
    bias = packed.bias.float() if packed.bias is not None else None
    return F.linear(x.float(), unpack(packed).float(), bias).to(x.dtype)


# -----------------------------------------------------------------------------
# The kernel


@jit
def packed_linear_kernel(x_ptr, bits_ptr, values_ptr, starts_ptr, bias_ptr, y_ptr, n, d_in, d_out, groups,
                         HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, GROUP: tl.constexpr, TOKENS: tl.constexpr):
    """y[t, i] = sum_j x[t, j] (W ⊙ M)_ij + b_i for the ROWS rows of block program_id(0) and the TOKENS tokens of
    pass program_id(1), reading the block's packed values group by group (the layout in the module's docstring)."""
    block = tl.program_id(0)
    tokens = tl.program_id(1) * TOKENS + tl.arange(0, TOKENS)  # (TOKENS,)
    rows = tl.arange(0, ROWS)
    columns = tl.arange(0, GROUP)
    p = tl.load(starts_ptr + block)  # int64: where the block's next group's run of values begins
    acc = tl.full((TOKENS, ROWS), 0.0, tl.float32)
    for g in range(0, groups):
        words = tl.load(bits_ptr + (block * groups + g) * ROWS + rows)  # (ROWS,) int32
        keep = (words[:, None] >> columns[None, :]) & 1  # (ROWS, GROUP)
        counts = tl.reduce(keep, 1, add)  # (ROWS,): each row's kept weights in this group
        row_start = tl.associative_scan(counts, 0, add) - counts  # the rows before it: its place in the run
        place = p + row_start[:, None] + tl.associative_scan(keep, 1, add) - 1  # (ROWS, GROUP)
        w = tl.load(values_ptr + place, mask=keep != 0, other=0.0).to(tl.float32)
        j = g * GROUP + columns
        x = tl.load(x_ptr + tokens[:, None] * d_in + j[None, :], mask=(tokens[:, None] < n) & (j[None, :] < d_in),
                    other=0.0).to(tl.float32)  # (TOKENS, GROUP)
        acc += tl.reduce(x[:, None, :] * w[None, :, :], 2, add)  # (TOKENS, ROWS)
        p += tl.reduce(counts, 0, add)
    i = block * ROWS + rows
    if HAS_BIAS:
        acc += tl.load(bias_ptr + i, mask=i < d_out, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + tokens[:, None] * d_out + i[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(tokens[:, None] < n) & (i[None, :] < d_out))


@cache
def interpreted_kernel():
    """The kernel run by Triton's interpreter, for CPU tensors (the tests on machines without a GPU)."""
    from triton.runtime.interpreter import InterpretedFunction
    return InterpretedFunction(getattr(packed_linear_kernel, "fn", packed_linear_kernel))


def kernel_problem(device=None, dtype=torch.float16) -> str | None:
    """None where the Triton kernel serves weights on `device` of `dtype`; otherwise one line saying why not."""
    if TRITON_MISSING is not None:
        return TRITON_MISSING
    if device is not None and torch.device(device).type != "cuda":
        return f"the Triton kernel runs on CUDA, not on {torch.device(device).type}"
    if not torch.cuda.is_available():
        return "CUDA is not available to this torch"
    if dtype not in DTYPES:
        return f"the Triton kernel serves {DTYPES} weights, not {dtype}"
    return None


def packed_linear(x: torch.Tensor, packed: PackedLinear) -> torch.Tensor:
    """x (..., d_in) -> x (W ⊙ M)^T + b (..., d_out) in x's dtype, reading only the packed experts (float32 sums).
    CUDA tensors run the compiled kernel, CPU tensors Triton's interpreter."""
    if TRITON_MISSING is not None:
        raise RuntimeError(TRITON_MISSING)
    if x.shape[-1] != packed.d_in:
        raise ValueError(f"x has {x.shape[-1]} features, the packed experts {packed.d_in}")
    if x.dtype != packed.values.dtype:
        raise ValueError(f"x is {x.dtype}, the packed experts {packed.values.dtype}")
    parts = [packed.bits, packed.values, packed.starts] + ([packed.bias] if packed.bias is not None else [])
    if any(t.device != x.device for t in parts):
        raise ValueError(f"x is on {x.device}, the packed experts on {[str(t.device) for t in parts]}")
    if not all(t.is_contiguous() for t in parts):
        raise ValueError("the packed experts' tensors must be contiguous")
    if packed.bits.dtype != torch.int32 or packed.starts.dtype != torch.int64:
        raise ValueError(f"bits must be int32 and starts int64, got {packed.bits.dtype} and {packed.starts.dtype}")
    shape = x.shape
    x = x.reshape(-1, packed.d_in).contiguous()  # (n, d_in): every token of the batch shares these experts
    n, blocks, groups = x.shape[0], packed.bits.shape[0], packed.bits.shape[1]
    y = torch.empty(n, packed.d_out, dtype=x.dtype, device=x.device)
    tokens = min(TOKENS_PER_PASS, triton.next_power_of_2(n))  # tl.arange takes powers of 2
    kernel = packed_linear_kernel if x.is_cuda else interpreted_kernel()
    bias = packed.bias if packed.bias is not None else y  # never read without HAS_BIAS
    kernel[(blocks, -(-n // tokens))](x, packed.bits, packed.values, packed.starts, bias, y, n, packed.d_in,
                                      packed.d_out, groups, HAS_BIAS=packed.bias is not None, ROWS=ROWS,
                                      GROUP=GROUP, TOKENS=tokens)
    return y.reshape(*shape[:-1], packed.d_out)
