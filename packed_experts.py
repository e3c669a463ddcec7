"""A prompt's micro-experts packed, and the decode kernel that reads only them: y = x (W ⊙ M)^T + b.

After μ-MoE routes a prompt (mumoe.route_prompt), every later token of that prompt multiplies the same gated
weights W ⊙ M. Decoding a token reads every weight once, so a step is bound by the bytes it reads: the dense
W ⊙ M costs 4 bytes per weight (fp32), zeros included. Packed, only the active experts are kept, in one
stream that the kernel reads front to back. Rows go in blocks of ROWS = 4 (the last block padded with empty
rows), columns in groups of GROUP = 16 (the last group padded with pruned columns):

    bits    (blocks, groups · ROWS · 2) uint8   for each block, group by group, each of its ROWS rows' 16 mask
                                                bits as a little-endian uint16: bit j is M_i,16g+j
    values  (nnz + PAD,) float32                in the same order (block, group, row): the kept W_ij of that
                                                row and group, columns ascending; PAD zeros at the end
    starts  (blocks + 1,) int64                 block b's values are values[starts[b] : starts[b + 1]]

so a weight costs 1/8 byte of mask and, if kept, 4 bytes of value: a step reads rho · 4 + 1/8 bytes per
weight instead of 4 (0.53 of dense at rho = 0.5, 0.43 at 0.4). Interleaving a block's rows group by group
makes the block one sequential stream: four separate row streams of a few KB each (short rows, such as
SmolLM2's 576 columns) leave the hardware prefetcher behind once the weights are out of the caches.

The kernel walks a block group by group. A group's 16 mask bits say which columns a row keeps, and AVX-512's
expand puts the next popcount(bits) values of the stream into exactly those lanes (zeros elsewhere), so the
product with x's 16 columns is one fused multiply-add:

    w = expand(values[p:], bits_gr)          p += popcount(bits_gr)          for each row r of the block
    acc_rt += w * x[t, 16 g : 16 g + 16]     for each token t of the pass
    y[t, i] = sum(acc_rt) + b_i

Each load of x serves the block's ROWS rows and each expanded w every token of a pass (up to TOKENS_PER_PASS:
a continuation's few tokens, or the continuations that share one context's experts); blocks are split over
torch's own OpenMP threads. Without AVX-512 (AVX2 only), each group is taken as two halves of 8 columns: the
8 values are loaded, then moved into their lanes by a permutation looked up from the mask byte (a 256-entry
table built once). No gather instruction is used.

Why C through the system compiler, not numba (measured in docs/packed_decode.md): a numba loop over the kept
weights (fp32 values, uint8 column offsets in 256-column tiles, fastmath so that LLVM vectorizes it with
gathers) was slower than the dense product itself on LLaMA-7B's MLP shapes: its gathers and short per-tile loops
are bound by instructions, and numba's own thread pool fights torch's for the cores. The bitmap layout needs
expand (or a byte-indexed permutation), which numba cannot emit, and C compiled with -fopenmp joins the libgomp
that torch has already loaded, so both share one pool of threads. The source,
packed_experts.c beside this file, is compiled once per machine (-march=native) into a cache directory, in one
library with decode_step.c (the fused decode step, which includes it), and loaded with ctypes; the boundary
checks what it hands over (float32, the CPU, the packed width), since C reads raw pointers.

Where the kernel cannot run (no C compiler, a CPU without AVX2, CUDA tensors, a dtype other than float32),
`kernel_problem` says why in one line, and the masked dense product runs instead (mumoe.decode_path).

The same file holds the dense product of a few tokens, y = x W^T + b (streamed_linear): what lm_head and every
Linear of the dense model cost in a decode step is reading W once, and torch's one-token F.linear reads the small
decoder Linears well below the machine's streaming rate (docs/packed_decode.md has the figures). The kernel reads
W front to back in blocks of 4 rows, each loaded vector of W serving every token, the threads taking runs of blocks
as they come. `decode_linear` is the Linear a decode step calls with it (mumoe.generate), F.linear where it
cannot run.

    pack(W_gated, bias)                   W ⊙ M (d_out, d_in) -> PackedLinear (by the compiled kernel too)
    route_and_pack(W, sqnorms, rho, nm)   W and a prompt's input norms -> its experts packed, in one pass: μ-MoE's
                                          scores, exact selection and packing fused, no W ⊙ M built
    route_and_gate(W, sqnorms, rho, nm)   the same selection, W ⊙ M alone: the masked path's experts
    arena_for(floats), values_room(W, ..) one block of memory for a whole prompt's packed values, reused
    packed_bytes(d_out, d_in, kept)       what that costs in memory, and what a decode step reads of it
    packed_linear(x, packed)              the kernel: x (..., d_in) -> (..., d_out)
    concatenate(parts), part(packed, rows) Linears that read one input as one PackedLinear (one call), and back
    unpack(packed)                        the packed form -> W ⊙ M again, in plain PyTorch
    kernel_problem(device, dtype)         None where the kernel runs, else why not
    streamed_linear(x, W, bias)           the dense product of a few tokens, W read once: x (..., d_in) -> (..., d_out)
    decode_linear(layer, x)               checkpoint.dense_linear's drop-in for decoding: streamed_linear where it runs
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from pruners import check_nm, check_rho, prune_count

GROUP = 16  # columns per mask group: one AVX-512 register of float32 (AVX2 takes each half in turn)
ROWS = 4  # rows per block: walked side by side, independent chains of loads and sums, one load of x for all
TOKENS_PER_PASS = 4  # tokens that share each loaded weight: ROWS x TOKENS accumulators of 16 lanes in registers
PAD = GROUP  # zeros after the last value: AVX2's full-width load at the last group stays inside the buffer
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")  # for this CPU; joins torch's OpenMP
CACHE_DIR = Path(os.environ.get("MUMOE_CACHE", Path.home() / ".cache" / "mumoe"))

KERNEL_SOURCE = Path(__file__).with_name("decode_step.c")  # the library's source, read at build time, part of the
PRODUCTS_SOURCE = Path(__file__).with_name("packed_experts.c")  # cache key; it includes this one, the products


# -----------------------------------------------------------------------------
# The packed form


@dataclass(frozen=True)
class PackedLinear:
    """One Linear's experts for one prompt, W ⊙ M packed (the layout in the module's docstring), and its bias."""
    bits: torch.Tensor     # (blocks, groups · ROWS · 2) uint8
    values: torch.Tensor   # (nnz + PAD,) float32
    starts: torch.Tensor   # (blocks + 1,) int64
    d_out: int
    d_in: int
    bias: torch.Tensor | None

    @cached_property
    def pointers(self) -> tuple:
        """What the kernel reads, as the addresses it takes: bits, values, starts, bias (or None), computed once."""
        if self.bias is not None and not self.bias.is_contiguous():
            raise ValueError("the packed experts' bias must be contiguous: the kernel reads it by its address")
        return (self.bits.data_ptr(), self.values.data_ptr(), self.starts.data_ptr(),
                None if self.bias is None else self.bias.data_ptr())

    @property
    def nbytes(self) -> int:
        """Bytes of the packed experts (what a decode step reads of them), the bias excluded."""
        return sum(t.numel() * t.element_size() for t in (self.bits, self.values, self.starts))


def packed_bytes(d_out: int, d_in: int, kept: int) -> int:
    """The bytes `pack` makes of a (d_out, d_in) W ⊙ M that keeps `kept` weights per row (PAD aside)."""
    blocks = -(-d_out // ROWS)
    return blocks * ROWS * -(-d_in // GROUP) * GROUP // 8 + d_out * kept * 4 + (blocks + 1) * 8  # bits, values, starts


def pack(W_gated: torch.Tensor, bias: torch.Tensor | None = None) -> PackedLinear:
    """W ⊙ M (d_out, d_in), float32 on the CPU -> its packed form (by the compiled kernel's two passes over it).
    A weight is kept where W ⊙ M is nonzero: a kept weight that is exactly 0 adds nothing to the product."""
    lib = loaded_kernel()
    check_float32_cpu(W_gated, "W ⊙ M", ndim=2)
    if bias is not None:
        check_float32_cpu(bias, "the bias", ndim=1)
        if bias.shape[0] != W_gated.shape[0]:
            raise ValueError(f"a bias of {bias.shape[0]} for {W_gated.shape[0]} rows")
    W_gated = W_gated.detach().contiguous()
    d_out, d_in = W_gated.shape
    blocks, groups = -(-d_out // ROWS), -(-d_in // GROUP)
    threads = torch.get_num_threads()
    starts = torch.zeros(blocks + 1, dtype=torch.int64)
    lib.count_kept(W_gated.data_ptr(), d_out, d_in, starts[1:].data_ptr(), threads)
    starts = starts.cumsum(dim=0)  # (blocks + 1,): block b's values begin at starts[b]
    bits = torch.empty(blocks, groups * ROWS * 2, dtype=torch.uint8)
    values = torch.zeros(int(starts[-1]) + PAD, dtype=torch.float32)
    lib.pack_blocks(W_gated.data_ptr(), d_out, d_in, bits.data_ptr(), values.data_ptr(), starts.data_ptr(), threads)
    return PackedLinear(bits, values, starts, d_out, d_in, None if bias is None else bias.detach().contiguous())


def route_and_pack(W: torch.Tensor, x_sqnorm: torch.Tensor, rho: float, nm=None,
                   bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                   arena: "Arena | None" = None) -> PackedLinear:
    """μ-MoE's router, selection and packing in one pass: `pack(pruners.wanda_gated_weight(W, x_sqnorm, rho, nm=nm),
    bias)`, the same masks, bits and values, without the scores or W ⊙ M ever in memory.

    W (d_out, d_in) and x_sqnorm (d_in,) = ||X_j||² over the prompt, float32 on the CPU. The compiled pass scores a
    block of rows, S_ij = |W_ij| · ||X_j|| (its square roots IEEE-exact, as pruners.wanda_score's), keeps each row's
    d_in - int(d_in (1 - rho)) largest (the smallest pruned, ties to the lower index: pruners' prune_lowest), or
    with nm = (N, M) all but the N smallest of every M, and writes the kept W_ij into the stream.
    `out`: a contiguous float32 tensor like W that receives W ⊙ M as well, in the same pass (the prompt's own gated
    product reads it: one scratch matrix reused Linear after Linear, never one per Linear). `arena`: where the values
    go (`arena_for`: one block of memory for a whole prompt's Linears), a fresh tensor otherwise.
    """
    lib = loaded_kernel()
    W, sqnorms, k, N, M = routing_arguments(W, x_sqnorm, rho, nm, bias, out)
    d_out, d_in = W.shape
    blocks, groups, capacity, room = packing_layout(d_out, d_in, rho, None if nm is None else tuple(nm))
    bits = torch.empty(blocks, groups * ROWS * 2, dtype=torch.uint8)
    values = torch.empty(room, dtype=torch.float32) if arena is None else arena.take(room)
    counts = torch.empty(2 * blocks + 1, dtype=torch.int64)  # each block's count of values, then the starts
    lib.route_and_pack(W.data_ptr(), sqnorms.data_ptr(), d_out, d_in, k, N, M, bits.data_ptr(), values.data_ptr(),
                       capacity, counts.data_ptr(), None if out is None else out.data_ptr(), torch.get_num_threads())
    starts = counts[blocks:]
    total = lib.route_and_pack_starts(values.data_ptr(), blocks, capacity, counts.data_ptr(), starts.data_ptr(), PAD)
    values = values[: total + PAD]  # a view: what padding rows or kept zeros left is a few floats, and a
                                    # copy would write every value again into fresh pages
    return PackedLinear(bits, values, starts, d_out, d_in, None if bias is None else bias.detach().contiguous())


@cache
def packing_layout(d_out: int, d_in: int, rho: float, nm=None) -> tuple[int, int, int, int]:
    """route_and_pack's sizes for a (d_out, d_in) W: (blocks of ROWS rows, groups of GROUP columns, a block's values
    at most, the floats its values are written into: values_room). Computed once per shape: a routed prompt asks
    for them ~200 times, and the interpreter's time between the compiled passes adds up (docs/packed_decode.md)."""
    capacity = ROWS * kept_per_row(d_in, rho, nm)
    blocks = -(-d_out // ROWS)
    return blocks, -(-d_in // GROUP), capacity, blocks * capacity + PAD


def kept_per_row(d_in: int, rho: float, nm=None) -> int:
    """The experts a prompt keeps of each row: d_in - int(d_in (1 - rho)), or with nm = (N, M) M - N of every M."""
    return d_in - prune_count(d_in, rho) if nm is None else d_in // nm[1] * (nm[1] - nm[0])


def values_room(W: torch.Tensor, rho: float, nm=None) -> int:
    """The floats route_and_pack writes a Linear's values into: ROWS rows' kept weights a block, and PAD."""
    return packing_layout(*W.shape, rho, None if nm is None else tuple(nm))[3]


class Arena:
    """One block of memory that a routed prompt's Linears take their packed values from, one after the other."""

    def __init__(self, buffer: torch.Tensor):
        self.buffer, self.used = buffer, 0

    def take(self, floats: int) -> torch.Tensor:
        if self.used + floats > self.buffer.numel():
            raise ValueError(f"the arena holds {self.buffer.numel()} floats, {self.used} taken: no room for {floats}")
        self.used += floats
        return self.buffer[self.used - floats : self.used]


_last_arena: torch.Tensor | None = None  # the memory of the last prompt's values, kept for the next prompt's
_arena_lock = threading.Lock()


def arena_for(floats: int) -> Arena:
    """An Arena of at least `floats` floats for a prompt's packed values: the last prompt's memory again where none
    of its experts is held any more, else a new block, kept in its place.

    Memory a process has not written yet costs the kernel a page fault each 4 KB at its first write: packing
    SmolLM2's 212 MB of values at rho 0.5 into fresh pages took ~60 ms more than into pages written before
    (benchmarks/bench_route.py; two dense decode steps), and the allocator returns freed blocks this large to the
    system. So the process keeps the last prompt's block between prompts, and hands it out again once nothing uses
    it: no PackedLinear of that prompt and no view of its values (torch's count of the storage's users; where this
    torch cannot count them, a new block every time). The Arena holds a view of the block from the start, so that
    a prompt routed meanwhile (another thread) takes a block of its own."""
    global _last_arena
    with _arena_lock:
        last, _last_arena = _last_arena, None
        if last is not None and last.numel() >= floats and storage_users(last) == 1:
            _last_arena = last
        else:
            del last  # its memory back before the new block takes its own, unless a prompt's experts still hold it
            _last_arena = torch.empty(floats, dtype=torch.float32)
        return Arena(_last_arena[:])


def storage_users(t: torch.Tensor) -> int | None:
    """How many tensors (views included) share t's memory, t counted; None where this torch cannot tell."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None
    storage = t.untyped_storage()  # its Python handle: one reference of its own (one handle per storage)
    return count(storage._cdata) - 1


def route_and_gate(W: torch.Tensor, x_sqnorm: torch.Tensor, rho: float, nm=None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """W ⊙ M, the masked path's experts: `pruners.wanda_gated_weight(W, x_sqnorm, rho, nm=nm, out=out)`, the same
    masks to the bit, by route_and_pack's compiled selection (vector passes bracket each row's k-th score around a
    guess from the rows before it: 5-7x faster than pruners' numpy pass on OPT-125M's shapes, docs/speed.md).
    Into `out` if given."""
    lib = loaded_kernel()
    W, sqnorms, k, N, M = routing_arguments(W, x_sqnorm, rho, nm, None, out)
    out = torch.empty_like(W) if out is None else out
    lib.route_and_pack(W.data_ptr(), sqnorms.data_ptr(), *W.shape, k, N, M, None, None, 0, None, out.data_ptr(),
                       torch.get_num_threads())
    return out


def routing_arguments(W: torch.Tensor, x_sqnorm: torch.Tensor, rho: float, nm, bias, out) -> tuple:
    """What the compiled router reads, checked: (W, x_sqnorm contiguous, k pruned per row, N, M; N = M = 0 for rho)."""
    check_float32_cpu(W, "W", ndim=2)
    check_float32_cpu(x_sqnorm, "the input norms", ndim=1)
    check_rho(rho)
    d_out, d_in = W.shape
    if x_sqnorm.shape[0] != d_in:
        raise ValueError(f"input norms of {x_sqnorm.shape[0]} features for W of {d_in} columns")
    if bias is not None:
        check_float32_cpu(bias, "the bias", ndim=1)
        if bias.shape[0] != d_out:
            raise ValueError(f"a bias of {bias.shape[0]} for {d_out} rows")
    if nm is not None:
        check_nm(nm, d_in)
    if out is not None:
        check_float32_cpu(out, "out", ndim=2)
        if out.shape != W.shape or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {tuple(W.shape)} tensor, got {tuple(out.shape)}")
    (N, M), k = nm or (0, 0), prune_count(d_in, rho) if nm is None else 0
    return W.detach().contiguous(), x_sqnorm.detach().contiguous(), k, N, M  # the kernel takes the square roots


def unpack(packed: PackedLinear) -> torch.Tensor:
    """The packed form -> W ⊙ M (d_out, d_in) again, in plain PyTorch: moves values only, so it is exact."""
    blocks, groups = packed.bits.shape[0], -(-packed.d_in // GROUP)
    keep = np.unpackbits(packed.bits.numpy().reshape(blocks, groups, ROWS, 2), axis=-1, bitorder="little")
    keep = torch.from_numpy(keep).bool().reshape(blocks, groups, ROWS, GROUP)  # the stream's order
    W_stream = torch.zeros(keep.shape, dtype=packed.values.dtype)
    W_stream[keep] = packed.values[: packed.starts[-1]]  # (block, group, row, column) order: the stream's
    W_gated = W_stream.permute(0, 2, 1, 3).reshape(blocks * ROWS, groups * GROUP)[: packed.d_out, : packed.d_in]
    return W_gated.contiguous()


# -----------------------------------------------------------------------------
# The kernel: compiled once per machine, loaded with ctypes


@cache
def build(extra_flags: tuple[str, ...] = ()) -> tuple[ctypes.CDLL | None, str | None]:
    """Compile decode_step.c, which includes packed_experts.c, for this CPU (once: the library is cached under
    CACHE_DIR, keyed by both sources, the compiler's version, the flags and the CPU's flags) -> (the loaded library,
    None), or (None, why it cannot run).
    `extra_flags` go after COMPILE_FLAGS: the tests build the AVX2 path on an AVX-512 CPU with -mno-avx512f."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or shutil.which(compiler) is None:
        return None, "no C compiler found (cc, gcc or $CC) to build the packed decode kernel"
    flags = [*COMPILE_FLAGS, "-iquote", str(PRODUCTS_SOURCE.parent), *extra_flags]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    sources = [KERNEL_SOURCE.read_text(), PRODUCTS_SOURCE.read_text()]
    key = hashlib.sha256("\n".join([*sources, version, *flags, cpu_flags()]).encode()).hexdigest()[:16]
    library = CACHE_DIR / f"packed_experts-{key}.so"
    if not library.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE_DIR) as build_dir:
            built = Path(build_dir) / "packed_experts.so"
            result = subprocess.run([compiler, *flags, str(KERNEL_SOURCE), "-o", str(built)],
                                    capture_output=True, text=True)
            if result.returncode != 0:  # one line to read, the compiler's whole output (file and line) kept
                log = CACHE_DIR / "packed_experts-build.log"
                log.write_text(f"{' '.join([compiler, *flags, str(KERNEL_SOURCE)])}\n{result.stderr}")
                error = next((line for line in result.stderr.splitlines() if "error" in line), "no error line")
                return None, f"the packed decode kernel did not compile with {compiler}: {error.strip()} (all: {log})"
            os.replace(built, library)  # atomic: a concurrent build never sees half a file
    lib = ctypes.CDLL(str(library))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.packed_linear.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, ctypes.c_int]
    lib.packed_linear.restype = None
    lib.count_kept.argtypes = [ptr, i64, i64, ptr, ctypes.c_int]
    lib.pack_blocks.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ctypes.c_int]
    lib.route_and_pack.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr, i64, ptr, ptr, ctypes.c_int]
    lib.route_and_pack.restype = None
    lib.route_and_pack_starts.argtypes = [ptr, i64, i64, ptr, ptr, i64]
    lib.route_and_pack_starts.restype = i64
    lib.streamed_linear.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, ctypes.c_int]
    lib.streamed_linear.restype = None
    lib.decode_block.argtypes = [ptr, ptr, i64, ptr, ctypes.c_int]
    lib.decode_block.restype = None
    return lib, None


def compiled_kernel() -> tuple[ctypes.CDLL | None, str | None]:
    """The kernel for this CPU, as `build` gives it: every product and packing goes through here."""
    return build()


def loaded_kernel() -> ctypes.CDLL:
    lib, problem = compiled_kernel()
    if problem is not None:
        raise RuntimeError(problem)
    return lib


def check_float32_cpu(t: torch.Tensor, what: str, ndim: int | None = None) -> None:
    """The C boundary takes raw pointers: anything but a float32 CPU tensor would be read as the wrong numbers."""
    if not t.is_cpu or t.dtype != torch.float32:  # (is_cpu: ~200 calls a routed prompt, t.device costs more)
        raise ValueError(f"{what} must be a float32 CPU tensor for the packed kernel, got {t.dtype} on {t.device}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def cpu_flags() -> str:
    """The CPU's feature flags (Linux), so that a cached build never runs on a CPU it was not built for."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        return next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    return ""


def kernel_problem(device=None, dtype=torch.float32) -> str | None:
    """None where the packed kernel serves weights on `device` of `dtype`; otherwise one line saying why not."""
    if device is not None and torch.device(device).type != "cpu":
        return f"the packed decode kernel runs on the CPU only, not on {torch.device(device).type}"
    if dtype != torch.float32:
        return f"the packed decode kernel serves float32 weights, not {str(dtype).removeprefix('torch.')}"
    return compiled_kernel()[1]


def packed_linear(x: torch.Tensor, packed: PackedLinear) -> torch.Tensor:
    """x (..., d_in) float32 -> x (W ⊙ M)^T + b (..., d_out), reading only the packed experts.

    A decode step makes one call per Linear (or per Linears sharing an input, `concatenate`), so the call itself is
    kept short: the experts' addresses are computed once (PackedLinear.pointers), x is copied only if it is not
    contiguous, and y is written in place of a reshape."""
    kernel = loaded_kernel().packed_linear
    if x.dtype != torch.float32 or x.device.type != "cpu":
        check_float32_cpu(x, "x")
    if x.shape[-1] != packed.d_in:
        raise ValueError(f"x has {x.shape[-1]} features, the packed experts {packed.d_in}")
    if not x.is_contiguous():
        x = x.contiguous()  # (..., d_in) read as (n, d_in): every token of the batch shares these experts
    y = x.new_empty((*x.shape[:-1], packed.d_out))
    kernel(x.data_ptr(), x.numel() // packed.d_in, packed.d_in, *packed.pointers, y.data_ptr(), packed.d_out,
           torch.get_num_threads())
    return y


def concatenate(parts: list[PackedLinear]) -> PackedLinear:
    """Linears that read one input (q, k and v; gate and up), their experts packed, -> one PackedLinear whose
    output is theirs side by side: one kernel call instead of several. Each part's rows are whole blocks
    (d_out a multiple of ROWS), so the streams follow one another unchanged, each block's start moved by what
    comes before it."""
    if any(P.d_out % ROWS or P.d_in != parts[0].d_in for P in parts):
        raise ValueError("only Linears of one input whose rows fill whole blocks are concatenated")
    values = torch.cat([P.values[: P.starts[-1]] for P in parts] + [torch.zeros(PAD)])
    ends = torch.tensor([0] + [int(P.starts[-1]) for P in parts]).cumsum(dim=0)
    starts = torch.cat([parts[0].starts[:1]] + [P.starts[1:] + end for P, end in zip(parts, ends)])
    has_bias = [P.bias is not None for P in parts]
    bias = None if not any(has_bias) else torch.cat([P.bias if P.bias is not None else torch.zeros(P.d_out)
                                                     for P in parts])
    return PackedLinear(torch.cat([P.bits for P in parts]), values, starts, sum(P.d_out for P in parts),
                        parts[0].d_in, bias)


def part(packed: PackedLinear, rows: slice) -> PackedLinear:
    """The experts of rows [rows.start, rows.stop) of `packed` (whole blocks), sharing its memory: what each Linear
    keeps of a concatenation, so that the parts and the whole are not held twice. Its values run on into the next
    part's, where the kernel's last full-width load may read (and mask out) what PAD zeros would give."""
    b0, b1 = rows.start // ROWS, rows.stop // ROWS
    s0, s1 = int(packed.starts[b0]), int(packed.starts[b1])
    bias = None if packed.bias is None else packed.bias[rows]
    return PackedLinear(packed.bits[b0:b1], packed.values[s0 : s1 + PAD], packed.starts[b0 : b1 + 1] - s0,
                        rows.stop - rows.start, packed.d_in, bias)


# -----------------------------------------------------------------------------
# The dense product of a few tokens, for the Linears a decode step keeps dense


def streamed_linear(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., d_in) float32, at most TOKENS_PER_PASS tokens in all -> x W^T + b (..., d_out), W (d_out, d_in) read
    once, front to back, by the compiled kernel (its equation and layout in packed_experts.c)."""
    kernel = loaded_kernel().streamed_linear
    if x.dtype != torch.float32 or not x.is_cpu:  # (is_cpu: a decode step makes ~200 calls, device.type costs more)
        check_float32_cpu(x, "x")
    if W.dtype != torch.float32 or not W.is_cpu or W.ndim != 2:
        check_float32_cpu(W, "W", ndim=2)
    d_out, d_in = W.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features, W {d_in} columns")
    n = x.numel() // d_in if d_in else 0
    if not 1 <= n <= TOKENS_PER_PASS:
        raise ValueError(f"the streamed product takes 1 to {TOKENS_PER_PASS} tokens, got {n} (more: a matrix product)")
    if not W.is_contiguous():
        raise ValueError("W must be contiguous: the kernel reads its rows by their address")
    if bias is not None:
        check_float32_cpu(bias, "the bias", ndim=1)
        if bias.shape[0] != d_out or not bias.is_contiguous():
            raise ValueError(f"the bias must be a contiguous ({d_out},) tensor, got {tuple(bias.shape)}")
    if not x.is_contiguous():
        x = x.contiguous()  # (..., d_in) read as (n, d_in)
    y = x.new_empty((*x.shape[:-1], d_out))
    kernel(x.data_ptr(), n, d_in, W.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), d_out,
           torch.get_num_threads())
    return y


def decode_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The dense Linear of a decode step, checkpoint.dense_linear's drop-in: a few tokens (at most TOKENS_PER_PASS in
    all) in float32 on the CPU run through streamed_linear, everything else, and everywhere the kernel cannot run
    (kernel_problem), through the Linear itself. Used for every shape, as measured on SmolLM2's (benchmarks/
    bench_head.py, docs/packed_decode.md, an Intel Xeon): with threads that sleep after a short spin (thread_policy's
    choice on shared cores) the kernel read each decoder Linear at 1.04-1.7x F.linear's GB/s and lm_head 2% above it
    (2x with 4 tokens), the dense step taking 0.87x eager's time; with threads spinning (its choice on free cores)
    F.linear was 1-12% faster on the one-token decoder Linears, and the step still 0.96x eager's."""
    W = layer.weight
    if (0 < x.numel() <= TOKENS_PER_PASS * W.shape[1] and x.is_cpu and x.dtype == W.dtype == torch.float32
            and W.is_contiguous() and compiled_kernel()[1] is None):
        return streamed_linear(x, W, layer.bias)
    return layer(x)
