"""A prompt's micro-experts packed, and the decode kernel that reads only them: y = x (W ⊙ M)^T + b.

After μ-MoE routes a prompt (mumoe.route_prompt), every later token of that prompt multiplies the same gated
weights W ⊙ M. Decoding a token reads every weight once, so a step is bound by the bytes it reads: the dense
W ⊙ M costs 4 bytes per weight (fp32), zeros included. Packed, a row keeps only its active experts:

    bits    (d_out, row_bytes) uint8   bit j of a row is M_ij (little-endian: column 8·b + j is bit j of byte b);
                                       row_bytes = GROUP/8 · ceil(d_in / GROUP), the last group zero-padded
    values  (nnz + PAD,) float32       the kept W_ij of row 0 in column order, then row 1's, ...: one stream per
                                       row; PAD zeros at the end, read (never used) by the last row's last load
    starts  (d_out + 1,) int64         row i's values are values[starts[i] : starts[i + 1]]

so a weight costs 1/8 byte of mask and, if kept, 4 bytes of value: a step reads rho · 4 + 1/8 bytes per
weight instead of 4 (0.53 of dense at rho = 0.5, 0.43 at 0.4), the per-row starts aside.

The kernel walks a row GROUP = 16 columns at a time: the group's 16 mask bits say which columns are kept,
and AVX-512's expand-load puts the next popcount(bits) values of the row's stream into exactly those lanes
(zeros elsewhere), so the product with x's 16 columns is one fused multiply-add:

    w = expand(values[p:], bits_g)         p += popcount(bits_g)
    acc_t += w * x[t, 16 g : 16 g + 16]    for each token t of the pass (x's columns read masked by bits_g)
    y[t, i] = sum(acc_t) + b_i

Each loaded weight serves every token of a pass (up to TOKENS_PER_PASS, a continuation's few tokens or the
batch of continuations that share one context's experts), and rows are split over torch's own OpenMP threads.
Without AVX-512 (AVX2 only), a group is 8 columns: the 8 values are loaded, then moved into their lanes by a
permutation looked up from the mask byte (a 256-entry table built once). No gather instruction is used.

Why C through the system compiler, not numba: a numba loop over the kept weights (fp32 values, uint8
column offsets in 256-column tiles, fastmath so that LLVM vectorizes it with gathers) ran at 1.6-2.0× the
dense product's time on LLaMA-7B's MLP shapes at rho = 0.5 and 0.4 (docs/packed_decode.md): its gathers and
short per-tile loops are bound by instructions, and numba's own thread pool fights torch's for the cores. The
bitmap layout needs expand-load (or a byte-indexed permutation), which numba cannot emit, and C compiled with
-fopenmp joins the libgomp that torch has already loaded, so both share one pool of threads. The source
below is compiled once per machine (-march=native) into a cache directory, and loaded with ctypes.

Where the kernel cannot run (no C compiler, a CPU without AVX2, CUDA tensors, a dtype other than float32),
`kernel_problem` says why in one line, and the masked dense product runs instead (mumoe.decode_path).

    pack(W_gated, bias)                   W ⊙ M (d_out, d_in) -> PackedLinear (compiled too)
    packed_bytes(d_out, d_in, kept)       what that costs in memory, and what a decode step reads of it
    packed_linear(x, packed)              the kernel: x (..., d_in) -> (..., d_out)
    packed_linear_reference(x, packed)    the same product in plain PyTorch, from the packed form
    kernel_problem(device, dtype)         None where the kernel runs, else why not

Imports: torch, numpy (packbits), ctypes and the standard library (compiling and caching the kernel).
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
PAD = GROUP  # zeros after the last value: a full-width load at a row's last group stays inside the buffer
ROWS_PER_PASS = 4  # rows walked side by side: independent chains of loads and sums, one load of x for all
TOKENS_PER_PASS = 4  # tokens that share each loaded weight: ROWS x TOKENS accumulators of 16 lanes in registers
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")  # for this CPU; joins torch's OpenMP
CACHE_DIR = Path(os.environ.get("MUMOE_CACHE", Path.home() / ".cache" / "mumoe"))

KERNEL_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "the packed decode kernel needs AVX2 and FMA"
#endif

#define ROWS_PER_PASS 4
#define TOKENS_PER_PASS 4

#ifdef __AVX512F__
#define LANES 16
typedef __m512 vec;
typedef __mmask16 lane_mask;
#define zero() _mm512_setzero_ps()
#define fma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define hsum(a) _mm512_reduce_add_ps(a)
static inline lane_mask group_bits(const uint8_t *bits, int64_t g) { return ((const uint16_t *)bits)[g]; }
static inline lane_mask first_lanes(int n) { return (lane_mask)((1u << n) - 1); }
static inline vec load_x(const float *x, int n) {  /* x's next n <= LANES columns, zeros after them */
    return n == LANES ? _mm512_loadu_ps(x) : _mm512_maskz_loadu_ps(first_lanes(n), x);
}
/* the next popcount(m) values of a row, each put into the lane of its column; zeros in the other lanes */
static inline vec expand(const float *v, lane_mask m) { return _mm512_maskz_expandloadu_ps(m, v); }
#else  /* AVX2: 8 lanes; the mask byte looks up where the next 8 values go, and which lanes are kept */
#define LANES 8
typedef __m256 vec;
typedef int lane_mask;
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
static inline lane_mask group_bits(const uint8_t *bits, int64_t g) { return bits[g]; }
static inline vec load_x(const float *x, int n) {
    if (n == LANES) return _mm256_loadu_ps(x);
    return _mm256_maskload_ps(x, _mm256_loadu_si256((const __m256i *)lanes[(1 << n) - 1]));
}
static inline vec expand(const float *v, lane_mask m) {  /* reads 8 values: the buffer ends in PAD zeros */
    __m256 w = _mm256_permutevar8x32_ps(_mm256_loadu_ps(v), _mm256_loadu_si256((const __m256i *)permutation[m]));
    return _mm256_and_ps(w, _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)lanes[m])));
}
static inline float hsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

/* R rows, NT tokens, one group of LANES columns at a time:  acc_rt += expand(values_r, bits_rg) * x[t, group g].
   Each load of x serves the R rows, each expanded w the NT tokens; the R pointer chains (v_r += popcount)
   and the R·NT sums are independent, so their latencies overlap. */
#define PASS_KERNEL(R, NT)                                                                                    \
static void pass_##R##_##NT(const float *x, int64_t d_in, const uint8_t *bits, int64_t row_bytes,           \
                            const float *const *values, float *sums) {                                       \
    vec acc[R][NT];                                                                                           \
    const float *v[R];                                                                                        \
    for (int r = 0; r < R; r++) {                                                                             \
        v[r] = values[r];                                                                                     \
        for (int t = 0; t < NT; t++) acc[r][t] = zero();                                                      \
    }                                                                                                         \
    for (int64_t g = 0, j = 0; j < d_in; g++, j += LANES) {                                                   \
        int n = d_in - j < LANES ? (int)(d_in - j) : LANES;                                                   \
        vec xv[NT];                                                                                           \
        for (int t = 0; t < NT; t++) xv[t] = load_x(x + t * d_in + j, n);                                     \
        for (int r = 0; r < R; r++) {                                                                         \
            lane_mask m = group_bits(bits + r * row_bytes, g);                                                \
            vec w = expand(v[r], m);                                                                          \
            v[r] += __builtin_popcount(m);                                                                    \
            for (int t = 0; t < NT; t++) acc[r][t] = fma(w, xv[t], acc[r][t]);                               \
        }                                                                                                     \
    }                                                                                                         \
    for (int r = 0; r < R; r++)                                                                               \
        for (int t = 0; t < NT; t++) sums[r * TOKENS_PER_PASS + t] = hsum(acc[r][t]);                         \
}

PASS_KERNEL(4, 1) PASS_KERNEL(4, 2) PASS_KERNEL(4, 3) PASS_KERNEL(4, 4)
PASS_KERNEL(1, 1) PASS_KERNEL(1, 2) PASS_KERNEL(1, 3) PASS_KERNEL(1, 4)
typedef void (*pass_kernel)(const float *, int64_t, const uint8_t *, int64_t, const float *const *, float *);
static const pass_kernel FOUR_ROWS[TOKENS_PER_PASS + 1] = {0, pass_4_1, pass_4_2, pass_4_3, pass_4_4};
static const pass_kernel ONE_ROW[TOKENS_PER_PASS + 1] = {0, pass_1_1, pass_1_2, pass_1_3, pass_1_4};

/* y (n, d_out) = x (n, d_in) (W ⊙ M)^T + bias, with W ⊙ M packed as bits, values and starts */
void packed_linear(const float *x, int64_t n, int64_t d_in, const uint8_t *bits, int64_t row_bytes,
                   const float *values, const int64_t *starts, const float *bias, float *y, int64_t d_out,
                   int threads) {
    int64_t blocks = (d_out + ROWS_PER_PASS - 1) / ROWS_PER_PASS;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t block = 0; block < blocks; block++) {
        int64_t i0 = block * ROWS_PER_PASS;
        int rows = d_out - i0 < ROWS_PER_PASS ? (int)(d_out - i0) : ROWS_PER_PASS;
        float sums[ROWS_PER_PASS * TOKENS_PER_PASS];
        for (int64_t t0 = 0; t0 < n; t0 += TOKENS_PER_PASS) {  /* later passes find the rows' values in cache */
            int nt = n - t0 < TOKENS_PER_PASS ? (int)(n - t0) : TOKENS_PER_PASS;
            const float *v[ROWS_PER_PASS];
            for (int r = 0; r < rows; r++) v[r] = values + starts[i0 + r];
            if (rows == ROWS_PER_PASS)
                FOUR_ROWS[nt](x + t0 * d_in, d_in, bits + i0 * row_bytes, row_bytes, v, sums);
            else
                for (int r = 0; r < rows; r++)
                    ONE_ROW[nt](x + t0 * d_in, d_in, bits + (i0 + r) * row_bytes, row_bytes, v + r,
                                sums + r * TOKENS_PER_PASS);
            for (int r = 0; r < rows; r++)
                for (int t = 0; t < nt; t++)
                    y[(t0 + t) * d_out + i0 + r] = sums[r * TOKENS_PER_PASS + t] + (bias ? bias[i0 + r] : 0.0f);
        }
    }
}

/* packing, in two passes over W ⊙ M (d_out, d_in): how many weights each row keeps (counts[i]), then, once the
   caller has summed them into starts, each row's mask bits and its kept values in column order */
void count_kept(const float *W, int64_t d_out, int64_t d_in, int64_t *counts, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < d_out; i++) {
        int64_t kept = 0;
        for (int64_t j = 0; j < d_in; j++) kept += W[i * d_in + j] != 0.0f;
        counts[i] = kept;
    }
}

void pack_rows(const float *W, int64_t d_out, int64_t d_in, uint8_t *bits, int64_t row_bytes, float *values,
               const int64_t *starts, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < d_out; i++) {
        const float *w = W + i * d_in;
        float *v = values + starts[i];
        for (int64_t b = 0; b < row_bytes; b++) {
            uint8_t byte = 0;
            for (int j = 0; j < 8 && 8 * b + j < d_in; j++)
                if (w[8 * b + j] != 0.0f) {
                    byte |= 1u << j;
                    *v++ = w[8 * b + j];
                }
            bits[i * row_bytes + b] = byte;
        }
    }
}
"""


# -----------------------------------------------------------------------------
# The packed form


@dataclass(frozen=True)
class PackedLinear:
    """One Linear's experts for one prompt, W ⊙ M packed (the layout in the module's docstring), and its bias."""
    bits: torch.Tensor     # (d_out, row_bytes) uint8
    values: torch.Tensor   # (nnz + PAD,) float32
    starts: torch.Tensor   # (d_out + 1,) int64
    d_in: int
    bias: torch.Tensor | None

    @property
    def d_out(self) -> int:
        return self.bits.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the packed experts (what a decode step reads of them), the bias excluded."""
        return sum(t.numel() * t.element_size() for t in (self.bits, self.values, self.starts))


def packed_bytes(d_out: int, d_in: int, kept: int) -> int:
    """The bytes `pack` makes of a (d_out, d_in) W ⊙ M that keeps `kept` weights per row (PAD aside)."""
    return d_out * (-(-d_in // GROUP) * GROUP // 8 + kept * 4 + 8) + 8  # bits, values, starts


def pack(W_gated: torch.Tensor, bias: torch.Tensor | None = None) -> PackedLinear:
    """W ⊙ M (d_out, d_in), float32 on the CPU -> its packed form (by the compiled kernel's two passes over it).
    A weight is kept where W ⊙ M is nonzero: a kept weight that is exactly 0 adds nothing to the product."""
    lib, problem = compiled_kernel()
    if problem is not None:
        raise RuntimeError(problem)
    W_gated = W_gated.detach().contiguous()
    d_out, d_in = W_gated.shape
    row_bytes = -(-d_in // GROUP) * GROUP // 8  # whole groups: the kernel reads GROUP bits at a time
    threads = torch.get_num_threads()
    starts = torch.zeros(d_out + 1, dtype=torch.int64)
    lib.count_kept(W_gated.data_ptr(), d_out, d_in, starts[1:].data_ptr(), threads)
    starts = starts.cumsum(dim=0)  # (d_out + 1,): row i's values begin at starts[i]
    bits = torch.zeros(d_out, row_bytes, dtype=torch.uint8)
    values = torch.zeros(int(starts[-1]) + PAD, dtype=torch.float32)
    lib.pack_rows(W_gated.data_ptr(), d_out, d_in, bits.data_ptr(), row_bytes, values.data_ptr(), starts.data_ptr(),
                  threads)
    return PackedLinear(bits, values, starts, d_in, bias)


def packed_linear_reference(x: torch.Tensor, packed: PackedLinear) -> torch.Tensor:
    """x (..., d_in) -> x (W ⊙ M)^T + b, W ⊙ M rebuilt from the packed form in plain PyTorch (the tests' oracle)."""
    keep = torch.from_numpy(np.unpackbits(packed.bits.numpy(), axis=1, bitorder="little")).bool()
    keep = keep[:, : packed.d_in]
    W_gated = torch.zeros(packed.d_out, packed.d_in, dtype=packed.values.dtype)
    W_gated[keep] = packed.values[: packed.starts[-1]]  # row-major order: row by row, columns ascending
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
    lib.packed_linear.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, i64, ctypes.c_int]
    lib.packed_linear.restype = None
    lib.count_kept.argtypes = [ptr, i64, i64, ptr, ctypes.c_int]
    lib.pack_rows.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, ctypes.c_int]
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
    lib.packed_linear(x.data_ptr(), x.shape[0], packed.d_in, packed.bits.data_ptr(), packed.bits.shape[1],
                      packed.values.data_ptr(), packed.starts.data_ptr(), bias.data_ptr() if bias is not None else None,
                      y.data_ptr(), packed.d_out, torch.get_num_threads())
    return y.reshape(*shape[:-1], packed.d_out)
