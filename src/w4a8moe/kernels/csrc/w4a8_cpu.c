/*
 * W4A8 grouped MoE expert path for x86-64 CPUs (AVX-512 VNNI, AVX-VNNI or plain AVX2).
 *
 * Math (SPEC sections 1, 2, 4), bit-exact against the torch reference backend:
 *   GMM1  acc[m,n] = sum_k x_q[m,k] * w13[n,k]           exact int32
 *         g|u[m,n] = bf16_rne((float(acc) * a_m) * s_n)
 *   SwiGLU-clip-quant per row: h = silu(g) * u (fp32, silu read from a table that the
 *         caller fills with torch's own silu of every bf16 value, so it is identical);
 *         A = alpha_e * max|h|; h~ = clamp(h, -A, A); c = A / 127;
 *         h_q = sat_int8(round_half_even(h~ / (c > 0 ? c : 1)))
 *   GMM2  out[m,n] = bf16_rne((float(acc2) * c_m) * s2_n)
 *
 * Weight layout (built once by w4a8_relayout, still 4 bits per weight):
 *   blocks of 32 output channels; inside a block, for each quad of 4 consecutive k, one
 *   64-byte line: byte [4*lane + j] holds (w[n0+lane][4q+j] + 8) in its low nibble and
 *   (w[n0+16+lane][4q+j] + 8) in its high nibble (lane 0..15). Storing w + 8 (0..15) makes
 *   the nibble an unsigned byte after one AND / one shift+AND, which is exactly the u8
 *   operand of vpdpbusd (u8 x s8); the activations stay signed. The +8 bias is removed
 *   exactly afterwards: sum_k (w+8)*x = sum_k w*x + 8*sum_k x, with sum_k x computed once
 *   per activation row. K is padded to a multiple of 4 and N to a multiple of 32 with
 *   zero weights (nibble 8); padded outputs are never stored.
 *
 * Threading: OpenMP over (expert, 32-channel block) work items, so that a decode call
 * (one row per expert) still streams every weight byte exactly once, split across cores.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define W4A8_ISA 3
#elif defined(__AVX2__) && defined(__AVXVNNI__)
#define W4A8_ISA 2
#elif defined(__AVX2__)
#define W4A8_ISA 1
#else
#define W4A8_ISA 0
#endif

#define W4A8_ABI_VERSION 1
#define NBLOCK 32           /* output channels per weight block */
#define LINE 64             /* bytes per (block, k-quad) line */
#define PREFETCH_LINES 16   /* software prefetch distance in the weight stream */

#define W4A8_OK 0
#define W4A8_ERR_TOKEN_ID -1
#define W4A8_ERR_OFFSETS -2
#define W4A8_ERR_NO_SIMD -3
#define W4A8_ERR_OVERFLOW -4

int w4a8_isa(void) { return W4A8_ISA; }
int w4a8_abi_version(void) { return W4A8_ABI_VERSION; }

int w4a8_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static inline int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

int64_t w4a8_layout_bytes(int64_t n, int64_t k) {
    return round_up(n, NBLOCK) / NBLOCK * (round_up(k, 4) / 4) * LINE;
}

/* Nibble (w + 8) of channel c, column kk of a SPEC-4 packed [N/2, K] matrix; 8 (w = 0) as padding. */
static inline uint8_t biased_nibble(const int8_t *packed, int64_t n, int64_t k, int64_t c, int64_t kk) {
    if (c >= n || kk >= k) return 8;
    uint8_t byte = (uint8_t)packed[(c >> 1) * k + kk];
    uint8_t nib = (c & 1) ? (byte >> 4) : (byte & 0x0F);
    return nib ^ 0x08; /* two's complement nibble -> nibble + 8 (mod 16) = unsigned 0..15 */
}

/* Re-lay one packed [N/2, K] int4 matrix into the blocked VNNI layout described above. */
void w4a8_relayout(const int8_t *packed, int64_t n, int64_t k, uint8_t *out, int nthreads) {
    const int64_t nblocks = round_up(n, NBLOCK) / NBLOCK, kq = round_up(k, 4) / 4;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < nblocks; b++) {
        uint8_t *dst = out + b * kq * LINE;
        for (int64_t q = 0; q < kq; q++) {
            for (int lane = 0; lane < 16; lane++) {
                for (int j = 0; j < 4; j++) {
                    const int64_t kk = 4 * q + j;
                    uint8_t lo = biased_nibble(packed, n, k, b * NBLOCK + lane, kk);
                    uint8_t hi = biased_nibble(packed, n, k, b * NBLOCK + 16 + lane, kk);
                    dst[q * LINE + 4 * lane + j] = (uint8_t)(lo | (hi << 4));
                }
            }
        }
    }
}

/* torch's float -> bfloat16 conversion: round to nearest even, NaN -> 0x7FC0. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline int32_t load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}


/* Arguments of one (weight block, rows) job. */
typedef struct {
    const uint8_t *w;     /* the block's lines: kq * 64 bytes */
    int64_t kq;           /* number of k quads */
    const int8_t *x;      /* activation rows, K padded to 4*kq with zeros */
    int64_t ldx;
    const int32_t *xsum;  /* per-row sum of activations */
    const float *xscale;  /* per-row scale (NULL when writing int32) */
    const float *wscale;  /* 32 per-channel scales of the block (padded) */
    int64_t nvalid;       /* valid channels in this block (<= 32) */
    int32_t *out_i32;     /* exact int32 output, or NULL */
    uint16_t *out_bf16;   /* bf16 output, used when out_i32 is NULL */
    int64_t ldo;
} block_job;

#if W4A8_ISA == 3
#define MR 8  /* rows per register tile: 16 zmm accumulators */

static inline __m256i bf16_rne_512(__m512 f) {
    __m512i b = _mm512_castps_si512(f);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
}

static inline __attribute__((always_inline)) void tile_512(const block_job *job, int64_t r0, const int mr) {
    __m512i acc[MR][2];
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const int8_t *x = job->x + r0 * job->ldx;
    const int64_t ldx = job->ldx;
    for (int i = 0; i < mr; i++) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
    const uint8_t *w = job->w;
    for (int64_t q = 0; q < job->kq; q++) {
        _mm_prefetch((const char *)(w + (q + PREFETCH_LINES) * LINE), _MM_HINT_T0);
        const __m512i p = _mm512_loadu_si512((const void *)(w + q * LINE));
        const __m512i lo = _mm512_and_si512(p, m4);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(p, 4), m4);
        for (int i = 0; i < mr; i++) {
            const __m512i xb = _mm512_set1_epi32(load_i32(x + i * ldx + 4 * q));
            acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], lo, xb);
            acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], hi, xb);
        }
    }
    const __mmask16 mask0 = job->nvalid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << job->nvalid) - 1);
    const __mmask16 mask1 = job->nvalid >= 32 ? (__mmask16)0xFFFF
                          : job->nvalid <= 16 ? (__mmask16)0 : (__mmask16)((1u << (job->nvalid - 16)) - 1);
    const __mmask16 masks[2] = {mask0, mask1};
    for (int i = 0; i < mr; i++) {
        const int64_t row = r0 + i;
        const __m512i bias = _mm512_set1_epi32(8 * job->xsum[row]);
        for (int h = 0; h < 2; h++) {
            const __m512i exact = _mm512_sub_epi32(acc[i][h], bias);
            if (job->out_i32) {
                _mm512_mask_storeu_epi32(job->out_i32 + row * job->ldo + 16 * h, masks[h], exact);
            } else {
                __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(exact), _mm512_set1_ps(job->xscale[row]));
                y = _mm512_mul_ps(y, _mm512_loadu_ps(job->wscale + 16 * h));
                _mm256_mask_storeu_epi16(job->out_bf16 + row * job->ldo + 16 * h, masks[h], bf16_rne_512(y));
            }
        }
    }
}

static void run_block_job(const block_job *job, int64_t m) {
    int64_t r0 = 0;
    for (; r0 + MR <= m; r0 += MR) tile_512(job, r0, MR);
    switch (m - r0) {
        case 1: tile_512(job, r0, 1); break;
        case 2: tile_512(job, r0, 2); break;
        case 3: tile_512(job, r0, 3); break;
        case 4: tile_512(job, r0, 4); break;
        case 5: tile_512(job, r0, 5); break;
        case 6: tile_512(job, r0, 6); break;
        case 7: tile_512(job, r0, 7); break;
        default: break;
    }
}

#elif W4A8_ISA >= 1
#define MR 2  /* rows per register tile: 8 ymm accumulators */

static inline __m256i dot_u8s8(__m256i acc, __m256i w_u8, __m256i x_s8) {
#if W4A8_ISA == 2
    return _mm256_dpbusd_avx_epi32(acc, w_u8, x_s8);
#else
    /* u8 (0..15) x s8 pairs sum to at most 2*15*128 = 3840: vpmaddubsw cannot saturate. */
    const __m256i pairs = _mm256_maddubs_epi16(w_u8, x_s8);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

static inline __attribute__((always_inline)) void tile_256(const block_job *job, int64_t r0, const int mr) {
    /* acc[i][0]: channels 0-7, [1]: 8-15, [2]: 16-23, [3]: 24-31 */
    __m256i acc[MR][4];
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const int8_t *x = job->x + r0 * job->ldx;
    const int64_t ldx = job->ldx;
    for (int i = 0; i < mr; i++)
        for (int h = 0; h < 4; h++) acc[i][h] = _mm256_setzero_si256();
    const uint8_t *w = job->w;
    for (int64_t q = 0; q < job->kq; q++) {
        _mm_prefetch((const char *)(w + (q + PREFETCH_LINES) * LINE), _MM_HINT_T0);
        const __m256i p0 = _mm256_loadu_si256((const __m256i *)(w + q * LINE));
        const __m256i p1 = _mm256_loadu_si256((const __m256i *)(w + q * LINE + 32));
        const __m256i l0 = _mm256_and_si256(p0, m4), l1 = _mm256_and_si256(p1, m4);
        const __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(p0, 4), m4);
        const __m256i h1 = _mm256_and_si256(_mm256_srli_epi16(p1, 4), m4);
        for (int i = 0; i < mr; i++) {
            const __m256i xb = _mm256_set1_epi32(load_i32(x + i * ldx + 4 * q));
            acc[i][0] = dot_u8s8(acc[i][0], l0, xb);
            acc[i][1] = dot_u8s8(acc[i][1], l1, xb);
            acc[i][2] = dot_u8s8(acc[i][2], h0, xb);
            acc[i][3] = dot_u8s8(acc[i][3], h1, xb);
        }
    }
    for (int i = 0; i < mr; i++) {
        const int64_t row = r0 + i;
        int32_t lanes[32];
        for (int h = 0; h < 4; h++) _mm256_storeu_si256((__m256i *)(lanes + 8 * h), acc[i][h]);
        for (int64_t c = 0; c < job->nvalid; c++) {
            const int32_t exact = lanes[c] - 8 * job->xsum[row];
            if (job->out_i32) {
                job->out_i32[row * job->ldo + c] = exact;
            } else {
                float y = (float)exact * job->xscale[row]; /* the reference forms (acc * a) * s */
                y = y * job->wscale[c];
                job->out_bf16[row * job->ldo + c] = f32_to_bf16(y);
            }
        }
    }
}

static void run_block_job(const block_job *job, int64_t m) {
    int64_t r0 = 0;
    for (; r0 + MR <= m; r0 += MR) tile_256(job, r0, MR);
    if (m - r0 == 1) tile_256(job, r0, 1);
}
#endif

/* Copy rows into a zero-padded buffer of width kp and return their sums. */
static inline int32_t copy_row_padded(const int8_t *src, int64_t k, int8_t *dst, int64_t kp) {
    int32_t sum = 0;
    for (int64_t j = 0; j < k; j++) {
        dst[j] = src[j];
        sum += src[j];
    }
    for (int64_t j = k; j < kp; j++) dst[j] = 0;
    return sum;
}

/*
 * One matrix: out[m, n] for m rows of x [M, ldx] (K valid columns) against one re-laid
 * weight matrix. Exact int32 into out_i32 when it is not NULL, else bf16 scaled by
 * xscale[m] and wscale (padded to a multiple of 32). Used by tests and by the benchmark.
 */
int w4a8_gemm(const uint8_t *wl, int64_t n, int64_t k, const int8_t *x, int64_t m, int64_t ldx,
              const float *xscale, const float *wscale_padded, int32_t *out_i32, uint16_t *out_bf16,
              int nthreads) {
#if W4A8_ISA == 0
    (void)wl; (void)n; (void)k; (void)x; (void)m; (void)ldx; (void)xscale; (void)wscale_padded;
    (void)out_i32; (void)out_bf16; (void)nthreads;
    return W4A8_ERR_NO_SIMD;
#else
    if (m == 0) return W4A8_OK;
    const int64_t kp = round_up(k, 4), kq = kp / 4, nblocks = round_up(n, NBLOCK) / NBLOCK;
    int8_t *xp = (int8_t *)malloc((size_t)(m * kp) + 64);
    int32_t *xsum = (int32_t *)malloc((size_t)m * sizeof(int32_t));
    if (!xp || !xsum) {
        free(xp);
        free(xsum);
        return W4A8_ERR_OVERFLOW;
    }
    for (int64_t r = 0; r < m; r++) xsum[r] = copy_row_padded(x + r * ldx, k, xp + r * kp, kp);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < nblocks; b++) {
        block_job job = {wl + b * kq * LINE, kq, xp, kp, xsum, xscale, wscale_padded + b * NBLOCK,
                         (n - b * NBLOCK) < NBLOCK ? (n - b * NBLOCK) : NBLOCK,
                         out_i32 ? out_i32 + b * NBLOCK : NULL, out_bf16 ? out_bf16 + b * NBLOCK : NULL, n};
        run_block_job(&job, m);
    }
    free(xp);
    free(xsum);
    return W4A8_OK;
#endif
}

/* Columns of row `row` (of `rows` rows, width `inter`) that torch's silu computes with its
 * scalar code rather than its vector code: TensorIterator splits the flattened [rows, inter]
 * range over threads (chunks of ceil(numel / nth) when numel >= grain), and inside each
 * row segment the vector loop covers whole groups of `vec_block` elements, the rest being
 * scalar. Recomputes h at each such column with the scalar table. */
static void patch_scalar_silu(float *h, const uint16_t *g, const uint16_t *u, int64_t row, int64_t rows,
                              int64_t inter, const float *silu_scalar, int64_t vec_block, int64_t torch_threads,
                              int64_t grain) {
    const int64_t numel = rows * inter;
    int64_t chunk = numel;
    if (numel >= grain && torch_threads > 1) {
        int64_t nth = torch_threads;
        const int64_t by_grain = (numel + grain - 1) / grain;
        if (by_grain < nth) nth = by_grain;
        chunk = (numel + nth - 1) / nth;
    }
    const int64_t row_start = row * inter, row_end = row_start + inter;
    int64_t seg = row_start;
    while (seg < row_end) {
        const int64_t next_split = (seg / chunk + 1) * chunk;
        const int64_t seg_end = next_split < row_end ? next_split : row_end;
        const int64_t len = seg_end - seg;
        for (int64_t p = seg + len / vec_block * vec_block; p < seg_end; p++) {
            const int64_t j = p - row_start;
            h[j] = silu_scalar[g[j]] * bf16_to_f32(u[j]);
        }
        seg = seg_end;
    }
}

/* SwiGLU-clip-quant of one row: bf16 gate|up [2*inter] -> int8 [inter_padded], scale, sum. */
static void swiglu_clip_quant_row(const uint16_t *gu, int64_t inter, int64_t inter_padded, float alpha,
                                  const float *silu_vec, const float *silu_scalar, int64_t vec_block,
                                  int64_t row, int64_t rows, int64_t torch_threads, int64_t grain, float *h,
                                  int8_t *hq, float *hscale, int32_t *hsum) {
    const uint16_t *g = gu, *u = gu + inter;
    float amax = 0.0f;
    for (int64_t j = 0; j < inter; j++) h[j] = silu_vec[g[j]] * bf16_to_f32(u[j]);
    if (vec_block > 0) patch_scalar_silu(h, g, u, row, rows, inter, silu_scalar, vec_block, torch_threads, grain);
    for (int64_t j = 0; j < inter; j++) {
        const float a = fabsf(h[j]);
        amax = a > amax ? a : amax;
    }
    const float bound = alpha * amax;
    const float c = bound / 127.0f;
    /* An all-zero row has c = 0: divide by 1 instead, every value is 0 anyway. */
    const float safe = c > 0.0f ? c : 1.0f;
    int32_t sum = 0;
    for (int64_t j = 0; j < inter; j++) {
        float v = h[j];
        v = v < -bound ? -bound : v;
        v = v > bound ? bound : v;
        float r = nearbyintf(v / safe); /* round half to even in the default rounding mode */
        r = r < -128.0f ? -128.0f : (r > 127.0f ? 127.0f : r);
        const int8_t qv = (int8_t)r;
        hq[j] = qv;
        sum += qv;
    }
    for (int64_t j = inter; j < inter_padded; j++) hq[j] = 0;
    *hscale = c;
    *hsum = sum;
}

/*
 * The SwiGLU-clip-quant step alone over `rows` rows of one expert (a test entry): bf16
 * gate|up [rows, 2*inter] -> h fp32 [rows, inter] (optional), h_q int8 [rows, inter], c [rows].
 */
int w4a8_swiglu_clip_quant(const uint16_t *gu, int64_t rows, int64_t inter, float alpha, const float *silu_vec,
                           const float *silu_scalar, int64_t vec_block, int64_t torch_threads, int64_t grain,
                           float *h_out, int8_t *hq, float *hscale, int nthreads) {
    float *scratch = NULL;
    if (!h_out) {
        scratch = (float *)malloc((size_t)(rows > 0 ? rows : 1) * (size_t)inter * sizeof(float) + 64);
        if (!scratch) return W4A8_ERR_OVERFLOW;
    }
    float *h = h_out ? h_out : scratch;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < rows; r++) {
        int32_t sum;
        swiglu_clip_quant_row(gu + r * 2 * inter, inter, inter, alpha, silu_vec, silu_scalar, vec_block, r, rows,
                              torch_threads, grain, h + r * inter, hq + r * inter, hscale + r, &sum);
    }
    free(scratch);
    return W4A8_OK;
}

/*
 * The grouped expert path. Rows r in [offsets[e], offsets[e+1]) belong to expert e and read
 * token token_ids[r] of x_q [M, H]; out is bf16 [R, H]. Scratch buffers are supplied by the
 * caller (sizes in w4a8_moe_scratch_bytes order): xg [R, Hp] int8, gu [R, 2I] bf16,
 * hq [R, Ip] int8, h [nthreads, I] fp32, xsum/hsum [R] int32, xs/hs [R] fp32.
 */
int w4a8_moe_forward(const uint8_t *w13, const float *w13_scale, const uint8_t *w2, const float *w2_scale,
                     int64_t num_experts, int64_t hidden, int64_t inter, const int8_t *x_q, const float *x_scale,
                     int64_t num_tokens, const int64_t *token_ids, const int64_t *offsets, const float *alpha,
                     const float *silu_vec, const float *silu_scalar, int64_t vec_block, int64_t torch_threads,
                     int64_t grain, int8_t *xg, uint16_t *gu, int8_t *hq, float *hbuf, int32_t *xsum,
                     int32_t *hsum, float *xs, float *hs, uint16_t *out, int nthreads) {
#if W4A8_ISA == 0
    (void)w13; (void)w13_scale; (void)w2; (void)w2_scale; (void)num_experts; (void)hidden; (void)inter;
    (void)x_q; (void)x_scale; (void)num_tokens; (void)token_ids; (void)offsets; (void)alpha; (void)silu_vec;
    (void)silu_scalar; (void)vec_block; (void)torch_threads; (void)grain; (void)xg; (void)gu; (void)hq;
    (void)hbuf; (void)xsum; (void)hsum; (void)xs; (void)hs; (void)out; (void)nthreads;
    return W4A8_ERR_NO_SIMD;
#else
    const int64_t n1 = 2 * inter, hp = round_up(hidden, 4), ip = round_up(inter, 4);
    const int64_t kq1 = hp / 4, kq2 = ip / 4;
    const int64_t nb1 = round_up(n1, NBLOCK) / NBLOCK, nb2 = round_up(hidden, NBLOCK) / NBLOCK;
    const int64_t w13_stride = nb1 * kq1 * LINE, w2_stride = nb2 * kq2 * LINE;
    const int64_t rows = offsets[num_experts];
    if (offsets[0] != 0) return W4A8_ERR_OFFSETS;
    for (int64_t e = 0; e < num_experts; e++)
        if (offsets[e + 1] < offsets[e]) return W4A8_ERR_OFFSETS;
    for (int64_t r = 0; r < rows; r++)
        if (token_ids[r] < 0 || token_ids[r] >= num_tokens) return W4A8_ERR_TOKEN_ID;
    if (rows == 0) return W4A8_OK;

    /* Work items over experts that have rows; an empty expert costs nothing. */
    int64_t *active = (int64_t *)malloc((size_t)num_experts * sizeof(int64_t));
    if (!active) return W4A8_ERR_OVERFLOW;
    int64_t nact = 0;
    for (int64_t e = 0; e < num_experts; e++)
        if (offsets[e + 1] > offsets[e]) active[nact++] = e;
    const int64_t items1 = nact * nb1, items2 = nact * nb2;
    /* Chunks of consecutive blocks keep each thread's weight stream long and sequential. */
    int64_t chunk1 = items1 / (16 * (int64_t)nthreads), chunk2 = items2 / (16 * (int64_t)nthreads);
    chunk1 = chunk1 < 1 ? 1 : chunk1;
    chunk2 = chunk2 < 1 ? 1 : chunk2;

#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const int64_t t = token_ids[r];
            xsum[r] = copy_row_padded(x_q + t * hidden, hidden, xg + r * hp, hp);
            xs[r] = x_scale[t];
        }
#pragma omp for schedule(dynamic, chunk1)
        for (int64_t it = 0; it < items1; it++) {
            const int64_t e = active[it / nb1], b = it % nb1, r0 = offsets[e];
            block_job job = {w13 + e * w13_stride + b * kq1 * LINE, kq1, xg + r0 * hp, hp, xsum + r0, xs + r0,
                             w13_scale + e * nb1 * NBLOCK + b * NBLOCK,
                             (n1 - b * NBLOCK) < NBLOCK ? (n1 - b * NBLOCK) : NBLOCK, NULL,
                             gu + r0 * n1 + b * NBLOCK, n1};
            run_block_job(&job, offsets[e + 1] - r0);
        }
#ifdef _OPENMP
        float *h = hbuf + (int64_t)omp_get_thread_num() * inter;
#else
        float *h = hbuf;
#endif
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            /* Find r's expert by binary search over the offsets. */
            int64_t lo = 0, hi = num_experts;
            while (hi - lo > 1) {
                const int64_t mid = (lo + hi) / 2;
                if (offsets[mid] <= r) lo = mid; else hi = mid;
            }
            swiglu_clip_quant_row(gu + r * n1, inter, ip, alpha[lo], silu_vec, silu_scalar, vec_block,
                                  r - offsets[lo], offsets[lo + 1] - offsets[lo], torch_threads, grain, h,
                                  hq + r * ip, hs + r, hsum + r);
        }
#pragma omp for schedule(dynamic, chunk2)
        for (int64_t it = 0; it < items2; it++) {
            const int64_t e = active[it / nb2], b = it % nb2, r0 = offsets[e];
            block_job job = {w2 + e * w2_stride + b * kq2 * LINE, kq2, hq + r0 * ip, ip, hsum + r0, hs + r0,
                             w2_scale + e * nb2 * NBLOCK + b * NBLOCK,
                             (hidden - b * NBLOCK) < NBLOCK ? (hidden - b * NBLOCK) : NBLOCK, NULL,
                             out + r0 * hidden + b * NBLOCK, hidden};
            run_block_job(&job, offsets[e + 1] - r0);
        }
    }
    free(active);
    return W4A8_OK;
#endif
}

/* ---- probes for the benchmark: what the machine can stream and multiply ---- */

/* Read `bytes` (a multiple of 256) once with wide loads; returns a value that depends on every line. */
int64_t w4a8_probe_read(const uint8_t *buf, int64_t bytes, int nthreads) {
    int64_t total = 0;
    const int64_t lines = bytes / 256;
#pragma omp parallel for schedule(static) reduction(^ : total) num_threads(nthreads)
    for (int64_t i = 0; i < lines; i++) {
        const uint8_t *p = buf + i * 256;
#if W4A8_ISA == 3
        __m512i a = _mm512_xor_si512(_mm512_loadu_si512((const void *)p), _mm512_loadu_si512((const void *)(p + 64)));
        __m512i b = _mm512_xor_si512(_mm512_loadu_si512((const void *)(p + 128)),
                                     _mm512_loadu_si512((const void *)(p + 192)));
        total ^= (int64_t)_mm512_reduce_or_epi64(_mm512_xor_si512(a, b)) ^ i;
#elif W4A8_ISA >= 1
        __m256i a = _mm256_setzero_si256();
        for (int j = 0; j < 8; j++) a = _mm256_xor_si256(a, _mm256_loadu_si256((const __m256i *)(p + 32 * j)));
        total ^= _mm256_extract_epi64(a, 0) ^ _mm256_extract_epi64(a, 3) ^ i;
#else
        int64_t v = 0;
        for (int j = 0; j < 32; j++) { int64_t t; memcpy(&t, p + 8 * j, 8); v ^= t; }
        total ^= v ^ i;
#endif
    }
    return total;
}

/* Register-only u8 x s8 dot products; returns the number of multiply-adds done (2 ops each). */
int64_t w4a8_probe_int8_dot(int64_t iters, int nthreads, int32_t *sink) {
    int64_t macs = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : macs)
    {
#if W4A8_ISA == 3
        __m512i acc[16];
        const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-5);
        for (int i = 0; i < 16; i++) acc[i] = _mm512_set1_epi32(i);
        for (int64_t it = 0; it < iters; it++)
            for (int i = 0; i < 16; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
        __m512i s = acc[0];
        for (int i = 1; i < 16; i++) s = _mm512_add_epi32(s, acc[i]);
        const int32_t folded = _mm512_reduce_add_epi32(s);
#pragma omp atomic
        sink[0] += folded;
        macs += iters * 16 * 64;
#elif W4A8_ISA >= 1
        __m256i acc[8];
        const __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(-5);
        for (int i = 0; i < 8; i++) acc[i] = _mm256_set1_epi32(i);
        for (int64_t it = 0; it < iters; it++)
            for (int i = 0; i < 8; i++) acc[i] = dot_u8s8(acc[i], a, b);
        __m256i s = acc[0];
        for (int i = 1; i < 8; i++) s = _mm256_add_epi32(s, acc[i]);
        const int32_t folded = _mm256_extract_epi32(s, 0);
#pragma omp atomic
        sink[0] += folded;
        macs += iters * 8 * 32;
#else
        (void)iters; (void)sink;
#endif
    }
    return macs;
}
