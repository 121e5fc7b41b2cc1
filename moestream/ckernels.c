/* Products of a few tokens with 4-bit group-quantised matrices and llama.cpp's Q4_K / Q5_K / Q6_K blocks, and of one
 * token with dense half-precision matrices, on AVX-512 CPUs, summed in float32; one query's attention, RMSNorm and
 * the experts' weighted sum of a decode token; and (opt-in, lossy) experts with int8-rounded activations.
 *
 * A matrix is rows x cols/2 bytes, two codes per byte (low nibble first), one scale per group of
 * `group` codes along its row (float32, float16 or bfloat16). A code's value comes from a 16-entry
 * table: int4 (code - 8) or e2m1. Each product is value * x * scale, exactly as kernels.grouped_matvec
 * computes it; only the order of the float32 sums differs.
 *
 * Built at first use by ckernels.py with the machine's C compiler (-O3 -march=native -ffp-contract=off: no
 * multiply-add is fused unless written so, which the bit-for-bit roundings below rely on). Without
 * AVX-512 nothing but ckernels_available() (0) is built, and the compiled torch kernels are used.
 *
 * Threads: OpenMP, linked against the libgomp torch has already loaded (the same soname), so the
 * rows are shared out on torch's own thread pool rather than a second pool fighting it for cores. */

#include <stdint.h>

#ifndef __AVX512F__
int ckernels_available(void) { return 0; }
#else
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

int ckernels_available(void) { return 1; }

enum { SCALE_F32 = 0, SCALE_F16 = 1, SCALE_BF16 = 2 };

/* A group is a whole number of 16-byte (32-code) blocks: one vector of codes per load. */
int ckernels_group_ok(int group) { return group >= 32 && group % 32 == 0; }

/* x [cols] split into the partners of the low (xe) and high (xo) nibbles, in the order rows_block unpacks
 * each 16-byte block of codes: lane l of a block holds byte 4 (l % 4) + l / 4 (see rows_block). */
static void split(const float *x, int cols, float *xe, float *xo) {
    for (int c = 0; c < cols / 32; c++)
        for (int l = 0; l < 16; l++) {
            const int b = 4 * (l % 4) + l / 4;
            xe[16 * c + l] = x[32 * c + 2 * b];
            xo[16 * c + l] = x[32 * c + 2 * b + 1];
        }
}

/* n <= 16 values of dtype `kind` (float32, float16, bfloat16) from p[i..] as floats, zeros past n. */
static inline __m512 load_floats(const void *s, int kind, long i, int n) {
    const __mmask16 m = (__mmask16)((1u << n) - 1);
    if (kind == SCALE_F16) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)s + i));
    if (kind == SCALE_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)s + i)), 16));
    return _mm512_maskz_loadu_ps(m, (const float *)s + i);
}

/* 16 floats rounded to bfloat16 (nearest even; NaN kept), as the bits of their upper halves. */
static inline __m512i bf16_bits(__m512 f) {
    const __m512i u = _mm512_castps_si512(f);
    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                           _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), r, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
}

/* f rounded to the dtype `kind` (nearest even), as floats. */
static inline __m512 round_vec(__m512 f, int kind) {
    if (kind == SCALE_F16) return _mm512_cvtph_ps(_mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    if (kind == SCALE_BF16) return _mm512_castsi512_ps(_mm512_and_si512(bf16_bits(f), _mm512_set1_epi32((int)0xffff0000u)));
    return f;
}

/* n <= 16 floats stored at p[i..] in the dtype `kind`, rounded to nearest even. */
static inline void store_vec(void *p, long i, __m512 f, int kind, int n) {
    const __mmask16 m = (__mmask16)((1u << n) - 1);
    if (kind == SCALE_F16)
        _mm256_mask_storeu_epi16((uint16_t *)p + i, m, _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    else if (kind == SCALE_BF16)
        _mm256_mask_storeu_epi16((uint16_t *)p + i, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_bits(f), 16)));
    else
        _mm512_mask_storeu_ps((float *)p + i, m, f);
}

/* ROWS rows at once, one accumulator each: independent chains (one fma per group and row would
 * otherwise wait on the previous one's latency), x's vectors loaded once for all of them, the rows ahead
 * prefetched (measured on a 2-core EPYC: 0.20 against 0.30 ms per expert read from memory). Codes become
 * floats by a table permute (vpermps reads the low 4 bits of each lane). Few shuffles, the port they share
 * being the limit on Intel cores: a block's 16 bytes are broadcast by the load itself and shifted per lane
 * (lane l keeps byte 4 (l % 4) + l / 4 in its low bits: split() orders x to match), and each group's scale is
 * broadcast from memory (against a zero-extension and a permute per block and row, an expert in cache on a Xeon
 * VM: 0.123 against 0.141 ms). */
/* Two rows a block against four, 8 experts a call on a Xeon VM: 0.120-0.126 against 0.158 ms an expert read from
 * memory, 0.094 against 0.124 in cache: two rows' streams keep the hardware prefetchers ahead of the arithmetic. */
#define ROWS 2
#define PREFETCH_ROWS 8  /* rows ahead (4 and 12 measured the same with two rows) */
static void rows_block(const uint8_t *q, long stride, const void *s, int kind, long s0, long sstride, int groups, int gb,
                       const float *xe, const float *xo, __m512 lut, float *y) {
    const __m512i shift = _mm512_set_epi32(24, 24, 24, 24, 16, 16, 16, 16, 8, 8, 8, 8, 0, 0, 0, 0);
    __m512 acc[ROWS];
    float sf[ROWS][16];
    for (int i = 0; i < ROWS; i++) acc[i] = _mm512_setzero_ps();
    for (int g0 = 0; g0 < groups; g0 += 16) {
        const int n = groups - g0 < 16 ? groups - g0 : 16;
        for (int i = 0; i < ROWS; i++) _mm512_storeu_ps(sf[i], load_floats(s, kind, s0 + i * sstride + g0, n));
        for (int j = 0; j < n; j++) {
            const long g = g0 + j;
            if ((g * gb) % 64 == 0)
                for (int i = 0; i < ROWS; i++)
                    _mm_prefetch((const char *)(q + (i + PREFETCH_ROWS) * stride + g * gb), _MM_HINT_T0);
            for (int k = 0; k < gb; k += 16) {
                const __m512 e = _mm512_loadu_ps(xe + g * gb + k), o = _mm512_loadu_ps(xo + g * gb + k);
                for (int i = 0; i < ROWS; i++) {
                    const __m512i b = _mm512_srlv_epi32(
                        _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(q + i * stride + g * gb + k))), shift);
                    const __m512 lo = _mm512_permutexvar_ps(b, lut);
                    const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut);
                    const __m512 t = _mm512_fmadd_ps(hi, o, _mm512_mul_ps(lo, e));
                    acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(sf[i][j]), t, acc[i]);
                }
            }
        }
    }
    for (int i = 0; i < ROWS; i++) y[i] = _mm512_reduce_add_ps(acc[i]);
}

/* y[r] for r < rows against the split x. Inside a parallel region: the row blocks are shared out
 * among its threads, the last rows % ROWS done one at a time (a block whose rows are all that one: strides 0). */
static void rows_dot(const uint8_t *q, const void *s, int kind, int rows, int cols, int group,
                     const float *xe, const float *xo, const float *lut, float *y) {
    const int groups = cols / group, gb = group / 2;
    const long stride = cols / 2;
    const __m512 table = _mm512_loadu_ps(lut);
    const int blocks = rows / ROWS;
#pragma omp for schedule(static)
    for (int r = 0; r < blocks; r++)
        rows_block(q + r * ROWS * stride, stride, s, kind, (long)r * ROWS * groups, groups, groups, gb, xe, xo, table,
                   y + r * ROWS);
#pragma omp for schedule(static)
    for (int r = blocks * ROWS; r < rows; r++) {
        float one[ROWS];
        rows_block(q + r * stride, 0, s, kind, (long)r * groups, 0, groups, gb, xe, xo, table, one);
        y[r] = one[0];
    }
}

/* M tokens' rows of x [M x cols] split into xs: M even halves, then M odd halves. */
static void split_tokens(const float *x, int M, int cols, float *xs) {
    for (int m = 0; m < M; m++) split(x + (long)m * cols, cols, xs + (long)m * (cols / 2), xs + (long)(M + m) * (cols / 2));
}

/* The products of M tokens, token after token inside one parallel region. Reusing each unpacked code for
 * several tokens (one row, 8 tokens a pass) measured slower per token here than this (0.21 against 0.16 ms
 * per expert and token, with blocks of 4 rows then): the row blocks share x's loads and keep independent chains. */
static void rows_any(const uint8_t *q, const void *s, int kind, int rows, int cols, int group, const float *xs,
                     int M, const float *lut, float *y) {
    const long half = cols / 2;
    for (int m = 0; m < M; m++)
        rows_dot(q, s, kind, rows, cols, group, xs + m * half, xs + (M + m) * half, lut, y + (long)m * rows);
}

/* llama.cpp's Q4_K and Q5_K blocks: 256 values in 144 (176) bytes: fp16 d and dmin, 12 bytes of 6-bit scales and
 * mins for 8 sub-blocks of 32, (Q5_K: 32 bytes of fifth bits,) then 128 bytes of codes: byte i of 32-byte chunk j
 * holds value 64 j + i in its low nibble and 64 j + 32 + i in its high one (Q5_K: their fifth bits are bits 2 j
 * and 2 j + 1 of fifth-bit byte i). A value is d sc q - dmin m; a row's product is summed per sub-block as
 * d sc (sum of q x) - dmin m (sum of x), the way kquants.matvec computes it (its scales d sc, dmin m are the
 * same float32 products). Codes become floats through a 32-entry table (vpermt2ps reads 5 index bits). */
#define Q4K_BYTES 144
#define Q5K_BYTES 176
static inline float f16_at(const uint8_t *p) {
    _Float16 h;
    memcpy(&h, p, 2);
    return (float)h;
}

static float q45k_row(const uint8_t *row, int blocks, int five, const float *x, const float *xsum, __m512 lo16,
                      __m512 hi16) {
    const int bytes = five ? Q5K_BYTES : Q4K_BYTES, codes_at = five ? 48 : 16;
    const __m512i m15 = _mm512_set1_epi32(15), one = _mm512_set1_epi32(1);
    __m512 acc = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
    float minus = 0;
    for (int b = 0; b < blocks; b++) {
        const uint8_t *blk = row + (long)b * bytes, *sc = blk + 4, *qh = blk + 16, *qs = blk + codes_at;
        const float d = f16_at(blk), dmin = f16_at(blk + 2);
        const float *xb = x + (long)b * 256;
        for (int j = 0; j < 4; j++) {
            /* sub-blocks 2j and 2j+1: their 6-bit scale and min (llama.cpp's get_scale_min_k4) */
            int s0, m0, s1, m1;
            const int i0 = 2 * j, i1 = 2 * j + 1;
            if (i0 < 4) s0 = sc[i0] & 63, m0 = sc[i0 + 4] & 63;
            else s0 = (sc[i0 + 4] & 0xF) | ((sc[i0 - 4] >> 6) << 4), m0 = (sc[i0 + 4] >> 4) | ((sc[i0] >> 6) << 4);
            if (i1 < 4) s1 = sc[i1] & 63, m1 = sc[i1 + 4] & 63;
            else s1 = (sc[i1 + 4] & 0xF) | ((sc[i1 - 4] >> 6) << 4), m1 = (sc[i1 + 4] >> 4) | ((sc[i1] >> 6) << 4);
            const __m512 ds0 = _mm512_set1_ps(d * (float)s0), ds1 = _mm512_set1_ps(d * (float)s1);
            minus += dmin * (float)m0 * xsum[b * 8 + i0] + dmin * (float)m1 * xsum[b * 8 + i1];
            for (int h = 0; h < 2; h++) {  /* bytes 16 h .. 16 h + 15 of the chunk */
                const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qs + 32 * j + 16 * h)));
                __m512i l = _mm512_and_si512(v, m15), u = _mm512_srli_epi32(v, 4);
                if (five) {
                    const __m512i f = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qh + 16 * h)));
                    l = _mm512_or_si512(l, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(f, i0), one), 4));
                    u = _mm512_or_si512(u, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(f, i1), one), 4));
                }
                const __m512 lo = _mm512_permutex2var_ps(lo16, l, hi16), hi = _mm512_permutex2var_ps(lo16, u, hi16);
                acc = _mm512_fmadd_ps(ds0, _mm512_mul_ps(lo, _mm512_loadu_ps(xb + 64 * j + 16 * h)), acc);
                odd = _mm512_fmadd_ps(ds1, _mm512_mul_ps(hi, _mm512_loadu_ps(xb + 64 * j + 32 + 16 * h)), odd);
            }
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc, odd)) - minus;
}

/* llama.cpp's Q6_K blocks: 256 values in 210 bytes (128 bytes of low 4 bits, 64 of high 2 bits, 16 int8
 * scales, fp16 d). Per 128-value half: low-bit byte l (l < 64) holds values l (low nibble, l < 32) / l (l >= 32)
 * and l + 64; high-bit byte l (l < 32) holds the top 2 bits of values l, l + 32, l + 64, l + 96; value is
 * d sc (q - 32) with one scale per 16 values, so each 16-lane vector below is one scale's stretch. */
#define Q6K_BYTES 210
static float q6k_row(const uint8_t *row, int blocks, const float *x) {
    __m512 acc[4];
    for (int i = 0; i < 4; i++) acc[i] = _mm512_setzero_ps();
    const __m512i m15 = _mm512_set1_epi32(15), m3 = _mm512_set1_epi32(3), k32 = _mm512_set1_epi32(32);
    for (int b = 0; b < blocks; b++) {
        const uint8_t *blk = row + (long)b * Q6K_BYTES;
        const int8_t *sc = (const int8_t *)(blk + 192);
        const float d = f16_at(blk + 208);
        for (int n = 0; n < 2; n++) {
            const uint8_t *ql = blk + 64 * n, *qh = blk + 128 + 32 * n;
            const float *xb = x + (long)b * 256 + 128 * n;
            for (int l = 0; l < 32; l += 16) {
                const __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(ql + l)));
                const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(ql + l + 32)));
                const __m512i h = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qh + l)));
                const __m512i q[4] = {
                    _mm512_or_si512(_mm512_and_si512(a, m15), _mm512_slli_epi32(_mm512_and_si512(h, m3), 4)),
                    _mm512_or_si512(_mm512_and_si512(c, m15), _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h, 2), m3), 4)),
                    _mm512_or_si512(_mm512_srli_epi32(a, 4), _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h, 4), m3), 4)),
                    _mm512_or_si512(_mm512_srli_epi32(c, 4), _mm512_slli_epi32(_mm512_srli_epi32(h, 6), 4))};
                const int is = 8 * n + l / 16;
                for (int i = 0; i < 4; i++) {
                    const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(q[i], k32));
                    const __m512 s = _mm512_set1_ps(d * (float)sc[is + 2 * i]);
                    acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(v, s), _mm512_loadu_ps(xb + l + 32 * i), acc[i]);
                }
            }
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

/* y [M x rows] = x W^T for M tokens x [M x cols] and W [rows x cols / 256 blocks] of Q`bits`_K (4, 5 or 6). */
int ckernels_kquant_matvec(const uint8_t *w, int bits, int rows, int cols, const float *x, int M, float *y,
                           int threads) {
    const int blocks = cols / 256;
    if (bits == 6) {
#pragma omp parallel num_threads(threads)
        for (int m = 0; m < M; m++) {
#pragma omp for schedule(static)
            for (int r = 0; r < rows; r++)
                y[(long)m * rows + r] = q6k_row(w + (long)r * blocks * Q6K_BYTES, blocks, x + (long)m * cols);
        }
        return 0;
    }
    float *xsum = malloc(sizeof(float) * (cols / 32) * M);
    if (!xsum) return -1;
    for (int m = 0; m < M; m++)
        for (int g = 0; g < cols / 32; g++) {
            float t = 0;
            for (int k = 0; k < 32; k++) t += x[(long)m * cols + g * 32 + k];
            xsum[(long)m * (cols / 32) + g] = t;
        }
    const __m512 lo16 = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 hi16 = _mm512_add_ps(lo16, _mm512_set1_ps(16));
    const long stride = (long)blocks * (bits == 5 ? Q5K_BYTES : Q4K_BYTES);
#pragma omp parallel num_threads(threads)
    for (int m = 0; m < M; m++) {
#pragma omp for schedule(static)
        for (int r = 0; r < rows; r++)
            y[(long)m * rows + r] = q45k_row(w + r * stride, blocks, bits == 5, x + (long)m * cols,
                                             xsum + (long)m * (cols / 32), lo16, hi16);
    }
    free(xsum);
    return 0;
}

/* One row of a dense half-precision W against xf, `kind` a constant at each call site (always inlined): the
 * compiler then emits one loop per dtype with no test of the dtype inside. The row DENSE_AHEAD bytes ahead is
 * prefetched. */
#define DENSE_AHEAD 1024
static inline __attribute__((always_inline)) float dense_row(const uint16_t *wr, const float *xf, int cols, int kind) {
    const int full = cols / 64 * 64;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int k = 0; k < full; k += 64) {
        _mm_prefetch((const char *)(wr + k) + DENSE_AHEAD, _MM_HINT_T0);
        a0 = _mm512_fmadd_ps(load_floats(wr + k, kind, 0, 16), _mm512_loadu_ps(xf + k), a0);
        a1 = _mm512_fmadd_ps(load_floats(wr + k + 16, kind, 0, 16), _mm512_loadu_ps(xf + k + 16), a1);
        a2 = _mm512_fmadd_ps(load_floats(wr + k + 32, kind, 0, 16), _mm512_loadu_ps(xf + k + 32), a2);
        a3 = _mm512_fmadd_ps(load_floats(wr + k + 48, kind, 0, 16), _mm512_loadu_ps(xf + k + 48), a3);
    }
    for (int k = full; k < cols; k += 16) {
        const int n = cols - k < 16 ? cols - k : 16;
        a0 = _mm512_fmadd_ps(load_floats(wr + k, kind, 0, n), _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), xf + k), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

/* y [rows] = W x for a dense half-precision W [rows x cols] and x [cols] of the same dtype: each product
 * exact in float32 (a half times a half), summed in float32 as torch's F.linear does, in another order.
 * Memory-bound: one row at a time streamed with four accumulators (4-row blocks with prefetch measured
 * 24 GB/s on a 2-core EPYC, this 28). */
int ckernels_dense_matvec(const uint16_t *w, int kind, int rows, int cols, const uint16_t *x, void *y, int ykind,
                          int threads) {
    float *xf = malloc(sizeof(float) * cols);
    if (!xf) return -1;
    for (int k = 0; k < cols; k += 16) {
        const int n = cols - k < 16 ? cols - k : 16;
        _mm512_mask_storeu_ps(xf + k, (__mmask16)((1u << n) - 1), load_floats(x + k, kind, 0, n));
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int r = 0; r < rows; r++) {
        const float d = kind == SCALE_BF16 ? dense_row(w + (long)r * cols, xf, cols, SCALE_BF16)
                                           : dense_row(w + (long)r * cols, xf, cols, SCALE_F16);
        if (ykind == SCALE_F32) ((float *)y)[r] = d;
        else store_vec(y, r, _mm512_set1_ps(d), ykind, 1);  /* rounded to nearest even, as .to(dtype) */
    }
    free(xf);
    return 0;
}

/* A guess at a layer's experts before its attention runs: the k largest of router (g * x) in float32, g the
 * post-attention norm's weight and x the layer's input (the norm's 1/rms scales every logit alike: no top-k
 * changes), written into idx, largest first. Only a guess (runtime.guess_own): its order among equal values is
 * free. */
int ckernels_router_guess(const uint16_t *router, const void *g, const void *x, int kind, int experts, int hidden,
                          int k, int *idx, int threads) {
    float *xf = malloc(sizeof(float) * ((size_t)hidden + experts));
    if (!xf || k > experts) { free(xf); return -1; }
    float *logits = xf + hidden;
    for (int i = 0; i < hidden; i += 16) {
        const int n = hidden - i < 16 ? hidden - i : 16;
        _mm512_mask_storeu_ps(xf + i, (__mmask16)((1u << n) - 1),
                              _mm512_mul_ps(load_floats(g, kind, i, n), load_floats(x, kind, i, n)));
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int r = 0; r < experts; r++)
        logits[r] = kind == SCALE_BF16 ? dense_row(router + (long)r * hidden, xf, hidden, SCALE_BF16)
                                       : dense_row(router + (long)r * hidden, xf, hidden, SCALE_F16);
    for (int j = 0; j < k; j++) {  /* k passes: k is small (top-8 of 128 here) */
        int best = 0;
        for (int r = 1; r < experts; r++)
            if (logits[r] > logits[best]) best = r;
        idx[j] = best;
        logits[best] = -INFINITY;
    }
    free(xf);
    return 0;
}

/* y [M x rows] = x W^T for M tokens x [M x cols]. */
int ckernels_matvec(const uint8_t *q, const void *s, int kind, int rows, int cols, int group, const float *lut,
                    const float *x, int M, float *y, int threads) {
    float *xs = malloc(sizeof(float) * cols * M);
    if (!xs) return -1;
    split_tokens(x, M, cols, xs);
#pragma omp parallel num_threads(threads)
    rows_any(q, s, kind, rows, cols, group, xs, M, lut, y);
    free(xs);
    return 0;
}

/* silu(gate) * up, in place over the gate half of one token's [gate | up] row. */
static void silu_mul(float *g, int inter) {
    for (int i = 0; i < inter; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * g[inter + i];
}

/* A SiLU-gated expert for M tokens: y [M x hidden] = down(silu(gate x) * up x), in one parallel region.
 * gate_up is [2 inter x hidden] (gate rows, then up rows), down [hidden x inter]. */
int ckernels_silu_mlp(const uint8_t *gq, const void *gs, int gkind, int ggroup, const uint8_t *dq,
                      const void *ds, int dkind, int dgroup, int hidden, int inter, const float *lut,
                      const float *x, int M, float *y, int threads) {
    float *gate = malloc(sizeof(float) * ((long)M * (3 * inter + hidden)));
    if (!gate) return -1;
    float *xs = gate + (long)M * 2 * inter, *hs = xs + (long)M * hidden;
    split_tokens(x, M, hidden, xs);
#pragma omp parallel num_threads(threads)
    {
        rows_any(gq, gs, gkind, 2 * inter, hidden, ggroup, xs, M, lut, gate);
#pragma omp single
        {
            for (int m = 0; m < M; m++) silu_mul(gate + (long)m * 2 * inter, inter);
            for (int m = 0; m < M; m++)
                split(gate + (long)m * 2 * inter, inter, hs + (long)m * (inter / 2), hs + (long)(M + m) * (inter / 2));
        }
        rows_any(dq, ds, dkind, hidden, inter, dgroup, hs, M, lut, y);
    }
    free(gate);
    return 0;
}
/* ---- int8 activations (opt-in and lossy: load(activations="int8")) ----
 * llama.cpp's Q4_0 x Q8_0 product for our int4 layout: x is rounded per block of 32 to int8 with one float scale
 * (max |x| / 127), and 64 codes at a time meet 64 int8 values in one vpdpbusd (unsigned code x signed int8, four
 * products summed into each int32 lane), against 16 lanes of float fmas per 32 codes in rows_block. Codes are
 * stored +8: each lane starts from -8 x the sum of its four int8 values. Groups of 32 only (one block, one scale). */
static inline int pad64(int cols) { return (cols + 63) / 64 * 64; }  /* an int8 x's length, in pairs of blocks */

#ifdef __AVX512VNNI__
/* x [cols] (cols % 32 == 0) as int8 blocks laid out pairwise as the codes unpack: [A even, B even, A odd, B odd],
 * 16 bytes each, an odd last block paired with zeros; dx[b] each block's scale; corr: each int32 lane's -8 x the
 * sum of its four int8 values. The arrays hold pad(cols) = cols rounded up to 64 values. */
static void quantize_q8(const float *x, int cols, int8_t *xq, float *dx, int32_t *corr) {
    const int blocks = cols / 32;
    if (blocks % 2) {
        memset(xq + 32 * (blocks - 1), 0, 64);
        dx[blocks] = 0.0f;
    }
    for (int b = 0; b < blocks; b++) {
        const float *xb = x + 32 * b;
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xb[i]));
        const float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        int8_t *p = xq + 64 * (b / 2) + 16 * (b % 2);
        dx[b] = d;
        for (int k = 0; k < 16; k++) {
            p[k] = (int8_t)lrintf(xb[2 * k] * id);
            p[32 + k] = (int8_t)lrintf(xb[2 * k + 1] * id);
        }
    }
    for (int l = 0; l < pad64(cols) / 4; l++)
        corr[l] = -8 * (xq[4 * l] + xq[4 * l + 1] + xq[4 * l + 2] + xq[4 * l + 3]);
}

/* One row at a time here (four in rows_block): with the arithmetic this cheap the kernel waits on memory, and
 * one sequential stream per thread reads faster than four interleaved rows (an expert read from memory, 8 per
 * call, 2-core EPYC: 0.083 against 0.125-0.13 ms; the float kernel: no difference, 0.146). */
#define Q8_ROWS 1
static void rows_block_q8(const uint8_t *q, long stride, const void *s, int kind, long s0, long sstride, int blocks,
                          const int8_t *xq, const float *dx, const int32_t *corr, float *y) {
    const __m512i pair = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m512 acc[Q8_ROWS], cv[Q8_ROWS];
    for (int i = 0; i < Q8_ROWS; i++) acc[i] = _mm512_setzero_ps();
    for (int b0 = 0; b0 < blocks; b0 += 16) {
        const int n = blocks - b0 < 16 ? blocks - b0 : 16;
        const __m512 dxv = _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), dx + b0);
        for (int i = 0; i < Q8_ROWS; i++) cv[i] = _mm512_mul_ps(load_floats(s, kind, s0 + i * sstride + b0, n), dxv);
        for (int j = 0; j < n; j += 2) {  /* an odd last block: its partner's scale lanes are 0 (n masks them) */
            const long b = b0 + j;
            const __mmask32 whole = b + 1 < blocks ? 0xFFFFFFFFu : 0xFFFFu;
            const __m512i xv = _mm512_loadu_si512(xq + 32 * b), cr = _mm512_loadu_si512(corr + 8 * b);
            const __m512i idx = _mm512_add_epi32(pair, _mm512_set1_epi32(j));
            if (b % 4 == 0)
                for (int i = 0; i < Q8_ROWS; i++)
                    _mm_prefetch((const char *)(q + (i + PREFETCH_ROWS) * stride + b * 16), _MM_HINT_T0);
            for (int i = 0; i < Q8_ROWS; i++) {
                const __m256i v = _mm256_maskz_loadu_epi8(whole, q + i * stride + b * 16);
                const __m512i u = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, low)),
                                                     _mm256_and_si256(_mm256_srli_epi16(v, 4), low), 1);
                const __m512i dot = _mm512_dpbusd_epi32(cr, u, xv);
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(idx, cv[i]), acc[i]);
            }
        }
    }
    for (int i = 0; i < Q8_ROWS; i++) y[i] = _mm512_reduce_add_ps(acc[i]);
}

/* rows_dot for int8 x: inside a parallel region, row blocks shared out, the rows % Q8_ROWS tail one at a time. */
static void rows_q8(const uint8_t *q, const void *s, int kind, int rows, int cols, const int8_t *xq, const float *dx,
                    const int32_t *corr, float *y) {
    const int blocks = cols / 32, nb = rows / Q8_ROWS;
    const long stride = cols / 2;
#pragma omp for schedule(static)
    for (int r = 0; r < nb; r++)
        rows_block_q8(q + r * Q8_ROWS * stride, stride, s, kind, (long)r * Q8_ROWS * blocks, blocks, blocks, xq, dx, corr,
                      y + r * Q8_ROWS);
#pragma omp for schedule(static)
    for (int r = nb * Q8_ROWS; r < rows; r++) {
        float one[Q8_ROWS];
        rows_block_q8(q + r * stride, 0, s, kind, (long)r * blocks, 0, blocks, xq, dx, corr, one);
        y[r] = one[0];
    }
}
#endif

int ckernels_q8_ok(int cols, int group) {
#ifdef __AVX512VNNI__
    return group == 32 && cols % 32 == 0;
#else
    return 0;
#endif
}

/* One expert for one token, inside a parallel region (its rows shared among the region's threads; a team of one
 * where experts are shared out instead): p = gate_up codes, scales, down codes, scales, output. x is shared: split
 * (float) or rounded (int8: xq, dx, corr); work holds the expert's own intermediate values. */
static void expert_one(const uintptr_t *p, int gkind, int ggroup, int dkind, int dgroup, int hidden, int inter,
                       const float *lut, int int8, char *xshared, char *work) {
    float *gate = (float *)work, *y = (float *)p[4];
    const uint8_t *gq = (const uint8_t *)p[0], *dq = (const uint8_t *)p[2];
    const void *gs = (const void *)p[1], *ds = (const void *)p[3];
    if (!int8) {
        float *hs = gate + 2 * inter;
        rows_any(gq, gs, gkind, 2 * inter, hidden, ggroup, (const float *)xshared, 1, lut, gate);
#pragma omp single
        {
            silu_mul(gate, inter);
            split(gate, inter, hs, hs + inter / 2);
        }
        rows_any(dq, ds, dkind, hidden, inter, dgroup, hs, 1, lut, y);
        return;
    }
#ifdef __AVX512VNNI__
    const long ph = pad64(hidden), pi = pad64(inter);
    int8_t *xq = (int8_t *)xshared, *hq = (int8_t *)(gate + 2 * inter);
    float *dx = (float *)(xq + ph), *hdx = (float *)(hq + pi);
    int32_t *corr = (int32_t *)(dx + ph / 32), *hcorr = (int32_t *)(hdx + pi / 32);
    rows_q8(gq, gs, gkind, 2 * inter, hidden, xq, dx, corr, gate);
#pragma omp single
    {
        silu_mul(gate, inter);
        quantize_q8(gate, inter, hq, hdx, hcorr);
    }
    rows_q8(dq, ds, dkind, hidden, inter, hq, hdx, hcorr, y);
#endif
}

/* n SiLU-gated int4 experts for one token x [hidden] (decode): parts holds each expert's five pointers (gate_up
 * codes and scales, down codes and scales, its output [hidden]). One expert: its rows shared among the threads.
 * Several: each expert whole on one thread (measured faster: no barrier inside an expert, one long stream of
 * rows per thread). int8 (opt-in, lossy): x and each intermediate rounded per block of 32 (groups of 32 only,
 * ckernels_q8_ok); -2 without AVX-512 VNNI. */
int ckernels_experts_one(const uintptr_t *parts, int n, int gkind, int ggroup, int dkind, int dgroup, int hidden,
                         int inter, const float *lut, int int8, const float *x, int threads) {
#ifndef __AVX512VNNI__
    if (int8) return -2;
#endif
    const long ph = pad64(hidden), pi = pad64(inter);
    const long shared = (4L * hidden + 2 * ph + ph / 8 + 63) / 64 * 64;  /* split x, or int8 x, scales, corrections */
    const long per = (12L * inter + 2 * pi + pi / 8 + 63) / 64 * 64;    /* gate_up output, then the intermediate */
    char *buf = NULL;
    if (posix_memalign((void **)&buf, 64, shared + n * per)) return -1;
    if (int8) {
#ifdef __AVX512VNNI__
        quantize_q8(x, hidden, (int8_t *)buf, (float *)(buf + ph), (int32_t *)(buf + ph + ph / 8));
#endif
    } else {
        split(x, hidden, (float *)buf, (float *)buf + hidden / 2);
    }
    const int whole = threads > 1 ? n - n % threads : n;  /* the rest: each expert's rows shared out */
    if (whole) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
        for (int e = 0; e < whole; e++) {
#pragma omp parallel num_threads(1)
            expert_one(parts + 5 * e, gkind, ggroup, dkind, dgroup, hidden, inter, lut, int8, buf, buf + shared + e * per);
        }
    }
    for (int e = whole; e < n; e++) {
#pragma omp parallel num_threads(threads)
        expert_one(parts + 5 * e, gkind, ggroup, dkind, dgroup, hidden, inter, lut, int8, buf, buf + shared + e * per);
    }
    free(buf);
    return 0;
}

/* ---- one query's attention (decode) ----
 * For each of B rows: q [hq x dk], k [hkv heads x T x dk] and v [hkv x T x dv] by element strides (row, head,
 * token), out [hq x dv]; all of one dtype (kind: 0 float32, 1 float16, 2 bfloat16), head h reading kv head
 * h / (hq / hkv); mask (NULL, or B x T bytes, 0 = hidden) hides positions, e.g. a batch's left padding. Scores,
 * softmax and the weighted sum in float32, as torch's CPU flash attention computes them (in another order); the
 * output rounded to nearest even. A hidden position adds exact zeros: a padded row gets its unpadded bits.
 * torch's sdpa spends ~0.3 ms on this per layer here, for microseconds of work. */
int ckernels_attend_one(const void *q, const void *k, const void *v, const uint8_t *mask, void *out, int kind, int B,
                        int hq, int hkv, int T, int dk, int dv, long qb, long kb, long kh, long kt, long vb, long vh,
                        long vt, float scale, int threads) {
    float *buf = malloc(sizeof(float) * (long)B * hq * (T + dv));
    if (!buf) return -1;
    const int group = hq / hkv;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int bh = 0; bh < B * hq; bh++) {
        const int b = bh / hq, h = bh % hq;
        float *sc = buf + (long)bh * (T + dv), *acc = sc + T;
        const long q0 = b * qb + (long)h * dk, k0 = b * kb + (long)(h / group) * kh, v0 = b * vb + (long)(h / group) * vh;
        const uint8_t *m = mask ? mask + (long)b * T : NULL;
        float top = -INFINITY, sum = 0.0f;
        for (int t = 0; t < T; t++) {
            if (m && !m[t]) {
                sc[t] = -INFINITY;
                continue;
            }
            __m512 a = _mm512_setzero_ps();
            for (int d = 0; d < dk; d += 16) {
                const int n = dk - d < 16 ? dk - d : 16;
                a = _mm512_fmadd_ps(load_floats(q, kind, q0 + d, n), load_floats(k, kind, k0 + t * kt + d, n), a);
            }
            sc[t] = _mm512_reduce_add_ps(a) * scale;
            top = fmaxf(top, sc[t]);
        }
        for (int t = 0; t < T; t++) sum += (sc[t] = expf(sc[t] - top));
        for (int d = 0; d < dv; d++) acc[d] = 0.0f;
        for (int t = 0; t < T; t++) {
            const __m512 p = _mm512_set1_ps(sc[t]);
            for (int d = 0; d < dv; d += 16) {
                const int n = dv - d < 16 ? dv - d : 16;
                const __mmask16 mm = (__mmask16)((1u << n) - 1);
                _mm512_mask_storeu_ps(acc + d, mm, _mm512_fmadd_ps(p, load_floats(v, kind, v0 + t * vt + d, n),
                                                                   _mm512_maskz_loadu_ps(mm, acc + d)));
            }
        }
        for (int d = 0; d < dv; d += 16) {
            const int n = dv - d < 16 ? dv - d : 16;
            store_vec(out, (long)bh * dv + d, _mm512_div_ps(_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), acc + d),
                                                             _mm512_set1_ps(sum)), kind, n);
        }
    }
    free(buf);
    return 0;
}
/* ---- small per-layer steps of a decode token, each one call instead of several torch ops ---- */
/* out [hidden] (kind) += round(round(ys[j]) * w[slot[j]]) for j = 0..n-1 in order, rounding to out's dtype after
 * each step: transformers' eager loop (expert output cast, times its routing weight, index_add_) bit for bit,
 * for one token whose n experts' float32 outputs are the rows of ys. w: the token's routing weights (kind). */
int ckernels_weighted_sum(const float *ys, const int *slot, int n, int hidden, const void *w, void *out, int kind) {
    for (int i = 0; i < hidden; i += 16) {
        const int m = hidden - i < 16 ? hidden - i : 16;
        __m512 acc = load_floats(out, kind, i, m);
        for (int j = 0; j < n; j++) {
            const __m512 wj = _mm512_set1_ps(_mm512_cvtss_f32(load_floats(w, kind, slot[j], 1)));
            const __m512 y = round_vec(_mm512_maskz_loadu_ps((__mmask16)((1u << m) - 1), ys + (long)j * hidden + i), kind);
            acc = round_vec(_mm512_add_ps(acc, round_vec(_mm512_mul_ps(y, wj), kind)), kind);
        }
        store_vec(out, i, acc, kind, m);
    }
    return 0;
}

/* transformers' rotate-half rotary embedding, in place over rows x d values (kind): x * cos + rotate_half(x) * sin
 * with cos, sin [d] (kind), each product and the sum rounded to the dtype as torch computes them in it
 * (apply_rotary_pos_emb: eight torch ops a call). */
int ckernels_rope(void *x, const void *cos, const void *sin, int kind, int rows, int d) {
    const int h = d / 2;
    for (int r = 0; r < rows; r++) {
        const long o = (long)r * d;
        for (int i = 0; i < h; i += 16) {
            const int n = h - i < 16 ? h - i : 16;
            const __m512 a = load_floats(x, kind, o + i, n), b = load_floats(x, kind, o + h + i, n);
            const __m512 lo = _mm512_sub_ps(round_vec(_mm512_mul_ps(a, load_floats(cos, kind, i, n)), kind),
                                            round_vec(_mm512_mul_ps(b, load_floats(sin, kind, i, n)), kind));
            const __m512 hi = _mm512_add_ps(round_vec(_mm512_mul_ps(b, load_floats(cos, kind, h + i, n)), kind),
                                            round_vec(_mm512_mul_ps(a, load_floats(sin, kind, h + i, n)), kind));
            store_vec(x, o + i, lo, kind, n);
            store_vec(x, o + h + i, hi, kind, n);
        }
    }
    return 0;
}

/* transformers' RMSNorm for rows x n values (kind): h = float(x); h * rsqrt(mean(h^2) + eps) rounded to the
 * dtype, times the weight (kind) rounded again, as `weight * hidden_states.to(input_dtype)` computes it. */
int ckernels_rms_norm(const void *x, const void *w, void *out, int kind, int rows, int n, float eps) {
    for (int r = 0; r < rows; r++) {
        const long o = (long)r * n;
        __m512 acc = _mm512_setzero_ps();
        for (int i = 0; i < n; i += 16) {
            const int m = n - i < 16 ? n - i : 16;
            const __m512 v = load_floats(x, kind, o + i, m);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(acc) / n + eps));
        for (int i = 0; i < n; i += 16) {
            const int m = n - i < 16 ? n - i : 16;
            const __m512 h = round_vec(_mm512_mul_ps(load_floats(x, kind, o + i, m), inv), kind);
            store_vec(out, o + i, _mm512_mul_ps(load_floats(w, kind, i, m), h), kind, m);
        }
    }
    return 0;
}

/* One decode token through a Qwen3-style attention block, in one call: out = x + o_proj(attention(rope(norm_q(q)),
 * rope(norm_k(k)), v)) for q, k, v the projections of rms_norm(x), every step the kernel above that does it alone
 * with the same roundings (each rounded to the dtype where transformers rounds it). The new key and value (position
 * T) are written into the caches kc, vc [hkv heads x capacity x d] (head stride hs elements, token stride d), which
 * hold positions 0..T-1 already. Then what the layer's MLP starts with: normed = post_norm(out), and where w[8] is
 * a router [experts x hidden], its logits (rounded, as F.linear gives them), and where next_router is not NULL,
 * next_logits = next_router normed in float32 (the next layer's guess: runtime._prefetch_next). w: input norm, q,
 * k, v, o, q-norm, k-norm, post norm, router (all kind); eps: input, q, k, post; cos, sin [d] (kind). */
int ckernels_attention_block(const void *x, const uint16_t *const *w, const float *eps, const void *cos,
                             const void *sin, void *kc, void *vc, long hs, int T, int kind, int hidden, int hq,
                             int hkv, int d, float scale, int experts, const uint16_t *next_router, int next_experts,
                             void *out, void *normed, void *logits, float *next_logits, int threads) {
    const int size = 2;  /* half precision: the dense matvec's kinds */
    char *buf = malloc((size_t)size * (hidden + 2 * hq * d + 2 * hkv * d));
    if (!buf) return -1;
    char *h = buf, *q = h + (size_t)size * hidden, *k = q + (size_t)size * hq * d, *v = k + (size_t)size * hkv * d;
    char *att = v + (size_t)size * hkv * d;
    int rc = ckernels_rms_norm(x, w[0], h, kind, 1, hidden, eps[0]);
    rc |= ckernels_dense_matvec(w[1], kind, hq * d, hidden, (const uint16_t *)h, q, kind, threads);
    rc |= ckernels_dense_matvec(w[2], kind, hkv * d, hidden, (const uint16_t *)h, k, kind, threads);
    rc |= ckernels_dense_matvec(w[3], kind, hkv * d, hidden, (const uint16_t *)h, v, kind, threads);
    rc |= ckernels_rms_norm(q, w[5], q, kind, hq, d, eps[1]);
    rc |= ckernels_rms_norm(k, w[6], k, kind, hkv, d, eps[2]);
    rc |= ckernels_rope(q, cos, sin, kind, hq, d);
    rc |= ckernels_rope(k, cos, sin, kind, hkv, d);
    for (int i = 0; i < hkv; i++) {
        memcpy((char *)kc + (size_t)size * (i * hs + (long)T * d), k + (size_t)size * i * d, (size_t)size * d);
        memcpy((char *)vc + (size_t)size * (i * hs + (long)T * d), v + (size_t)size * i * d, (size_t)size * d);
    }
    rc |= ckernels_attend_one(q, kc, vc, NULL, att, kind, 1, hq, hkv, T + 1, d, d, 0, 0, hs, d, 0, hs, d, scale,
                              threads);
    rc |= ckernels_dense_matvec(w[4], kind, hidden, hq * d, (const uint16_t *)att, h, kind, threads);
    for (int i = 0; i < hidden; i += 16) {  /* the residual: x + o_proj(...), rounded */
        const int n = hidden - i < 16 ? hidden - i : 16;
        store_vec(out, i, _mm512_add_ps(load_floats(x, kind, i, n), load_floats(h, kind, i, n)), kind, n);
    }
    rc |= ckernels_rms_norm(out, w[7], normed, kind, 1, hidden, eps[3]);
    if (w[8]) rc |= ckernels_dense_matvec(w[8], kind, experts, hidden, normed, logits, kind, threads);
    if (next_router)
        rc |= ckernels_dense_matvec(next_router, kind, next_experts, hidden, normed, next_logits, SCALE_F32, threads);
    free(buf);
    return rc ? -1 : 0;
}
#endif

