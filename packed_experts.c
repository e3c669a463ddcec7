/* packed_experts.c: the decode kernel that reads only a prompt's kept micro-experts, y = x (W ⊙ M)^T + b, and the
   packing that builds its stream from W ⊙ M. Loaded with ctypes by packed_experts.py, whose docstring draws the
   layout (blocks of ROWS rows, groups of GROUP columns, one stream of mask bits and kept values per block) and whose
   unpack() is the plain-PyTorch reference the tests compare with. Built with -march=native (AVX-512 where the CPU
   has it) or -mno-avx512f (the AVX2 path), -fopenmp: the threads are torch's own libgomp pool. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
static int32_t permutation[256][8];  /* mask byte -> for each lane, which of the next 8 values goes there, or, where
                                        the lane is pruned, INT32_MIN: the permutation reads the low 3 bits only,
                                        the blend after it the sign */
static int32_t lanes[256][8];        /* mask byte -> all ones in its kept lanes */
static int32_t compression[256][8];  /* mask byte -> for the p-th lane, which lane holds the p-th kept value */
__attribute__((constructor)) static void build_tables(void) {
    for (int m = 0; m < 256; m++)
        for (int j = 0, p = 0; j < 8; j++) {
            permutation[m][j] = (m >> j & 1) ? p : INT32_MIN;
            lanes[m][j] = (m >> j & 1) ? -1 : 0;
            compression[m][j] = 0;
            if (m >> j & 1) compression[m][p] = j;
            p += m >> j & 1;
        }
}
static inline vec load_x(const float *x, int n) {
    if (n >= LANES) return _mm256_loadu_ps(x);
    return _mm256_maskload_ps(x, _mm256_loadu_si256((const __m256i *)lanes[(1 << (n > 0 ? n : 0)) - 1]));
}
static inline vec expand(const float *v, unsigned m) {  /* reads 8 values: the buffer ends in PAD zeros */
    __m256i to = _mm256_loadu_si256((const __m256i *)permutation[m]);
    __m256 w = _mm256_permutevar8x32_ps(_mm256_loadu_ps(v), to);
    return _mm256_blendv_ps(w, _mm256_setzero_ps(), _mm256_castsi256_ps(to));  /* pruned lanes (sign set): 0 */
}
static inline float hsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif
#define HALVES (GROUP / LANES)
#define LANE_BITS ((1u << LANES) - 1)

#define PREFETCH_BYTES 8192  /* how far ahead of the stream its lines are asked into L2, in both kernels. The dense
                              one: the best of 2-32 KB measured (lm_head, alone in a loop: 8% below F.linear's GB/s
                              without, 5-10% above); the packed one, on an Intel Xeon: 60 products of 1536 x 576 at
                              rho 0.5 in a C loop read 20 GB/s without, 35 at 2 KB ahead, 41 at 8 KB */

/* One block of ROWS rows, NT tokens:  acc_rt += expand(values, bits_gr) * x[t, group g], the block's stream
   read front to back. Each load of x serves the ROWS rows, each expanded w the NT tokens. x's rows are `stride`
   floats apart and hold whole groups (packed_rows pads them with zeros where d_in is not a multiple of GROUP), so
   every load of x is a plain one. The loops over a group's halves and over the sums at the end are unrolled by
   pragma: left as loops, gcc 12 kept the accumulators on the stack as well, storing each of them at every group (seen
   in the assembly: ROWS x NT extra 64-byte stores a group). */
#define PASS_KERNEL(NT)                                                                                       \
static void pass_##NT(const float *x, int64_t stride, int64_t groups, const uint16_t *bits, const float *v,   \
                      float *sums) {                                                                          \
    vec acc[ROWS][NT];                                                                                        \
    for (int r = 0; r < ROWS; r++)                                                                            \
        for (int t = 0; t < NT; t++) acc[r][t] = zero();                                                      \
    for (int64_t j = 0; j < groups * GROUP; j += GROUP, bits += ROWS) {                                       \
        vec xv[HALVES][NT];                                                                                   \
        for (int h = 0; h < HALVES; h++)                                                                      \
            for (int t = 0; t < NT; t++) xv[h][t] = load_x(x + t * stride + j + h * LANES, LANES);            \
        for (int r = 0; r < ROWS; r++)                                                                        \
            _Pragma("GCC unroll 2") for (int h = 0; h < HALVES; h++) {                                        \
                unsigned m = (bits[r] >> (h * LANES)) & LANE_BITS;                                            \
                _mm_prefetch((const char *)v + PREFETCH_BYTES, _MM_HINT_T1);                                  \
                vec w = expand(v, m);                                                                         \
                v += __builtin_popcount(m);                                                                   \
                for (int t = 0; t < NT; t++) acc[r][t] = fma(w, xv[h][t], acc[r][t]);                         \
            }                                                                                                 \
    }                                                                                                         \
    _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++)                                                    \
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) sums[r * TOKENS_PER_PASS + t] = hsum(acc[r][t]); \
}

PASS_KERNEL(1) PASS_KERNEL(2) PASS_KERNEL(3) PASS_KERNEL(4)
typedef void (*pass_kernel)(const float *, int64_t, int64_t, const uint16_t *, const float *, float *);
static const pass_kernel PASSES[TOKENS_PER_PASS + 1] = {0, pass_1, pass_2, pass_3, pass_4};

/* One token through two blocks side by side (a decode step's products): two streams of values in flight instead of
   one, each row summed in the same order as pass_1's, so the same digits (measured: SmolLM2's fused step at rho 0.5
   2.2% faster on AVX-512, 3.8% on AVX2; four blocks side by side spilled the accumulators and was slower) */
static void pass_pair(const float *x, int64_t groups, const uint16_t *bits0, const float *v0, const uint16_t *bits1,
                      const float *v1, float *sums0, float *sums1) {
    vec a[ROWS], c[ROWS];
    _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++) a[r] = zero(), c[r] = zero();
    for (int64_t j = 0; j < groups * GROUP; j += GROUP, bits0 += ROWS, bits1 += ROWS) {
        vec xv[HALVES];
        _Pragma("GCC unroll 2") for (int h = 0; h < HALVES; h++) xv[h] = load_x(x + j + h * LANES, LANES);
        _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++)  /* a row's halves are side by side in its stream */
            _Pragma("GCC unroll 2") for (int h = 0; h < HALVES; h++) {
                unsigned m0 = (bits0[r] >> (h * LANES)) & LANE_BITS, m1 = (bits1[r] >> (h * LANES)) & LANE_BITS;
                _mm_prefetch((const char *)v0 + PREFETCH_BYTES, _MM_HINT_T1);
                _mm_prefetch((const char *)v1 + PREFETCH_BYTES, _MM_HINT_T1);
                a[r] = fma(expand(v0, m0), xv[h], a[r]);
                c[r] = fma(expand(v1, m1), xv[h], c[r]);
                v0 += __builtin_popcount(m0), v1 += __builtin_popcount(m1);
            }
    }
    _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++)
        sums0[r * TOKENS_PER_PASS] = hsum(a[r]), sums1[r * TOKENS_PER_PASS] = hsum(c[r]);
}

/* y (n, d_out) = x (n, d_in) (W ⊙ M)^T + bias, with W ⊙ M packed as bits, values and starts, by the threads of the
   parallel region it is called in (decode_step.c calls it inside its own; each block's rows are summed by one
   thread, so the split never changes a digit), without a barrier at the end */
static void packed_rows(const float *x, int64_t n, int64_t d_in, const uint16_t *bits, const float *values,
                        const int64_t *starts, const float *bias, float *y, int64_t d_out) {
    int64_t groups = (d_in + GROUP - 1) / GROUP, blocks = (d_out + ROWS - 1) / ROWS, stride = d_in;
    float *padded = NULL;  /* x's rows, zeros after d_in up to whole groups, where d_in is not a multiple of GROUP */
    if (d_in % GROUP) {
        stride = groups * GROUP;
        padded = calloc(n * stride, sizeof(float));
        for (int64_t t = 0; t < n; t++) memcpy(padded + t * stride, x + t * d_in, d_in * sizeof(float));
        x = padded;
    }
    if (n == 1) {  /* a decode step: blocks two at a time */
        #pragma omp for schedule(static) nowait
        for (int64_t b = 0; b < blocks; b += 2) {
            float sums[2][ROWS * TOKENS_PER_PASS];
            if (b + 1 < blocks)
                pass_pair(x, groups, bits + b * groups * ROWS, values + starts[b], bits + (b + 1) * groups * ROWS,
                          values + starts[b + 1], sums[0], sums[1]);
            else
                pass_1(x, stride, groups, bits + b * groups * ROWS, values + starts[b], sums[0]);
            for (int64_t i = b * ROWS; i < (b + 2) * ROWS && i < d_out; i++)  /* real rows only */
                y[i] = sums[i / ROWS - b][i % ROWS * TOKENS_PER_PASS] + (bias ? bias[i] : 0.0f);
        }
        free(padded);
        return;
    }
    #pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < blocks; b++) {
        float sums[ROWS * TOKENS_PER_PASS];
        int rows = d_out - b * ROWS < ROWS ? (int)(d_out - b * ROWS) : ROWS;  /* the last block's real rows */
        for (int64_t t0 = 0; t0 < n; t0 += TOKENS_PER_PASS) {  /* later passes find the block in cache */
            int nt = n - t0 < TOKENS_PER_PASS ? (int)(n - t0) : TOKENS_PER_PASS;
            PASSES[nt](x + t0 * stride, stride, groups, bits + b * groups * ROWS, values + starts[b], sums);
            for (int r = 0; r < rows; r++)
                for (int t = 0; t < nt; t++)
                    y[(t0 + t) * d_out + b * ROWS + r] =
                        sums[r * TOKENS_PER_PASS + t] + (bias ? bias[b * ROWS + r] : 0.0f);
        }
    }
    free(padded);
}

void packed_linear(const float *x, int64_t n, int64_t d_in, const uint16_t *bits, const float *values,
                   const int64_t *starts, const float *bias, float *y, int64_t d_out, int threads) {
    #pragma omp parallel num_threads(threads)
    packed_rows(x, n, d_in, bits, values, starts, bias, y, d_out);
}

/* The dense product of a few tokens, y = x W^T + b, W (d_out, d_in) row-major: what a decode step's dense Linears
   (lm_head, every Linear of the dense model) cost is reading W once, so W is read front to back in blocks of
   DENSE_ROWS consecutive rows (one block: DENSE_ROWS · d_in floats, one stream), and each load of W serves the
   n <= TOKENS_PER_PASS tokens:

       acc_rt += W[i0 + r, j : j + LANES] * x[t, j : j + LANES]     j = 0, LANES, ... (the last columns masked)
       y[t, i0 + r] = sum(acc_rt) + b_{i0 + r}

   The rows past the last whole block go one at a time. The threads take runs of blocks as they come (OpenMP's
   guided schedule: half of what is left, shrinking to CHUNK_BYTES), not one fixed half each: a thread asleep
   between two products (after thread_policy's short spin, on shared cores) starts tens of µs after the calling one, which meanwhile
   reads on instead of waiting for it at the end (measured in docs/packed_decode.md). */
#define DENSE_ROWS 4
#define CHUNK_BYTES 32768  /* the smallest run a thread takes, 3 blocks of 576 columns (runs of 4 beat runs of 16) */

#define DENSE_KERNEL(R, NT)                                                                                   \
static void dense_##R##_##NT(const float *x, int64_t d_in, const float *W, float *sums) {                  \
    vec acc[R][NT];                                                                                           \
    for (int r = 0; r < R; r++)                                                                               \
        for (int t = 0; t < NT; t++) acc[r][t] = zero();                                                      \
    for (int64_t j = 0; j < d_in; j += LANES) {                                                               \
        int n = d_in - j < LANES ? (int)(d_in - j) : LANES;                                                   \
        vec xv[NT];                                                                                           \
        for (int t = 0; t < NT; t++) xv[t] = load_x(x + t * d_in + j, n);                                     \
        for (int r = 0; r < R; r++) {                                                                         \
            _mm_prefetch((const char *)(W + r * d_in + j) + PREFETCH_BYTES, _MM_HINT_T1);                     \
            vec w = load_x(W + r * d_in + j, n);                                                              \
            for (int t = 0; t < NT; t++) acc[r][t] = fma(w, xv[t], acc[r][t]);                                \
        }                                                                                                     \
    }                                                                                                         \
    for (int r = 0; r < R; r++)                                                                               \
        for (int t = 0; t < NT; t++) sums[r * TOKENS_PER_PASS + t] = hsum(acc[r][t]);                         \
}

DENSE_KERNEL(4, 1) DENSE_KERNEL(4, 2) DENSE_KERNEL(4, 3) DENSE_KERNEL(4, 4)
DENSE_KERNEL(1, 1) DENSE_KERNEL(1, 2) DENSE_KERNEL(1, 3) DENSE_KERNEL(1, 4)
typedef void (*dense_kernel)(const float *, int64_t, const float *, float *);
static const dense_kernel DENSE_BLOCK[TOKENS_PER_PASS + 1] = {0, dense_4_1, dense_4_2, dense_4_3, dense_4_4};
static const dense_kernel DENSE_ROW[TOKENS_PER_PASS + 1] = {0, dense_1_1, dense_1_2, dense_1_3, dense_1_4};

/* y (n, d_out) = x (n, d_in) W^T + bias, 1 <= n <= TOKENS_PER_PASS (the caller checks: more tokens are a matrix
   product, for BLAS), by the threads of the parallel region it is called in, without a barrier at the end */
static void streamed_rows(const float *x, int64_t n, int64_t d_in, const float *W, const float *bias, float *y,
                          int64_t d_out) {
    int64_t blocks = d_out / DENSE_ROWS, units = blocks + d_out % DENSE_ROWS;  /* whole blocks, then single rows */
    int64_t chunk = CHUNK_BYTES / (DENSE_ROWS * d_in * (int64_t)sizeof(float));
    chunk = chunk > 1 ? chunk : 1;
    #pragma omp for schedule(guided, chunk) nowait
    for (int64_t u = 0; u < units; u++) {
        float sums[DENSE_ROWS * TOKENS_PER_PASS];
        int whole = u < blocks;
        int64_t i0 = whole ? u * DENSE_ROWS : blocks * DENSE_ROWS + (u - blocks);
        (whole ? DENSE_BLOCK : DENSE_ROW)[n](x, d_in, W + i0 * d_in, sums);
        for (int r = 0; r < (whole ? DENSE_ROWS : 1); r++)
            for (int t = 0; t < n; t++)
                y[t * d_out + i0 + r] = sums[r * TOKENS_PER_PASS + t] + (bias ? bias[i0 + r] : 0.0f);
    }
}

void streamed_linear(const float *x, int64_t n, int64_t d_in, const float *W, const float *bias, float *y,
                     int64_t d_out, int threads) {
    #pragma omp parallel num_threads(threads)
    streamed_rows(x, n, d_in, W, bias, y, d_out);
}

/* Packing, two passes over W ⊙ M (d_out, d_in): how many weights each block keeps (counts[b]), then, once the
   caller has summed them into starts, each block's mask bits and kept values in (group, row, column) order. */
static inline unsigned kept_bits(const float *w, int64_t n) {  /* bit j: w[j] != 0, for the n <= GROUP columns */
#ifdef __AVX512F__
    return _mm512_cmp_ps_mask(load_x(w, (int)(n < GROUP ? n : GROUP)), _mm512_setzero_ps(), _CMP_NEQ_UQ);
#else
    unsigned m = 0;
    for (int h = 0; h < HALVES; h++)
        m |= (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(load_x(w + h * LANES, (int)n - h * LANES), _mm256_setzero_ps(),
                                                        _CMP_NEQ_UQ)) << (h * LANES);
    return m;
#endif
}

/* the values of w[0..GROUP) whose bits are set in m, side by side at v; `room`: floats writable from v on */
static inline void store_kept(float *v, const float *w, unsigned m, int64_t room) {
#ifdef __AVX512F__
    (void)room;
    if (m) _mm512_mask_compressstoreu_ps(v, (__mmask16)m, _mm512_maskz_loadu_ps((__mmask16)m, w));
#else  /* each half's kept values moved to its front, the whole vector stored (the next half's values overwrite
          what lies past them) where there is room for it; one at a time at the end of a block */
    for (int h = 0; h < HALVES; h++, w += LANES) {
        unsigned byte = m >> (h * LANES) & LANE_BITS;
        if (room >= LANES) {
            __m256i to_front = _mm256_loadu_si256((const __m256i *)compression[byte]);
            _mm256_storeu_ps(v, _mm256_permutevar8x32_ps(_mm256_maskload_ps(w, _mm256_loadu_si256(
                                 (const __m256i *)lanes[byte])), to_front));
        } else
            for (unsigned b = byte; b; b &= b - 1) v[__builtin_popcount(byte & ((b & -b) - 1))] = w[__builtin_ctz(b)];
        v += __builtin_popcount(byte), room -= __builtin_popcount(byte);
    }
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
                store_kept(v, W + i * d_in + j0, m, values + starts[b + 1] - v);  /* the kept values, side by side */
                v += __builtin_popcount(m);
            }
    }
}


/* μ-MoE's router, selection and packing in one pass (packed_experts.route_and_pack): from W (d_out, d_in) and the
   prompt's input norms ||X_j||² (d_in,), each row's scores S_ij = |W_ij| · ||X_j|| (one float32 product, as
   pruners.wanda_score computes them), its top experts kept exactly as pruners.wanda_mask keeps them (the k smallest
   scores pruned, ties to the lower index; or N of every M), and the kept W_ij written straight into the packed
   stream. A thread holds one block's ROWS rows of scores at a time: no score matrix, no W ⊙ M.

   Non-negative floats order as their bit patterns do, so the selection runs on uint32 keys. A row's k-th smallest
   key t is guessed first (kth_smallest_guessed: the rows before it say where it lies, and vector passes bracket it
   down to a few keys, counted against each other); where a guess misses, a radix select finds it by its digits,
   high to low (RADIX_BITS), each pass counting the candidates left in a histogram and keeping those in the bin that
   holds the k-th. What is left of k at the end is how many of the keys equal to t are pruned (the lowest-index
   ones). */

#define HISTOGRAM_BINS 4096
#define RADIX_PASSES 4
/* a key's digits, high to low: the first takes the exponent and 3 bits of mantissa (a row's scores span few
   exponents, so few of its bins are used), the others at most 256 bins to walk: few candidates are left */
static const int RADIX_SHIFT[RADIX_PASSES] = {20, 12, 4, 0}, RADIX_BITS[RADIX_PASSES] = {12, 8, 8, 4};

/* the keys of from[0..n) whose digit (key >> shift & digits) is `bin`, in order, to candidates (which may be
   `from` itself: each is written at or before where it was read) -> how many */
static int64_t keep_in_bin(const uint32_t *from, int64_t n, int shift, uint32_t digits, uint32_t bin,
                           uint32_t *candidates) {
    int64_t m = 0, i = 0;
#ifdef __AVX512F__
    __m512i digit_mask = _mm512_set1_epi32((int)digits), bin_v = _mm512_set1_epi32((int)bin);
    for (; i + 16 <= n; i += 16) {
        __m512i k = _mm512_loadu_si512(from + i);
        __m512i digit = _mm512_and_si512(_mm512_srli_epi32(k, (unsigned)shift), digit_mask);
        __mmask16 in = _mm512_cmpeq_epi32_mask(digit, bin_v);
        _mm512_mask_compressstoreu_epi32(candidates + m, in, k);
        m += __builtin_popcount(in);
    }
#else
    __m256i digit_mask = _mm256_set1_epi32((int)digits), bin_v = _mm256_set1_epi32((int)bin);
    __m128i count = _mm_cvtsi32_si128(shift);
    for (; i + 8 <= n; i += 8) {
        __m256i k = _mm256_loadu_si256((const __m256i *)(from + i));
        __m256i digit = _mm256_and_si256(_mm256_srl_epi32(k, count), digit_mask);
        __m256i in = _mm256_cmpeq_epi32(digit, bin_v);
        for (unsigned b = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(in)); b; b &= b - 1)
            candidates[m++] = from[i + __builtin_ctz(b)];
    }
#endif
    for (; i < n; i++) {
        candidates[m] = from[i];
        m += (from[i] >> shift & digits) == bin;
    }
    return m;
}

/* the k-th smallest (1 <= k <= n) of n <= GROUP keys, each counted against all in a vector (keys: room for GROUP,
   what lies past n is not taken for a key); *ties_pruned: how many of the keys equal to it are among the k */
static uint32_t kth_of_few(const uint32_t *keys, int64_t n, int64_t k, int64_t *ties_pruned) {
    unsigned valid = (1u << n) - 1;
#ifdef __AVX512F__
    __m512i all = _mm512_maskz_loadu_epi32((__mmask16)valid, keys);
#else
    __m256i low = _mm256_loadu_si256((const __m256i *)keys), high = _mm256_loadu_si256((const __m256i *)(keys + LANES));
#endif
    for (int64_t i = 0; i < n; i++) {
#ifdef __AVX512F__
        __m512i key = _mm512_set1_epi32((int)keys[i]);  /* keys < 2^31: signed order is theirs */
        int64_t below = __builtin_popcount(_mm512_mask_cmplt_epi32_mask((__mmask16)valid, all, key));
        int64_t equal = __builtin_popcount(_mm512_mask_cmpeq_epi32_mask((__mmask16)valid, all, key));
#else
        __m256i key = _mm256_set1_epi32((int)keys[i]);
#define BITS(v) (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(v))
        int64_t below = __builtin_popcount((BITS(_mm256_cmpgt_epi32(key, low)) |
                                            BITS(_mm256_cmpgt_epi32(key, high)) << LANES) & valid);
        int64_t equal = __builtin_popcount((BITS(_mm256_cmpeq_epi32(key, low)) |
                                            BITS(_mm256_cmpeq_epi32(key, high)) << LANES) & valid);
#undef BITS
#endif
        if (below < k && k <= below + equal) {
            *ties_pruned = k - below;
            return keys[i];
        }
    }
    *ties_pruned = 0;
    return keys[0];  /* not reached: one of the keys is the k-th */
}

/* the k-th smallest (k >= 1) of keys[0..n); *ties_pruned: how many of the keys equal to it are among the k */
static uint32_t kth_smallest_key(const uint32_t *keys, int64_t n, int64_t k, uint32_t *candidates, uint32_t *histogram,
                                 int64_t *ties_pruned) {
    const uint32_t *from = keys;
    for (int pass = 0; pass < RADIX_PASSES; pass++) {
        if (n <= GROUP) return kth_of_few(from, n, k, ties_pruned);
        int shift = RADIX_SHIFT[pass];
        uint32_t digits = (1u << RADIX_BITS[pass]) - 1, lo = digits, hi = 0;
        for (int64_t i = 0; i < n; i++) {
            uint32_t d = from[i] >> shift & digits;
            histogram[d]++;
            lo = d < lo ? d : lo;
            hi = d > hi ? d : hi;
        }
        uint32_t bin = lo;
        while (k > histogram[bin]) k -= histogram[bin++];  /* the keys of lower bins are all pruned */
        int64_t in_bin = histogram[bin];
        memset(histogram + lo, 0, (hi - lo + 1) * sizeof(uint32_t));
        if (in_bin == n) continue;  /* every candidate is in the bin (all tied so far): nothing to drop */
        n = keep_in_bin(from, n, shift, digits, bin, candidates);
        from = candidates;
    }
    *ties_pruned = k;
    return from[0];  /* every candidate left has all the digits of the k-th: equals it */
}

/* the n <= GROUP columns of a row of W ⊙ M at `out`: w where m keeps it, 0 elsewhere (nothing written past n) */
static inline void store_gated(float *out, const float *w, unsigned m, int64_t n) {
    unsigned columns = n >= GROUP ? 0xffffu : (1u << n) - 1;
#ifdef __AVX512F__
    _mm512_mask_storeu_ps(out, (__mmask16)columns, _mm512_maskz_loadu_ps((__mmask16)m, w));
#else
    for (int h = 0; h < HALVES; h++) {
        __m256i keep = _mm256_loadu_si256((const __m256i *)lanes[m >> (h * LANES) & LANE_BITS]);
        __m256i inside = _mm256_loadu_si256((const __m256i *)lanes[columns >> (h * LANES) & LANE_BITS]);
        _mm256_maskstore_ps(out + h * LANES, inside, _mm256_maskload_ps(w + h * LANES, keep));
    }
#endif
}

/* one row's group of n <= GROUP columns at w, packed: the bits of the experts kept (`keep`) whose W_ij is not 0
   (pack leaves out zeros too), their values side by side at v (room: floats writable from v on), and W ⊙ M at
   `gated` if not NULL -> those bits */
static inline __attribute__((always_inline)) unsigned pack_group(const float *w, int64_t n, unsigned keep,
                                                                 float *gated, float *v, int64_t room) {
    unsigned m = keep & kept_bits(w, n);
    if (gated) store_gated(gated, w, m, n);
    store_kept(v, w, m, room);
    return m;
}

/* for the GROUP keys at `keys` (the row's scratch, zeros after its end): bits of those > t, and of those == t */
static inline unsigned compare_keys(const uint32_t *keys, uint32_t t, unsigned *equal) {
#ifdef __AVX512F__
    __m512i k = _mm512_loadu_si512(keys), tv = _mm512_set1_epi32((int)t);
    *equal = _mm512_cmpeq_epi32_mask(k, tv);
    return _mm512_cmpgt_epi32_mask(k, tv);  /* keys < 2^31 (|S| has no sign): signed order is theirs */
#else
    unsigned greater = 0, eq = 0;
    __m256i tv = _mm256_set1_epi32((int)t);
    for (int h = 0; h < HALVES; h++) {
        __m256i k = _mm256_loadu_si256((const __m256i *)(keys + h * LANES));
        greater |= (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(k, tv))) << (h * LANES);
        eq |= (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(k, tv))) << (h * LANES);
    }
    *equal = eq;
    return greater;
#endif
}

/* One row's keys, the bits of its scores |W_ij| · ||X_j|| (the float32 product pruners.wanda_score computes), at
   keys[0..d_in) -> the sum of the scores: the next rows' guess at their threshold scales with it */
static float score_row(const float *w, const float *norms, int64_t d_in, uint32_t *keys) {
    int64_t j = 0;
#ifdef __AVX512F__
    __m512 sum = _mm512_setzero_ps(), sum2 = _mm512_setzero_ps();  /* two running sums: half the adds' chain */
    __m512i magnitude = _mm512_set1_epi32(INT32_MAX);
#define SCORE(in, at)                                                                                         \
    _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(_mm512_maskz_loadu_ps(in, w + (at))), \
                                                       magnitude)), _mm512_maskz_loadu_ps(in, norms + (at)))
    for (; j + 2 * GROUP <= d_in; j += 2 * GROUP) {  /* whole groups, two at a time */
        __m512 s = SCORE(0xffff, j), s2 = SCORE(0xffff, j + GROUP);
        _mm512_storeu_si512(keys + j, _mm512_castps_si512(s));
        _mm512_storeu_si512(keys + j + GROUP, _mm512_castps_si512(s2));
        sum = _mm512_add_ps(sum, s), sum2 = _mm512_add_ps(sum2, s2);
    }
    for (; j < d_in; j += GROUP) {
        __mmask16 in = (__mmask16)(d_in - j >= GROUP ? 0xffffu : (1u << (d_in - j)) - 1);
        __m512 s = SCORE(in, j);
        _mm512_mask_storeu_epi32(keys + j, in, _mm512_castps_si512(s));
        sum = _mm512_add_ps(sum, s);
    }
#undef SCORE
    return _mm512_reduce_add_ps(_mm512_add_ps(sum, sum2));
#else
    __m256 sum = _mm256_setzero_ps(), magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(INT32_MAX));
    for (; j + LANES <= d_in; j += LANES) {
        __m256 s = _mm256_mul_ps(_mm256_and_ps(_mm256_loadu_ps(w + j), magnitude), _mm256_loadu_ps(norms + j));
        _mm256_storeu_si256((__m256i *)(keys + j), _mm256_castps_si256(s));
        sum = _mm256_add_ps(sum, s);
    }
    float total = hsum(sum);
    for (; j < d_in; j++) {
        float s = fabsf(w[j]) * norms[j];
        memcpy(keys + j, &s, sizeof s);
        total += s;
    }
    return total;
#endif
}

/* keys[0..n) in [lo, hi), in order, to candidates (room for n + GROUP) -> how many; *below: how many are < lo */
static int64_t bracket(const uint32_t *keys, int64_t n, uint32_t lo, uint32_t hi, uint32_t *candidates,
                       int64_t *below) {
    int64_t m = 0, under = 0, i = 0;
#ifdef __AVX512F__
    __m512i lo_v = _mm512_set1_epi32((int)lo), hi_v = _mm512_set1_epi32((int)hi);
    for (; i + GROUP <= n; i += GROUP) {  /* whole groups, then the last, masked */
        __m512i k = _mm512_loadu_si512(keys + i);
        __mmask16 low = _mm512_cmplt_epi32_mask(k, lo_v);  /* keys < 2^31: signed order is theirs */
        __mmask16 in = _mm512_mask_cmplt_epi32_mask(~low, k, hi_v);
        _mm512_storeu_si512(candidates + m, _mm512_maskz_compress_epi32(in, k));
        under += __builtin_popcount(low), m += __builtin_popcount(in);
    }
    if (i < n) {
        __mmask16 valid = (__mmask16)((1u << (n - i)) - 1);
        __m512i k = _mm512_maskz_loadu_epi32(valid, keys + i);
        __mmask16 low = _mm512_mask_cmplt_epi32_mask(valid, k, lo_v);
        __mmask16 in = _mm512_mask_cmplt_epi32_mask(valid & ~low, k, hi_v);
        _mm512_storeu_si512(candidates + m, _mm512_maskz_compress_epi32(in, k));
        under += __builtin_popcount(low), m += __builtin_popcount(in);
    }
#else
    __m256i lo_v = _mm256_set1_epi32((int)lo), hi_v = _mm256_set1_epi32((int)hi);
    for (; i + LANES <= n; i += LANES) {
        __m256i k = _mm256_loadu_si256((const __m256i *)(keys + i));
        unsigned low = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(lo_v, k)));
        unsigned in = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(hi_v, k))) & ~low;
        _mm256_storeu_si256((__m256i *)(candidates + m),
                            _mm256_permutevar8x32_epi32(k, _mm256_loadu_si256((const __m256i *)compression[in])));
        under += __builtin_popcount(low), m += __builtin_popcount(in);
    }
    for (; i < n; i++) {  /* the same signed order: a bound below 0 (sign bit set) is below every key */
        int32_t key = (int32_t)keys[i], low = key < (int32_t)lo;
        candidates[m] = keys[i];
        under += low, m += !low && key < (int32_t)hi;
    }
#endif
    *below = under;
    return m;
}

static inline uint32_t key_of(float s) {
    uint32_t key;
    memcpy(&key, &s, sizeof key);
    return key;
}

/* What a thread carries from row to row: its scratch, and the threshold over the mean score of the rows before
   (rows of one matrix have alike shapes of scores, if not alike scales), from which the next row's is guessed. */
typedef struct {
    uint32_t *candidates, *few;  /* room for a row's keys and GROUP more, each */
    uint32_t *histogram;         /* HISTOGRAM_BINS zeros, left so after each use */
    float ratio;                 /* 0: no row yet */
} selector_t;
#define GUESS_WIDTH 1.1f    /* the first bracket: the guess / 1.1 .. the guess · 1.1 (SmolLM2: ~88% of rows) */
#define GUESS_WIDER 1.33f   /* where it missed, the next one on that side, as far again: 1.1³ (~99.5% with it) */
#define GUESS_WEIGHT 0.25f  /* of the last row in the ratio carried on */
#define NARROW 6.0f         /* within a bracket: a second one, as wide as ~2 · 6 of its keys */

/* the k-th smallest of a row's keys that lie in the bracket [lo, hi), its m candidates (*ties_pruned as
   kth_smallest_key): so narrow a bracket holds them about evenly spread, so the k-th lies near lo + (k - 1/2) / m
   of the way to hi; the few in a bracket about 2 · NARROW of them wide around there are counted against each other,
   and where that misses, the radix select takes all m */
static uint32_t kth_in_bracket(selector_t *s, int64_t m, int64_t k, float lo, float hi, int64_t *ties_pruned) {
    if (m <= GROUP) return kth_of_few(s->candidates, m, k, ties_pruned);
    float step = (hi - lo) / (float)m, at = lo + ((float)k - 0.5f) * step;
    int64_t below, few = bracket(s->candidates, m, key_of(at - NARROW * step), key_of(at + NARROW * step), s->few,
                                 &below);  /* a bound below 0 has the sign bit: below every key */
    if (below < k && k <= below + few && few <= GROUP) return kth_of_few(s->few, few, k - below, ties_pruned);
    return kth_smallest_key(s->candidates, m, k, s->candidates, s->histogram, ties_pruned);
}

/* kth_smallest_key(keys, n, k, ...) of a row (the same key and ties), found faster: a vector pass counts the keys
   below a bracket around the guess and keeps those inside it, and only those are searched; where the k-th is not
   inside, a second bracket on the side it missed, then all the keys. `sum`: the row's scores summed. Every key
   equal to the k-th is inside a bracket that holds it, so its ties are counted there. */
static uint32_t kth_smallest_guessed(const uint32_t *keys, int64_t n, int64_t k, float sum, selector_t *s,
                                     int64_t *ties_pruned) {
    float mean = sum / (float)n, guess = s->ratio * mean;
    uint32_t t;
    int64_t below = 0, m = 0;
    float lo = guess / GUESS_WIDTH, hi = guess * GUESS_WIDTH;
    if (guess > 0 && guess < INFINITY) {
        m = bracket(keys, n, key_of(lo), key_of(hi), s->candidates, &below);
        if (k <= below || k > below + m) {  /* missed: the next bracket on the side of the k-th */
            if (k <= below)
                hi = lo, lo = lo / GUESS_WIDER;
            else
                lo = hi, hi = hi * GUESS_WIDER;
            m = bracket(keys, n, key_of(lo), key_of(hi), s->candidates, &below);
        }
    }
    if (below < k && k <= below + m)
        t = kth_in_bracket(s, m, k - below, lo, hi, ties_pruned);
    else
        t = kth_smallest_key(keys, n, k, s->candidates, s->histogram, ties_pruned);
    float threshold;
    memcpy(&threshold, &t, sizeof threshold);
    if (mean > 0 && threshold > 0) {
        float ratio = threshold / mean;
        s->ratio = s->ratio > 0 ? (1 - GUESS_WEIGHT) * s->ratio + GUESS_WEIGHT * ratio : ratio;
    }
    return t;
}

/* Where a row is cut: its keys > t are kept, and of those == t all but the first `ties` (lowest index first) */
typedef struct {
    uint32_t t;
    int64_t ties;
} cut_t;

/* One row's selection: with M > 0 (N:M), its kept-expert bits group by group (keep[g], GROUP columns each), in each
   M columns all but the N smallest (ties: lower index first); else where it is cut, its k smallest pruned (k = 0:
   t = 0, no ties: every key is kept) -- kept_in_group then reads the bits off the keys as the row is packed. */
static void select_row(const uint32_t *keys, int64_t d_in, int64_t k, int64_t N, int64_t M, float sum, selector_t *s,
                       uint16_t *keep, cut_t *cut) {
    if (M > 0) {
        memset(keep, 0, (d_in + GROUP - 1) / GROUP * sizeof(uint16_t));
        for (int64_t j0 = 0; j0 < d_in; j0 += M)
            for (int64_t j = j0; j < j0 + M; j++) {
                int64_t rank = 0;  /* how many of its M come before it in the order (score, index) */
                for (int64_t l = j0; l < j0 + M; l++) rank += keys[l] < keys[j] || (keys[l] == keys[j] && l < j);
                if (rank >= N) keep[j / GROUP] |= (uint16_t)(1u << (j % GROUP));
            }
        return;
    }
    cut->ties = 0;
    cut->t = k > 0 ? kth_smallest_guessed(keys, d_in, k, sum, s, &cut->ties) : 0;
}

/* the kept-expert bits of a row's n <= GROUP keys at `keys` (its groups taken in order: the ties pruned are the
   first ones met) */
static inline __attribute__((always_inline)) unsigned kept_in_group(const uint32_t *keys, int64_t n, cut_t *cut) {
    unsigned columns = n >= GROUP ? 0xffffu : (1u << n) - 1, equal;
    unsigned m = compare_keys(keys, cut->t, &equal);
    for (equal &= columns; equal; equal &= equal - 1)  /* ties at t, lowest index first: the first are pruned */
        if (cut->ties > 0) cut->ties--;
        else m |= equal & -equal;
    return m & columns;
}

/* W (d_out, d_in), the prompt's ||X_j||² (d_in,) -> bits (as pack_blocks writes them) and each block's values at
   values + b · capacity (capacity: what a block keeps at most, ROWS rows' kept count); counts[b]: how many it wrote
   (fewer where a kept W_ij is 0, which pack leaves out too). route_and_pack_starts then closes the gaps. `gated`, if
   not NULL, (d_out, d_in): receives W ⊙ M too, for the prompt's own gated product (a scratch matrix reused Linear
   after Linear). With bits NULL, W ⊙ M alone is written (packed_experts.route_and_gate: the masked path's experts,
   pruners' masks). */
void route_and_pack(const float *W, const float *sqnorms, int64_t d_out, int64_t d_in, int64_t k, int64_t N,
                    int64_t M, uint16_t *bits, float *values, int64_t capacity, int64_t *counts, float *gated,
                    int threads) {
    int64_t groups = (d_in + GROUP - 1) / GROUP, blocks = (d_out + ROWS - 1) / ROWS, stride = groups * GROUP, j = 0;
    float *norms = malloc((d_in + GROUP) * sizeof(float));  /* ||X_j||: IEEE's square root, torch.sqrt's to the bit */
#ifdef __AVX512F__
    for (; j + GROUP <= d_in; j += GROUP) _mm512_storeu_ps(norms + j, _mm512_sqrt_ps(_mm512_loadu_ps(sqnorms + j)));
#else
    for (; j + LANES <= d_in; j += LANES) _mm256_storeu_ps(norms + j, _mm256_sqrt_ps(_mm256_loadu_ps(sqnorms + j)));
#endif
    for (; j < d_in; j++) _mm_store_ss(norms + j, _mm_sqrt_ss(_mm_load_ss(sqnorms + j)));
    #pragma omp parallel num_threads(threads)
    {
        uint32_t *keys = calloc(ROWS * stride + 2 * (d_in + GROUP) + HISTOGRAM_BINS, sizeof(uint32_t));
        selector_t selector = {keys + ROWS * stride, keys + ROWS * stride + d_in + GROUP,
                               keys + ROWS * stride + 2 * (d_in + GROUP), 0};
        uint16_t *keep = malloc(ROWS * groups * sizeof(uint16_t));  /* N:M's bits */
        cut_t cut[ROWS];
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            for (int r = 0; r < ROWS; r++) {
                int64_t i = b * ROWS + r;
                if (i >= d_out) {  /* padding rows: empty */
                    memset(keep + r * groups, 0, groups * sizeof(uint16_t));
                    continue;
                }
                uint32_t *keys_r = keys + r * stride;
                float sum = score_row(W + i * d_in, norms, d_in, keys_r);
                select_row(keys_r, d_in, k, N, M, sum, &selector, keep + r * groups, cut + r);
            }
/* the row's kept-expert bits in group g (of n <= GROUP columns): N:M's, or read off its keys where it is cut */
#define KEPT(r, g, n) \
    (M > 0 ? keep[(r) * groups + (g)] : kept_in_group(keys + (r) * stride + (g) * GROUP, n, cut + (r)))
            if (!bits) {  /* route_and_gate: W ⊙ M alone */
                for (int r = 0; r < ROWS && b * ROWS + r < d_out; r++)
                    for (int64_t g = 0, i = b * ROWS + r; g < groups; g++) {
                        if (i + ROWS < d_out)  /* the next block's W into L2 meanwhile, as below */
                            _mm_prefetch((const char *)(W + (i + ROWS) * d_in + g * GROUP), _MM_HINT_T1);
                        store_gated(gated + i * d_in + g * GROUP, W + i * d_in + g * GROUP,
                                    KEPT(r, g, d_in - g * GROUP), d_in - g * GROUP);
                    }
                continue;
            }
            float *v = values + b * capacity, *end = values + (b + 1) * capacity;
            uint16_t *bits_b = bits + b * groups * ROWS;
            for (int64_t g = 0; g < groups; g++)
                for (int r = 0; r < ROWS; r++) {
                    int64_t i = b * ROWS + r, j0 = g * GROUP;
                    if (i + ROWS < d_out)  /* the next block's W into L2 meanwhile: its scoring waits less on memory */
                        _mm_prefetch((const char *)(W + (i + ROWS) * d_in + j0), _MM_HINT_T1);
                    unsigned m = 0;  /* padding rows: empty */
                    if (i < d_out && j0 + GROUP <= d_in)  /* a whole group: its masks known at compile time */
                        m = pack_group(W + i * d_in + j0, GROUP, KEPT(r, g, GROUP),
                                       gated ? gated + i * d_in + j0 : NULL, v, end - v);
                    else if (i < d_out)
                        m = pack_group(W + i * d_in + j0, d_in - j0, KEPT(r, g, d_in - j0),
                                       gated ? gated + i * d_in + j0 : NULL, v, end - v);
                    bits_b[g * ROWS + r] = (uint16_t)m;
                    v += __builtin_popcount(m);
                }
            counts[b] = v - (values + b * capacity);
#undef KEPT
        }
        free(keys), free(keep);
    }
    free(norms);
}

/* starts (blocks + 1,) from route_and_pack's counts, each block's values moved down to close the gaps its
   neighbours left (none unless a kept weight was 0), and `pad` zeros after the last one -> how many values */
int64_t route_and_pack_starts(float *values, int64_t blocks, int64_t capacity, const int64_t *counts, int64_t *starts,
                              int64_t pad) {
    starts[0] = 0;
    for (int64_t b = 0; b < blocks; b++) {
        if (starts[b] != b * capacity) memmove(values + starts[b], values + b * capacity, counts[b] * sizeof(float));
        starts[b + 1] = starts[b] + counts[b];
    }
    memset(values + starts[blocks], 0, pad * sizeof(float));
    return starts[blocks];
}
