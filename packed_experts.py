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
that torch has already loaded, so both share one pool of threads. The source
below is compiled once per machine (-march=native) into a cache directory, and loaded with ctypes.

Where the kernel cannot run (no C compiler, a CPU without AVX2, CUDA tensors, a dtype other than float32),
`kernel_problem` says why in one line, and the masked dense product runs instead (mumoe.decode_path).

    pack(W_gated, bias)                   W ⊙ M (d_out, d_in) -> PackedLinear (by the compiled kernel too)
    packed_bytes(d_out, d_in, kept)       what that costs in memory, and what a decode step reads of it
    packed_linear(x, packed)              the kernel: x (..., d_in) -> (..., d_out)
    packed_linear_reference(x, packed)    the same product in plain PyTorch, from the packed form
    kernel_problem(device, dtype)         None where the kernel runs, else why not
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

GROUP = 16  # columns per mask group: one AVX-512 register of float32 (AVX2 takes each half in turn)
ROWS = 4  # rows per block: walked side by side, independent chains of loads and sums, one load of x for all
TOKENS_PER_PASS = 4  # tokens that share each loaded weight: ROWS x TOKENS accumulators of 16 lanes in registers
PAD = GROUP  # zeros after the last value: AVX2's full-width load at the last group stays inside the buffer
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")  # for this CPU; joins torch's OpenMP
CACHE_DIR = Path(os.environ.get("MUMOE_CACHE", Path.home() / ".cache" / "mumoe"))

KERNEL_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "the packed decode kernel needs AVX2 and FMA"
#endif

#define GROUP 16
#define ROWS 4
#define TOKENS_PER_PASS 4

#ifdef __AVX512F__
#define LANES 16  /* a group is one vector */
typedef __m512 vec;
#define zero() _mm512_setzero_ps()
#define fma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define hsum(a) _mm512_reduce_add_ps(a)
static inline vec load_x(const float *x, int n) {  /* x's next n <= LANES columns, zeros after them */
    if (n >= LANES) return _mm512_loadu_ps(x);
    return _mm512_maskz_loadu_ps((__mmask16)((1u << (n > 0 ? n : 0)) - 1), x);
}
/* the next popcount(m) values of the stream, each put into the lane of its column; zeros in the other lanes */
static inline vec expand(const float *v, unsigned m) { return _mm512_maskz_expandloadu_ps((__mmask16)m, v); }
#else  /* AVX2: a group is two vectors of 8; a mask byte looks up where the next 8 values go, which lanes are kept */
#define LANES 8
typedef __m256 vec;
#define zero() _mm256_setzero_ps()
#define fma(a, b, c) _mm256_fmadd_ps(a, b, c)
static int32_t permutation[256][8];  /* mask byte -> for each lane, which of the next 8 values goes there */
static int32_t lanes[256][8];        /* mask byte -> all ones in its kept lanes */
__attribute__((constructor)) static void build_tables(void) {
    for (int m = 0; m < 256; m++)
        for (int j = 0, p = 0; j < 8; j++) {
            permutation[m][j] = (m >> j & 1) ? p : 0;
            lanes[m][j] = (m >> j & 1) ? -1 : 0;
            p += m >> j & 1;
        }
}
static inline vec load_x(const float *x, int n) {
    if (n >= LANES) return _mm256_loadu_ps(x);
    return _mm256_maskload_ps(x, _mm256_loadu_si256((const __m256i *)lanes[(1 << (n > 0 ? n : 0)) - 1]));
}
static inline vec expand(const float *v, unsigned m) {  /* reads 8 values: the buffer ends in PAD zeros */
    __m256 w = _mm256_permutevar8x32_ps(_mm256_loadu_ps(v), _mm256_loadu_si256((const __m256i *)permutation[m]));
    return _mm256_and_ps(w, _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)lanes[m])));
}
static inline float hsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif
#define HALVES (GROUP / LANES)
#define LANE_BITS ((1u << LANES) - 1)

/* One block of ROWS rows, NT tokens:  acc_rt += expand(values, bits_gr) * x[t, group g], the block's stream
   read front to back. Each load of x serves the ROWS rows, each expanded w the NT tokens. */
#define PASS_KERNEL(NT)                                                                                       \
static void pass_##NT(const float *x, int64_t d_in, const uint16_t *bits, const float *v, float *sums) {      \
    vec acc[ROWS][NT];                                                                                        \
    for (int r = 0; r < ROWS; r++)                                                                            \
        for (int t = 0; t < NT; t++) acc[r][t] = zero();                                                      \
    for (int64_t j = 0; j < d_in; j += GROUP, bits += ROWS) {                                                 \
        vec xv[HALVES][NT];                                                                                   \
        for (int h = 0; h < HALVES; h++)                                                                      \
            for (int t = 0; t < NT; t++) xv[h][t] = load_x(x + t * d_in + j + h * LANES, (int)(d_in - j) - h * LANES); \
        for (int r = 0; r < ROWS; r++)                                                                        \
            for (int h = 0; h < HALVES; h++) {                                                                \
                unsigned m = (bits[r] >> (h * LANES)) & LANE_BITS;                                            \
                vec w = expand(v, m);                                                                         \
                v += __builtin_popcount(m);                                                                   \
                for (int t = 0; t < NT; t++) acc[r][t] = fma(w, xv[h][t], acc[r][t]);                         \
            }                                                                                                 \
    }                                                                                                         \
    for (int r = 0; r < ROWS; r++)                                                                            \
        for (int t = 0; t < NT; t++) sums[r * TOKENS_PER_PASS + t] = hsum(acc[r][t]);                         \
}

PASS_KERNEL(1) PASS_KERNEL(2) PASS_KERNEL(3) PASS_KERNEL(4)
typedef void (*pass_kernel)(const float *, int64_t, const uint16_t *, const float *, float *);
static const pass_kernel PASSES[TOKENS_PER_PASS + 1] = {0, pass_1, pass_2, pass_3, pass_4};

/* y (n, d_out) = x (n, d_in) (W ⊙ M)^T + bias, with W ⊙ M packed as bits, values and starts */
void packed_linear(const float *x, int64_t n, int64_t d_in, const uint16_t *bits, const float *values,
                   const int64_t *starts, const float *bias, float *y, int64_t d_out, int threads) {
    int64_t groups = (d_in + GROUP - 1) / GROUP, blocks = (d_out + ROWS - 1) / ROWS;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        float sums[ROWS * TOKENS_PER_PASS];
        int rows = d_out - b * ROWS < ROWS ? (int)(d_out - b * ROWS) : ROWS;  /* the last block's real rows */
        for (int64_t t0 = 0; t0 < n; t0 += TOKENS_PER_PASS) {  /* later passes find the block in cache */
            int nt = n - t0 < TOKENS_PER_PASS ? (int)(n - t0) : TOKENS_PER_PASS;
            PASSES[nt](x + t0 * d_in, d_in, bits + b * groups * ROWS, values + starts[b], sums);
            for (int r = 0; r < rows; r++)
                for (int t = 0; t < nt; t++)
                    y[(t0 + t) * d_out + b * ROWS + r] =
                        sums[r * TOKENS_PER_PASS + t] + (bias ? bias[b * ROWS + r] : 0.0f);
        }
    }
}

/* Packing, two passes over W ⊙ M (d_out, d_in): how many weights each block keeps (counts[b]), then, once the
   caller has summed them into starts, each block's mask bits and kept values in (group, row, column) order. */
static inline unsigned kept_bits(const float *w, int64_t n) {  /* bit j: w[j] != 0, for the n <= GROUP columns */
#ifdef __AVX512F__
    return _mm512_cmp_ps_mask(load_x(w, (int)(n < GROUP ? n : GROUP)), _mm512_setzero_ps(), _CMP_NEQ_UQ);
#else
    unsigned m = 0;
    for (int j = 0; j < GROUP && j < n; j++) m |= (unsigned)(w[j] != 0.0f) << j;
    return m;
#endif
}

void count_kept(const float *W, int64_t d_out, int64_t d_in, int64_t *counts, int threads) {
    int64_t blocks = (d_out + ROWS - 1) / ROWS;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t kept = 0;
        for (int64_t i = b * ROWS; i < d_out && i < (b + 1) * ROWS; i++)
            for (int64_t j = 0; j < d_in; j += GROUP) kept += __builtin_popcount(kept_bits(W + i * d_in + j, d_in - j));
        counts[b] = kept;
    }
}

void pack_blocks(const float *W, int64_t d_out, int64_t d_in, uint16_t *bits, float *values, const int64_t *starts,
                 int threads) {
    int64_t groups = (d_in + GROUP - 1) / GROUP, blocks = (d_out + ROWS - 1) / ROWS;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        float *v = values + starts[b];
        uint16_t *bits_b = bits + b * groups * ROWS;
        for (int64_t g = 0; g < groups; g++)
            for (int r = 0; r < ROWS; r++) {
                int64_t i = b * ROWS + r, j0 = g * GROUP;
                unsigned m = i < d_out ? kept_bits(W + i * d_in + j0, d_in - j0) : 0;  /* padding rows: empty */
                bits_b[g * ROWS + r] = (uint16_t)m;
#ifdef __AVX512F__
                if (m)  /* the row's kept values of the group, side by side */
                    _mm512_mask_compressstoreu_ps(v, (__mmask16)m, _mm512_maskz_loadu_ps((__mmask16)m, W + i * d_in + j0));
                v += __builtin_popcount(m);
#else
                for (int j = 0; j < GROUP; j++)
                    if (m >> j & 1) *v++ = W[i * d_in + j0 + j];
#endif
            }
    }
}
"""


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
    lib, problem = compiled_kernel()
    if problem is not None:
        raise RuntimeError(problem)
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
    return PackedLinear(bits, values, starts, d_out, d_in, bias)


def packed_linear_reference(x: torch.Tensor, packed: PackedLinear) -> torch.Tensor:
    """x (..., d_in) -> x (W ⊙ M)^T + b, W ⊙ M rebuilt from the packed form in plain PyTorch (the tests' oracle)."""
    blocks, groups = packed.bits.shape[0], -(-packed.d_in // GROUP)
    keep = np.unpackbits(packed.bits.numpy().reshape(blocks, groups, ROWS, 2), axis=-1, bitorder="little")
    keep = torch.from_numpy(keep).bool().reshape(blocks, groups, ROWS, GROUP)  # the stream's order
    W_stream = torch.zeros(keep.shape, dtype=packed.values.dtype)
    W_stream[keep] = packed.values[: packed.starts[-1]]  # (block, group, row, column) order: the stream's
    W_gated = W_stream.permute(0, 2, 1, 3).reshape(blocks * ROWS, groups * GROUP)[: packed.d_out, : packed.d_in]
    return torch.nn.functional.linear(x, W_gated, packed.bias)


# -----------------------------------------------------------------------------
# The kernel: compiled once per machine, loaded with ctypes


@cache
def compiled_kernel(extra_flags: tuple[str, ...] = ()) -> tuple[ctypes.CDLL | None, str | None]:
    """(the loaded library, None), or (None, one line saying why the kernel cannot run on this machine).
    `extra_flags` go to the compiler after COMPILE_FLAGS (the tests build the AVX2 path with -mno-avx512f)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or shutil.which(compiler) is None:
        return None, "no C compiler found (cc, gcc or $CC) to build the packed decode kernel"
    flags = [*COMPILE_FLAGS, *extra_flags]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\n".join([KERNEL_SOURCE, version, *flags, cpu_flags()]).encode()).hexdigest()[:16]
    library = CACHE_DIR / f"packed_experts-{key}.so"
    if not library.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE_DIR) as build:
            source, built = Path(build) / "packed_experts.c", Path(build) / "packed_experts.so"
            source.write_text(KERNEL_SOURCE)
            result = subprocess.run([compiler, *flags, str(source), "-o", str(built)], capture_output=True, text=True)
            if result.returncode != 0:
                error = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip())
                return None, f"the packed decode kernel did not compile with {compiler}: {error.strip()}"
            os.replace(built, library)  # atomic: a concurrent build never sees half a file
    lib = ctypes.CDLL(str(library))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.packed_linear.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, ctypes.c_int]
    lib.packed_linear.restype = None
    lib.count_kept.argtypes = [ptr, i64, i64, ptr, ctypes.c_int]
    lib.pack_blocks.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ctypes.c_int]
    return lib, None


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


def packed_linear(x: torch.Tensor, packed: PackedLinear, extra_flags: tuple[str, ...] = ()) -> torch.Tensor:
    """x (..., d_in) float32 -> x (W ⊙ M)^T + b (..., d_out), reading only the packed experts."""
    lib, problem = compiled_kernel(extra_flags)
    if problem is not None:
        raise RuntimeError(problem)
    shape = x.shape
    x = x.reshape(-1, packed.d_in).contiguous()  # (n, d_in): every token of the batch shares these experts
    y = torch.empty(x.shape[0], packed.d_out, dtype=x.dtype)
    bias = packed.bias.contiguous() if packed.bias is not None else None
    lib.packed_linear(x.data_ptr(), x.shape[0], packed.d_in, packed.bits.data_ptr(), packed.values.data_ptr(),
                      packed.starts.data_ptr(), bias.data_ptr() if bias is not None else None, y.data_ptr(),
                      packed.d_out, torch.get_num_threads())
    return y.reshape(*shape[:-1], packed.d_out)
