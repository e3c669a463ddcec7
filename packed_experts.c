/* packed_experts.c: the decode kernel that reads only a prompt's kept micro-experts, y = x (W ⊙ M)^T + b, and the
   packing that builds its stream from W ⊙ M. Loaded with ctypes by packed_experts.py, whose docstring draws the
   layout (blocks of ROWS rows, groups of GROUP columns, one stream of mask bits and kept values per block) and whose
   unpack() is the plain-PyTorch reference the tests compare with. Built with -march=native (AVX-512 where the CPU
   has it) or -mno-avx512f (the AVX2 path), -fopenmp: the threads are torch's own libgomp pool. */

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
