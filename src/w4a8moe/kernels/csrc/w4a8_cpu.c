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
 * int8 weights (W8A8 Linears, w4a8_relayout_int8) use the same blocks with two 64-byte lines
 * per k-quad, channels 0-15 then 16-31, each byte w + 128 (0..255), and a bias of 128 * sum x.
 * vpdpbusd takes that byte as is; plain AVX2's vpmaddubsw would saturate its int16 pair sums
 * on it, so that path splits each byte into nibbles and weighs the high one by 16.
 *
 * Threading: the work is a list of (expert, 32-channel block) items, so that a decode call (one
 * row per expert) still streams every weight byte exactly once, split across cores. The items
 * run on the OpenMP runtime that torch itself has loaded (cpu.py links this library against
 * that very runtime), so a model forward has one thread pool, sized by torch.set_num_threads,
 * whether torch or this kernel runs: the same threads, hot from torch's last region, take the
 * kernel's items. Inside one parallel region the items are claimed with atomics and a phase
 * only waits for items a thread has actually claimed, not for a barrier of the whole team
 * (which, on a busy machine, costs a scheduler time slice whenever one member is descheduled);
 * only the region's end joins the team.
 * Built without OpenMP (torch's runtime not found: cpu.py warns), every job runs serially on
 * the calling thread.
 */
#define _GNU_SOURCE /* dladdr */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <dlfcn.h>
#include <unistd.h>
#include <sys/syscall.h>
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

#define W4A8_ABI_VERSION 9
#define NBLOCK 32           /* output channels per weight block */
#define LINE 64             /* bytes per (block, k-quad) line */
#define PREFETCH_LINES 128  /* software prefetch distance (8 KiB) in the weight stream: measured best */

#define W4A8_OK 0
#define W4A8_ERR_TOKEN_ID -1
#define W4A8_ERR_OFFSETS -2
#define W4A8_ERR_NO_SIMD -3
#define W4A8_ERR_NO_MEMORY -4
#define W4A8_ERR_ARGS -5
#define W4A8_ERR_EXPERT_ID -6

int w4a8_isa(void) { return W4A8_ISA; }
int w4a8_abi_version(void) { return W4A8_ABI_VERSION; }

/* ---- the work pool: torch's OpenMP threads ------------------------------------------ */

#define MAX_PHASES 6
#define MAX_THREADS 256

typedef struct pool_job pool_job;
typedef void (*phase_fn)(const pool_job *job, int phase, int64_t begin, int64_t end, int participant);

/* A job: phases run in order, each a range of items handed out in chunks; a participant
 * enters phase p + 1 only when every item of phase p is done. */
struct pool_job {
    int nphases;
    int max_participants;
    int64_t total[MAX_PHASES];
    int64_t chunk[MAX_PHASES];
    _Atomic int64_t next[MAX_PHASES];
    _Atomic int64_t done[MAX_PHASES];
    phase_fn run;
    const void *args;
    int64_t *team_tids; /* when not NULL: each participant's kernel thread id (w4a8_probe_team) */
    int team_size;
};

/* GNU libgomp cannot start a parallel region in a child forked after the parent ran one: the
 * child's team threads do not exist and the region waits for them forever (torch's own ops
 * hang there too, unless the child calls torch.set_num_threads(1)). So a child forked after
 * this library ran a team runs its jobs serially instead of hanging. */
static _Atomic int ran_parallel;
static _Atomic int serial_after_fork;

static void after_fork_in_child(void) {
    if (atomic_load(&ran_parallel)) atomic_store(&serial_after_fork, 1);
}

__attribute__((constructor)) static void register_fork_handler(void) {
    pthread_atfork(NULL, NULL, after_fork_in_child);
}

static void wait_until_done(const pool_job *job, int p) {
    int spins = 0;
    while (atomic_load(&((pool_job *)job)->done[p]) < job->total[p]) {
        _mm_pause();
        /* The straggler may be waiting for this core: let it run. */
        if (++spins > 4096) sched_yield();
    }
}

/* The next chunk of phase p, guided: half of an equal share of what is left, never less than
 * the phase's chunk. Long sequential runs first, short ones last, so that the team's last
 * chunks end close together (a decode call's phases are a few milliseconds of weight stream:
 * a fixed chunk left up to one chunk's time of a thread idle at each phase's end). */
static int64_t claim_chunk(pool_job *job, int p, int64_t *end) {
    const int64_t total = job->total[p], team = job->max_participants;
    int64_t begin = atomic_load(&job->next[p]), size;
    do {
        if (begin >= total) return begin;
        size = (total - begin) / (2 * team);
        if (size < job->chunk[p]) size = job->chunk[p];
        if (size > total - begin) size = total - begin;
    } while (!atomic_compare_exchange_weak(&job->next[p], &begin, begin + size));
    *end = begin + size;
    return begin;
}

static void run_job(pool_job *job, int participant) {
    for (int p = 0; p < job->nphases; p++) {
        for (;;) {
            int64_t end = 0;
            const int64_t begin = claim_chunk(job, p, &end);
            if (begin >= job->total[p]) break;
            job->run(job, p, begin, end, participant);
            atomic_fetch_add(&job->done[p], end - begin);
        }
        wait_until_done(job, p);
    }
}

static void join_team(pool_job *job, int participant, int team_size) {
    if (job->team_tids) {
        job->team_tids[participant] = (int64_t)syscall(SYS_gettid);
        if (participant == 0) job->team_size = team_size;
    }
    run_job(job, participant);
}

/* Run `job` on up to `nthreads` threads: the caller and (OpenMP build) the other threads of
 * the caller's OpenMP team, the ones torch's parallel regions use. */
static void pool_submit(pool_job *job, int nthreads) {
    nthreads = nthreads < 1 ? 1 : (nthreads > MAX_THREADS ? MAX_THREADS : nthreads);
    for (int p = 0; p < job->nphases; p++) {
        atomic_store(&job->next[p], 0);
        atomic_store(&job->done[p], 0);
        if (job->chunk[p] < 1) job->chunk[p] = 1;
    }
#ifdef _OPENMP
    if (atomic_load(&serial_after_fork)) nthreads = 1;
    job->max_participants = nthreads;
    if (nthreads > 1) {
        atomic_store(&ran_parallel, 1);
        /* num_threads: the caller passes torch.get_num_threads() (or the backend's override);
         * the runtime may give fewer threads, never more. */
#pragma omp parallel num_threads(nthreads)
        join_team(job, omp_get_thread_num(), omp_get_num_threads());
        return;
    }
#endif
    job->max_participants = 1;
    join_team(job, 0, 1);
}

/* The OpenMP runtime this library is bound to (the file defining omp_get_num_threads), ""
 * where it cannot be told, NULL in a build without OpenMP. */
const char *w4a8_openmp_runtime(void) {
#ifdef _OPENMP
    Dl_info info;
    if (dladdr((void *)&omp_get_num_threads, &info) && info.dli_fname) return info.dli_fname;
    return "";
#else
    return NULL;
#endif
}

/* A trivial job on `nthreads` threads that records its team: tids_out[i] is participant i's
 * kernel thread id; returns the team size (how the tests see which threads do the work). */
static void probe_team_items(const pool_job *job, int phase, int64_t begin, int64_t end, int participant) {
    (void)job; (void)phase; (void)begin; (void)end; (void)participant;
}

int w4a8_probe_team(int nthreads, int64_t *tids_out) {
    pool_job job = {.nphases = 1, .run = probe_team_items, .args = NULL, .team_tids = tids_out};
    job.total[0] = 1;
    job.chunk[0] = 1;
    pool_submit(&job, nthreads);
    return job.team_size;
}

static int64_t chunk_for(int64_t items, int nthreads, int64_t per_thread) {
    /* About `per_thread` chunks per thread: coarse enough to keep weight streams sequential,
     * fine enough to balance. */
    const int64_t c = items / ((int64_t)(nthreads < 1 ? 1 : nthreads) * per_thread);
    return c < 1 ? 1 : c;
}

static inline int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

int64_t w4a8_layout_bytes(int64_t n, int64_t k) {
    return round_up(n, NBLOCK) / NBLOCK * (round_up(k, 4) / 4) * LINE;
}

int64_t w4a8_int8_layout_bytes(int64_t n, int64_t k) { return 2 * w4a8_layout_bytes(n, k); }

typedef struct {
    const int8_t *src; /* SPEC-4 packed [N/2, K] (int4) or row-major [N, K] (int8) */
    int64_t n, k, kq;
    uint8_t *out;
} relayout_args;

/* Run a re-layout over the 32-channel blocks of an [n, k] matrix. */
static void relayout_over_blocks(phase_fn run, const int8_t *src, int64_t n, int64_t k, uint8_t *out,
                                 int nthreads) {
    relayout_args args = {src, n, k, round_up(k, 4) / 4, out};
    pool_job job = {.nphases = 1, .run = run, .args = &args};
    job.total[0] = round_up(n, NBLOCK) / NBLOCK;
    job.chunk[0] = chunk_for(job.total[0], nthreads, 4);
    pool_submit(&job, nthreads);
}

static void relayout_int8_blocks(const pool_job *job, int phase, int64_t begin, int64_t end, int participant) {
    (void)phase; (void)participant;
    const relayout_args *a = (const relayout_args *)job->args;
    for (int64_t b = begin; b < end; b++) {
        uint8_t *dst = a->out + b * a->kq * 2 * LINE;
        for (int64_t q = 0; q < a->kq; q++) {
            for (int half = 0; half < 2; half++) {
                for (int lane = 0; lane < 16; lane++) {
                    const int64_t c = b * NBLOCK + 16 * half + lane;
                    for (int j = 0; j < 4; j++) {
                        const int64_t kk = 4 * q + j;
                        const int8_t v = (c < a->n && kk < a->k) ? a->src[c * a->k + kk] : 0;
                        dst[(2 * q + half) * LINE + 4 * lane + j] = (uint8_t)((int)v + 128);
                    }
                }
            }
        }
    }
}

/* Nibble (w + 8) of channel c, column kk of a SPEC-4 packed [N/2, K] matrix; 8 (w = 0) as padding. */
static inline uint8_t biased_nibble(const int8_t *packed, int64_t n, int64_t k, int64_t c, int64_t kk) {
    if (c >= n || kk >= k) return 8;
    uint8_t byte = (uint8_t)packed[(c >> 1) * k + kk];
    uint8_t nib = (c & 1) ? (byte >> 4) : (byte & 0x0F);
    return nib ^ 0x08; /* two's complement nibble -> nibble + 8 (mod 16) = unsigned 0..15 */
}

static void relayout_blocks(const pool_job *job, int phase, int64_t begin, int64_t end, int participant) {
    (void)phase; (void)participant;
    const relayout_args *a = (const relayout_args *)job->args;
    for (int64_t b = begin; b < end; b++) {
        uint8_t *dst = a->out + b * a->kq * LINE;
        for (int64_t q = 0; q < a->kq; q++) {
            for (int lane = 0; lane < 16; lane++) {
                for (int j = 0; j < 4; j++) {
                    const int64_t kk = 4 * q + j;
                    uint8_t lo = biased_nibble(a->src, a->n, a->k, b * NBLOCK + lane, kk);
                    uint8_t hi = biased_nibble(a->src, a->n, a->k, b * NBLOCK + 16 + lane, kk);
                    dst[q * LINE + 4 * lane + j] = (uint8_t)(lo | (hi << 4));
                }
            }
        }
    }
}

/* Re-lay one packed [N/2, K] int4 matrix into the blocked VNNI layout described above. */
void w4a8_relayout(const int8_t *packed, int64_t n, int64_t k, uint8_t *out, int nthreads) {
    relayout_over_blocks(relayout_blocks, packed, n, k, out, nthreads);
}

/* Re-lay an int8 [N, K] matrix into the int8 block layout described at the top. */
void w4a8_relayout_int8(const int8_t *w, int64_t n, int64_t k, uint8_t *out, int nthreads) {
    relayout_over_blocks(relayout_int8_blocks, w, n, k, out, nthreads);
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
    int int8w;            /* 0: int4 lines (64 bytes per quad), 1: int8 lines (128 bytes per quad) */
} block_job;

/* The exact correction for the biased weight bytes: 8 * sum x (int4) or 128 * sum x (int8),
 * in wrapping arithmetic like the vector accumulators (exact whenever the result fits). */
static inline int32_t weight_bias(int32_t xsum, const int int8w) {
    return (int32_t)((uint32_t)xsum * (int8w ? 128u : 8u));
}

#if W4A8_ISA == 3
#define MR 12  /* rows per register tile: 24 zmm accumulators + 4 working registers of 32 */

static inline __m256i bf16_rne_512(__m512 f) {
    __m512i b = _mm512_castps_si512(f);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
}

/* acc += u8 w . s8 x (vpdpbusd). Written as asm because GCC's intrinsic does not tie the
 * accumulator to the destination register and copies every accumulator on every use. */
static inline __attribute__((always_inline)) __m512i dpbusd_512(__m512i acc, __m512i w_u8, __m512i x_s8) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w_u8), "v"(x_s8));
    return acc;
}

static inline __attribute__((always_inline)) void tile_512(const block_job *job, int64_t r0, const int mr,
                                                            const int int8w) {
    __m512i acc[MR][2];
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const int8_t *x = job->x + r0 * job->ldx;
    const int64_t ldx = job->ldx;
    for (int i = 0; i < mr; i++) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
    const uint8_t *w = job->w;
    for (int64_t q = 0; q < job->kq; q++) {
        __m512i lo, hi; /* channels 0-15 and 16-31 as u8 vpdpbusd operands */
        if (int8w) {
            _mm_prefetch((const char *)(w + (2 * q + PREFETCH_LINES) * LINE), _MM_HINT_T0);
            _mm_prefetch((const char *)(w + (2 * q + 1 + PREFETCH_LINES) * LINE), _MM_HINT_T0);
            lo = _mm512_loadu_si512((const void *)(w + 2 * q * LINE));
            hi = _mm512_loadu_si512((const void *)(w + (2 * q + 1) * LINE));
        } else {
            _mm_prefetch((const char *)(w + (q + PREFETCH_LINES) * LINE), _MM_HINT_T0);
            const __m512i p = _mm512_loadu_si512((const void *)(w + q * LINE));
            lo = _mm512_and_si512(p, m4);
            hi = _mm512_and_si512(_mm512_srli_epi16(p, 4), m4);
        }
        for (int i = 0; i < mr; i++) {
            const __m512i xb = _mm512_set1_epi32(load_i32(x + i * ldx + 4 * q));
            acc[i][0] = dpbusd_512(acc[i][0], lo, xb);
            acc[i][1] = dpbusd_512(acc[i][1], hi, xb);
        }
    }
    const __mmask16 mask0 = job->nvalid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << job->nvalid) - 1);
    const __mmask16 mask1 = job->nvalid >= 32 ? (__mmask16)0xFFFF
                          : job->nvalid <= 16 ? (__mmask16)0 : (__mmask16)((1u << (job->nvalid - 16)) - 1);
    const __mmask16 masks[2] = {mask0, mask1};
    for (int i = 0; i < mr; i++) {
        const int64_t row = r0 + i;
        const __m512i bias = _mm512_set1_epi32(weight_bias(job->xsum[row], int8w));
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

static inline __attribute__((always_inline)) void run_rows_512(const block_job *job, int64_t m, const int int8w) {
    int64_t r0 = 0;
    for (; r0 + MR <= m; r0 += MR) tile_512(job, r0, MR, int8w);
    switch (m - r0) {
        case 1: tile_512(job, r0, 1, int8w); break;
        case 2: tile_512(job, r0, 2, int8w); break;
        case 3: tile_512(job, r0, 3, int8w); break;
        case 4: tile_512(job, r0, 4, int8w); break;
        case 5: tile_512(job, r0, 5, int8w); break;
        case 6: tile_512(job, r0, 6, int8w); break;
        case 7: tile_512(job, r0, 7, int8w); break;
        case 8: tile_512(job, r0, 8, int8w); break;
        case 9: tile_512(job, r0, 9, int8w); break;
        case 10: tile_512(job, r0, 10, int8w); break;
        case 11: tile_512(job, r0, 11, int8w); break;
        default: break;
    }
}

static void run_block_job(const block_job *job, int64_t m) {
    /* Two specialisations: the weight width is a compile-time constant inside each. */
    if (job->int8w) run_rows_512(job, m, 1); else run_rows_512(job, m, 0);
}

#elif W4A8_ISA >= 1
#define MR 2  /* rows per register tile: 8 ymm accumulators */

static inline __attribute__((always_inline)) __m256i dot_u8s8(__m256i acc, __m256i w_u8, __m256i x_s8) {
#if W4A8_ISA == 2
    /* asm for the same reason as dpbusd_512; {vex} selects the AVX-VNNI encoding. */
    __asm__("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(w_u8), "x"(x_s8));
    return acc;
#else
    /* u8 (0..15) x s8 pairs sum to at most 2*15*128 = 3840: vpmaddubsw cannot saturate. */
    const __m256i pairs = _mm256_maddubs_epi16(w_u8, x_s8);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

/* The same for full bytes (0..255, int8 weights + 128). */
static inline __attribute__((always_inline)) __m256i dot_u8s8_byte(__m256i acc, __m256i w_u8, __m256i x_s8) {
#if W4A8_ISA == 2
    return dot_u8s8(acc, w_u8, x_s8);
#else
    /* 2*255*128 overflows vpmaddubsw's int16 pair sums: take the nibbles separately (each pair
     * sum at most 3840) and weigh the high one by 16 in vpmaddwd, exact in int32. */
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_maddubs_epi16(_mm256_and_si256(w_u8, m4), x_s8);
    const __m256i hi = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w_u8, 4), m4), x_s8);
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(lo, _mm256_set1_epi16(1)));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(hi, _mm256_set1_epi16(16)));
#endif
}

static inline __attribute__((always_inline)) void tile_256(const block_job *job, int64_t r0, const int mr,
                                                            const int int8w) {
    /* acc[i][0]: channels 0-7, [1]: 8-15, [2]: 16-23, [3]: 24-31 */
    __m256i acc[MR][4];
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const int8_t *x = job->x + r0 * job->ldx;
    const int64_t ldx = job->ldx;
    for (int i = 0; i < mr; i++)
        for (int h = 0; h < 4; h++) acc[i][h] = _mm256_setzero_si256();
    const uint8_t *w = job->w;
    for (int64_t q = 0; q < job->kq; q++) {
        __m256i l0, l1, h0, h1; /* channels 0-7, 8-15, 16-23, 24-31 */
        if (int8w) {
            _mm_prefetch((const char *)(w + (2 * q + PREFETCH_LINES) * LINE), _MM_HINT_T0);
            _mm_prefetch((const char *)(w + (2 * q + 1 + PREFETCH_LINES) * LINE), _MM_HINT_T0);
            l0 = _mm256_loadu_si256((const __m256i *)(w + 2 * q * LINE));
            l1 = _mm256_loadu_si256((const __m256i *)(w + 2 * q * LINE + 32));
            h0 = _mm256_loadu_si256((const __m256i *)(w + (2 * q + 1) * LINE));
            h1 = _mm256_loadu_si256((const __m256i *)(w + (2 * q + 1) * LINE + 32));
        } else {
            _mm_prefetch((const char *)(w + (q + PREFETCH_LINES) * LINE), _MM_HINT_T0);
            const __m256i p0 = _mm256_loadu_si256((const __m256i *)(w + q * LINE));
            const __m256i p1 = _mm256_loadu_si256((const __m256i *)(w + q * LINE + 32));
            l0 = _mm256_and_si256(p0, m4);
            l1 = _mm256_and_si256(p1, m4);
            h0 = _mm256_and_si256(_mm256_srli_epi16(p0, 4), m4);
            h1 = _mm256_and_si256(_mm256_srli_epi16(p1, 4), m4);
        }
        for (int i = 0; i < mr; i++) {
            const __m256i xb = _mm256_set1_epi32(load_i32(x + i * ldx + 4 * q));
            if (int8w) {
                acc[i][0] = dot_u8s8_byte(acc[i][0], l0, xb);
                acc[i][1] = dot_u8s8_byte(acc[i][1], l1, xb);
                acc[i][2] = dot_u8s8_byte(acc[i][2], h0, xb);
                acc[i][3] = dot_u8s8_byte(acc[i][3], h1, xb);
            } else {
                acc[i][0] = dot_u8s8(acc[i][0], l0, xb);
                acc[i][1] = dot_u8s8(acc[i][1], l1, xb);
                acc[i][2] = dot_u8s8(acc[i][2], h0, xb);
                acc[i][3] = dot_u8s8(acc[i][3], h1, xb);
            }
        }
    }
    for (int i = 0; i < mr; i++) {
        const int64_t row = r0 + i;
        int32_t lanes[32];
        for (int h = 0; h < 4; h++) _mm256_storeu_si256((__m256i *)(lanes + 8 * h), acc[i][h]);
        for (int64_t c = 0; c < job->nvalid; c++) {
            const int32_t exact = (int32_t)((uint32_t)lanes[c] - (uint32_t)weight_bias(job->xsum[row], int8w));
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

static inline __attribute__((always_inline)) void run_rows_256(const block_job *job, int64_t m, const int int8w) {
    int64_t r0 = 0;
    for (; r0 + MR <= m; r0 += MR) tile_256(job, r0, MR, int8w);
    if (m - r0 == 1) tile_256(job, r0, 1, int8w);
}

static void run_block_job(const block_job *job, int64_t m) {
    if (job->int8w) run_rows_256(job, m, 1); else run_rows_256(job, m, 0);
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

typedef struct {
    const uint8_t *wl;
    int64_t n, k, kq, m;
    const int8_t *x;
    int64_t ldx;
    int8_t *xp;
    int32_t *xsum;
    const float *xscale, *wscale;
    int32_t *out_i32;
    uint16_t *out_bf16;
    int int8w;
} gemm_args;

#if W4A8_ISA != 0
/* Rows [begin, end) of x into the zero-padded copy xp, with their sums. */
static void gemm_pad_rows(const gemm_args *a, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++)
        a->xsum[r] = copy_row_padded(a->x + r * a->ldx, a->k, a->xp + r * 4 * a->kq, 4 * a->kq);
}

/* Weight blocks [begin, end) of one matrix, against all m rows of xp. */
static void gemm_blocks(const gemm_args *a, int64_t begin, int64_t end) {
    const int64_t block_bytes = a->kq * LINE * (a->int8w ? 2 : 1);
    for (int64_t b = begin; b < end; b++) {
        block_job bj = {a->wl + b * block_bytes, a->kq, a->xp, 4 * a->kq, a->xsum, a->xscale,
                        a->wscale ? a->wscale + b * NBLOCK : NULL,
                        (a->n - b * NBLOCK) < NBLOCK ? (a->n - b * NBLOCK) : NBLOCK,
                        a->out_i32 ? a->out_i32 + b * NBLOCK : NULL, a->out_bf16 ? a->out_bf16 + b * NBLOCK : NULL,
                        a->n, a->int8w};
        run_block_job(&bj, a->m);
    }
}

static void gemm_phase(const pool_job *job, int phase, int64_t begin, int64_t end, int participant) {
    (void)participant;
    const gemm_args *a = (const gemm_args *)job->args;
    if (phase == 0) gemm_pad_rows(a, begin, end); else gemm_blocks(a, begin, end);
}
#endif

/*
 * One matrix: out[m, n] for m rows of x [M, ldx] (K valid columns) against one re-laid
 * weight matrix (int4 layout, or the int8 one when int8w). Exact int32 into out_i32 when it
 * is not NULL, else bf16 scaled by xscale[m] and wscale (padded to a multiple of 32): the
 * W8A8 Linears, and the tests and the benchmark.
 */
int w4a8_gemm(const uint8_t *wl, int64_t n, int64_t k, const int8_t *x, int64_t m, int64_t ldx,
              const float *xscale, const float *wscale_padded, int32_t *out_i32, uint16_t *out_bf16,
              int int8w, int nthreads) {
#if W4A8_ISA == 0
    (void)wl; (void)n; (void)k; (void)x; (void)m; (void)ldx; (void)xscale; (void)wscale_padded;
    (void)out_i32; (void)out_bf16; (void)int8w; (void)nthreads;
    return W4A8_ERR_NO_SIMD;
#else
    if (m == 0) return W4A8_OK;
    const int64_t kp = round_up(k, 4);
    int8_t *xp = (int8_t *)malloc((size_t)(m * kp) + 64);
    int32_t *xsum = (int32_t *)malloc((size_t)m * sizeof(int32_t));
    if (!xp || !xsum) {
        free(xp);
        free(xsum);
        return W4A8_ERR_NO_MEMORY;
    }
    gemm_args args = {wl, n, k, kp / 4, m, x, ldx, xp, xsum, xscale, wscale_padded, out_i32, out_bf16, int8w != 0};
    pool_job job = {.nphases = 2, .run = gemm_phase, .args = &args};
    job.total[0] = m;
    job.chunk[0] = chunk_for(m, nthreads, 2);
    job.total[1] = round_up(n, NBLOCK) / NBLOCK;
    job.chunk[1] = chunk_for(job.total[1], nthreads, 8);
    pool_submit(&job, nthreads);
    free(xp);
    free(xsum);
    return W4A8_OK;
#endif
}

/* Columns of row `row` (of `rows` rows, width `inter`) that torch's silu computes with its
 * scalar code rather than its vector code: TensorIterator splits the flattened [rows, inter]
 * range over threads (chunks of ceil(numel / nth) when numel >= grain), and inside each
 * contiguous run of a chunk the vector loop covers whole groups of `vec_block` elements, the
 * rest being scalar. A run is a row segment when torch's input is a column slice of wider
 * rows (`coalesced` 0: the routed experts' swiglu), the whole chunk when its input is one
 * contiguous block (`coalesced` 1: silu_and_mul's fp32 copy of the gate). Recomputes h at
 * each such column with the scalar table. */
static void patch_scalar_silu(float *h, const uint16_t *g, const uint16_t *u, int64_t row, int64_t rows,
                              int64_t inter, const float *silu_scalar, int64_t vec_block, int64_t torch_threads,
                              int64_t grain, int coalesced) {
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
        const int64_t chunk_start = seg / chunk * chunk, next_split = chunk_start + chunk;
        const int64_t seg_end = next_split < row_end ? next_split : row_end;
        const int64_t run_start = coalesced ? chunk_start : seg;
        const int64_t run_end = coalesced ? (next_split < numel ? next_split : numel) : seg_end;
        const int64_t tail = run_end - (run_end - run_start) % vec_block;
        for (int64_t p = tail > seg ? tail : seg; p < seg_end; p++) {
            const int64_t j = p - row_start;
            h[j] = silu_scalar[g[j]] * bf16_to_f32(u[j]);
        }
        seg = seg_end;
    }
}

/* torch's silu, from its per-value tables, and where its code runs scalar (patch_scalar_silu). */
typedef struct {
    const float *vec, *scalar;
    int64_t vec_block, torch_threads, grain;
} silu_code;

/* h = silu(g) * u in fp32 for row `row` of `rows` (each of width `inter`). */
static void silu_mul_row(const uint16_t *g, const uint16_t *u, int64_t inter, const silu_code *silu, int64_t row,
                         int64_t rows, int coalesced, float *h) {
    int64_t j = 0;
#if W4A8_ISA == 3
    for (; j + 16 <= inter; j += 16) {
        const __m512i gi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(g + j)));
        const __m512 uf = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(u + j))), 16));
        _mm512_storeu_ps(h + j, _mm512_mul_ps(_mm512_i32gather_ps(gi, silu->vec, 4), uf));
    }
#endif
    for (; j < inter; j++) h[j] = silu->vec[g[j]] * bf16_to_f32(u[j]);
    if (silu->vec_block > 0)
        patch_scalar_silu(h, g, u, row, rows, inter, silu->scalar, silu->vec_block, silu->torch_threads,
                          silu->grain, coalesced);
}

/* SwiGLU-clip-quant of one row: bf16 gate|up [2*inter] -> int8 [inter_padded], scale, sum. */
static void swiglu_clip_quant_row(const uint16_t *gu, int64_t inter, int64_t inter_padded, float alpha,
                                  const silu_code *silu, int64_t row, int64_t rows, float *h, int8_t *hq,
                                  float *hscale, int32_t *hsum) {
    silu_mul_row(gu, gu + inter, inter, silu, row, rows, 0, h);
    float amax = 0.0f;
    int64_t j = 0;
#if W4A8_ISA == 3
    /* max(|h|) is exact in any order; NaN is skipped as by the scalar comparison below. */
    __m512 vmax = _mm512_setzero_ps();
    for (; j + 16 <= inter; j += 16) {
        const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(h + j));
        vmax = _mm512_mask_mov_ps(vmax, _mm512_cmp_ps_mask(a, vmax, _CMP_GT_OQ), a);
    }
    amax = _mm512_reduce_max_ps(vmax);
#endif
    for (; j < inter; j++) {
        const float a = fabsf(h[j]);
        amax = a > amax ? a : amax;
    }
    const float bound = alpha * amax;
    const float c = bound / 127.0f;
    /* An all-zero row has c = 0: divide by 1 instead, every value is 0 anyway. */
    const float safe = c > 0.0f ? c : 1.0f;
    int32_t sum = 0;
    j = 0;
#if W4A8_ISA == 3
    {
        const __m512 hi = _mm512_set1_ps(bound), lo = _mm512_set1_ps(-bound), div = _mm512_set1_ps(safe);
        const __m512 qmax = _mm512_set1_ps(127.0f), qmin = _mm512_set1_ps(-128.0f);
        __m512i vsum = _mm512_setzero_si512();
        for (; j + 16 <= inter; j += 16) {
            /* The same comparisons, in the same order, as the scalar loop. */
            __m512 v = _mm512_loadu_ps(h + j);
            v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, lo, _CMP_LT_OQ), lo);
            v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, hi, _CMP_GT_OQ), hi);
            __m512 r = _mm512_roundscale_ps(_mm512_div_ps(v, div), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(r, qmin, _CMP_LT_OQ), qmin);
            r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(r, qmax, _CMP_GT_OQ), qmax);
            /* int8 by truncation, as the scalar (int8_t) cast; sum what was stored. */
            const __m128i q8 = _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(r));
            _mm_storeu_si128((__m128i *)(hq + j), q8);
            vsum = _mm512_add_epi32(vsum, _mm512_cvtepi8_epi32(q8));
        }
        sum = _mm512_reduce_add_epi32(vsum);
    }
#endif
    for (; j < inter; j++) {
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

typedef struct {
    const uint16_t *gu;
    int64_t rows, inter;
    float alpha;
    silu_code silu;
    float *h;
    int8_t *hq;
    float *hscale;
} swiglu_args;

static void swiglu_rows(const pool_job *job, int phase, int64_t begin, int64_t end, int participant) {
    (void)phase; (void)participant;
    const swiglu_args *a = (const swiglu_args *)job->args;
    for (int64_t r = begin; r < end; r++) {
        int32_t sum;
        swiglu_clip_quant_row(a->gu + r * 2 * a->inter, a->inter, a->inter, a->alpha, &a->silu, r, a->rows,
                              a->h + r * a->inter, a->hq + r * a->inter, a->hscale + r, &sum);
    }
}

/*
 * The SwiGLU-clip-quant step alone over `rows` rows of one expert (a test entry): bf16
 * gate|up [rows, 2*inter] -> h fp32 [rows, inter], h_q int8 [rows, inter], c [rows].
 */
int w4a8_swiglu_clip_quant(const uint16_t *gu, int64_t rows, int64_t inter, float alpha, const float *silu_vec,
                           const float *silu_scalar, int64_t vec_block, int64_t torch_threads, int64_t grain,
                           float *h_out, int8_t *hq, float *hscale, int nthreads) {
    swiglu_args args = {gu, rows, inter, alpha, {silu_vec, silu_scalar, vec_block, torch_threads, grain},
                        h_out, hq, hscale};
    pool_job job = {.nphases = 1, .run = swiglu_rows, .args = &args};
    job.total[0] = rows;
    job.chunk[0] = chunk_for(rows, nthreads, 4);
    pool_submit(&job, nthreads);
    return W4A8_OK;
}

typedef struct {
    const uint8_t *w13, *w2;
    const float *w13_scale, *w2_scale;
    int64_t num_experts, hidden, inter, n1, hp, ip, kq1, kq2, nb1, nb2, w13_stride, w2_stride;
    const int8_t *x_q;
    const float *x_scale;
    const int64_t *token_ids, *offsets, *active;
    int64_t nact, rows, num_tokens;
    const float *alpha;
    silu_code silu;
    int8_t *xg, *hq;
    uint16_t *gu, *out;
    float *hbuf, *xs, *hs;
    int32_t *xsum, *hsum;
    /* The fused combine (NULL out_f32: none): token t's rows, in increasing r, are
     * token_rows[token_start[t] .. token_start[t + 1]). */
    const float *row_weights;
    const int64_t *token_rows, *token_start;
    float *out_f32;
} moe_args;

enum { PHASE_GATHER, PHASE_GMM1, PHASE_SWIGLU, PHASE_GMM2, PHASE_COMBINE };

/* out[t, :] = sum over token t's rows r, in increasing r, of float(rows[r, :]) * w[r]: an fp32
 * multiply, then an fp32 add onto 0 + the earlier terms, exactly what torch's
 * zeros().index_add_(0, token_ids, rows.float() * w) computes. Plain C (no FMA: the build uses
 * -ffp-contract=off), which the compiler vectorizes for any ISA. */
static void combine_token(const uint16_t *rows, int64_t hidden, const float *w, const int64_t *token_rows,
                          int64_t count, float *out) {
    for (int64_t j = 0; j < hidden; j++) out[j] = 0.0f;
    for (int64_t i = 0; i < count; i++) {
        const int64_t r = token_rows[i];
        const uint16_t *row = rows + r * hidden;
        const float wr = w[r];
        for (int64_t j = 0; j < hidden; j++) {
            const float product = bf16_to_f32(row[j]) * wr;
            out[j] = out[j] + product;
        }
    }
}

#if W4A8_ISA != 0
/* Items [begin, end) of phase `phase` of the routed expert path (w4a8_moe_forward, w4a8_moe_block). */
static void moe_items(const moe_args *a, int phase, int64_t begin, int64_t end, int participant) {
    if (phase == PHASE_GATHER) {
        for (int64_t r = begin; r < end; r++) {
            const int64_t t = a->token_ids[r];
            a->xsum[r] = copy_row_padded(a->x_q + t * a->hidden, a->hidden, a->xg + r * a->hp, a->hp);
            a->xs[r] = a->x_scale[t];
        }
    } else if (phase == PHASE_GMM1) {
        for (int64_t it = begin; it < end; it++) {
            const int64_t e = a->active[it / a->nb1], b = it % a->nb1, r0 = a->offsets[e];
            block_job bj = {a->w13 + e * a->w13_stride + b * a->kq1 * LINE, a->kq1, a->xg + r0 * a->hp, a->hp,
                            a->xsum + r0, a->xs + r0, a->w13_scale + e * a->nb1 * NBLOCK + b * NBLOCK,
                            (a->n1 - b * NBLOCK) < NBLOCK ? (a->n1 - b * NBLOCK) : NBLOCK, NULL,
                            a->gu + r0 * a->n1 + b * NBLOCK, a->n1, 0};
            run_block_job(&bj, a->offsets[e + 1] - r0);
        }
    } else if (phase == PHASE_SWIGLU) {
        float *h = a->hbuf + (int64_t)participant * a->inter;
        for (int64_t r = begin; r < end; r++) {
            /* r's expert: binary search over the offsets. */
            int64_t lo = 0, hi = a->num_experts;
            while (hi - lo > 1) {
                const int64_t mid = (lo + hi) / 2;
                if (a->offsets[mid] <= r) lo = mid; else hi = mid;
            }
            swiglu_clip_quant_row(a->gu + r * a->n1, a->inter, a->ip, a->alpha[lo], &a->silu, r - a->offsets[lo],
                                  a->offsets[lo + 1] - a->offsets[lo], h, a->hq + r * a->ip, a->hs + r,
                                  a->hsum + r);
        }
    } else if (phase == PHASE_GMM2) {
        for (int64_t it = begin; it < end; it++) {
            const int64_t e = a->active[it / a->nb2], b = it % a->nb2, r0 = a->offsets[e];
            block_job bj = {a->w2 + e * a->w2_stride + b * a->kq2 * LINE, a->kq2, a->hq + r0 * a->ip, a->ip,
                            a->hsum + r0, a->hs + r0, a->w2_scale + e * a->nb2 * NBLOCK + b * NBLOCK,
                            (a->hidden - b * NBLOCK) < NBLOCK ? (a->hidden - b * NBLOCK) : NBLOCK, NULL,
                            a->out + r0 * a->hidden + b * NBLOCK, a->hidden, 0};
            run_block_job(&bj, a->offsets[e + 1] - r0);
        }
    } else {
        for (int64_t t = begin; t < end; t++)
            combine_token(a->out, a->hidden, a->row_weights, a->token_rows + a->token_start[t],
                          a->token_start[t + 1] - a->token_start[t], a->out_f32 + t * a->hidden);
    }
}

static void moe_phase(const pool_job *job, int phase, int64_t begin, int64_t end, int participant) {
    moe_items((const moe_args *)job->args, phase, begin, end, participant);
}
#endif

/*
 * The grouped expert path. Rows r in [offsets[e], offsets[e+1]) belong to expert e and read
 * token token_ids[r] of x_q [M, H]; out is bf16 [R, H]. Scratch buffers are supplied by the
 * caller: xg [R, Hp] int8, gu [R, 2I] bf16, hq [R, Ip] int8, h [nthreads, I] fp32,
 * xsum/hsum [R] int32, xs/hs [R] fp32 (Hp, Ip: H, I rounded up to a multiple of 4).
 * With out_f32 [M, H] (else NULL), a last phase also combines the rows per token
 * (combine_token, with row_weights [R]); token_rows [R] and token_start [M + 1] are scratch.
 */
#if W4A8_ISA != 0
/* Checks the routing (offsets, token ids), sorts each token's rows for the combine when
 * token_rows is not NULL, lists the experts with rows (*active, malloc'ed: the caller frees it)
 * and fills *a; the pointers are those of w4a8_moe_forward. */
static int moe_setup(moe_args *a, int64_t **active_out, const uint8_t *w13, const float *w13_scale,
                     const uint8_t *w2, const float *w2_scale, int64_t num_experts, int64_t hidden, int64_t inter,
                     const int8_t *x_q, const float *x_scale, int64_t num_tokens, const int64_t *token_ids,
                     const int64_t *offsets, const float *alpha, silu_code silu, int8_t *xg, uint16_t *gu,
                     int8_t *hq, float *hbuf, int32_t *xsum, int32_t *hsum, float *xs, float *hs, uint16_t *out,
                     const float *row_weights, int64_t *token_rows, int64_t *token_start, float *out_f32) {
    *active_out = NULL;
    if (offsets[0] != 0) return W4A8_ERR_OFFSETS;
    for (int64_t e = 0; e < num_experts; e++)
        if (offsets[e + 1] < offsets[e]) return W4A8_ERR_OFFSETS;
    const int64_t rows = offsets[num_experts];
    for (int64_t r = 0; r < rows; r++)
        if (token_ids[r] < 0 || token_ids[r] >= num_tokens) return W4A8_ERR_TOKEN_ID;
    if (token_rows) {
        /* Each token's rows in increasing r: a counting sort by token, O(R + M). */
        for (int64_t t = 0; t <= num_tokens; t++) token_start[t] = 0;
        for (int64_t r = 0; r < rows; r++) token_start[token_ids[r] + 1]++;
        for (int64_t t = 0; t < num_tokens; t++) token_start[t + 1] += token_start[t];
        for (int64_t r = 0; r < rows; r++) token_rows[token_start[token_ids[r]]++] = r;
        for (int64_t t = num_tokens; t > 0; t--) token_start[t] = token_start[t - 1];
        token_start[0] = 0;
    }
    /* Work items over experts that have rows; an empty expert costs nothing. */
    int64_t *active = (int64_t *)malloc((size_t)(num_experts > 0 ? num_experts : 1) * sizeof(int64_t));
    if (!active) return W4A8_ERR_NO_MEMORY;
    int64_t nact = 0;
    for (int64_t e = 0; e < num_experts; e++)
        if (offsets[e + 1] > offsets[e]) active[nact++] = e;
    *active_out = active;

    a->w13 = w13; a->w2 = w2; a->w13_scale = w13_scale; a->w2_scale = w2_scale;
    a->num_experts = num_experts; a->hidden = hidden; a->inter = inter;
    a->n1 = 2 * inter; a->hp = round_up(hidden, 4); a->ip = round_up(inter, 4);
    a->kq1 = a->hp / 4; a->kq2 = a->ip / 4;
    a->nb1 = round_up(a->n1, NBLOCK) / NBLOCK; a->nb2 = round_up(hidden, NBLOCK) / NBLOCK;
    a->w13_stride = a->nb1 * a->kq1 * LINE; a->w2_stride = a->nb2 * a->kq2 * LINE;
    a->x_q = x_q; a->x_scale = x_scale; a->token_ids = token_ids; a->offsets = offsets; a->active = active;
    a->nact = nact; a->rows = rows; a->num_tokens = num_tokens;
    a->alpha = alpha;
    a->silu = silu;
    a->xg = xg; a->hq = hq; a->gu = gu; a->out = out; a->hbuf = hbuf; a->xs = xs; a->hs = hs; a->xsum = xsum;
    a->hsum = hsum;
    a->row_weights = row_weights; a->token_rows = token_rows; a->token_start = token_start; a->out_f32 = out_f32;
    return W4A8_OK;
}

/* Items per phase of the routed path (PHASE_GATHER .. PHASE_GMM2) and their chunks. */
static void moe_totals(const moe_args *a, int64_t total[4]) {
    total[PHASE_GATHER] = a->rows;
    total[PHASE_GMM1] = a->nact * a->nb1;
    total[PHASE_SWIGLU] = a->rows;
    total[PHASE_GMM2] = a->nact * a->nb2;
}
#endif

/*
 * The grouped expert path. Rows r in [offsets[e], offsets[e+1]) belong to expert e and read
 * token token_ids[r] of x_q [M, H]; out is bf16 [R, H]. Scratch buffers are supplied by the
 * caller: xg [R, Hp] int8, gu [R, 2I] bf16, hq [R, Ip] int8, h [nthreads, I] fp32,
 * xsum/hsum [R] int32, xs/hs [R] fp32 (Hp, Ip: H, I rounded up to a multiple of 4).
 * With out_f32 [M, H] (else NULL), a last phase also combines the rows per token
 * (combine_token, with row_weights [R]); token_rows [R] and token_start [M + 1] are scratch.
 */
int w4a8_moe_forward(const uint8_t *w13, const float *w13_scale, const uint8_t *w2, const float *w2_scale,
                     int64_t num_experts, int64_t hidden, int64_t inter, const int8_t *x_q, const float *x_scale,
                     int64_t num_tokens, const int64_t *token_ids, const int64_t *offsets, const float *alpha,
                     const float *silu_vec, const float *silu_scalar, int64_t vec_block, int64_t torch_threads,
                     int64_t grain, int8_t *xg, uint16_t *gu, int8_t *hq, float *hbuf, int32_t *xsum,
                     int32_t *hsum, float *xs, float *hs, uint16_t *out, const float *row_weights,
                     int64_t *token_rows, int64_t *token_start, float *out_f32, int nthreads) {
#if W4A8_ISA == 0
    (void)w13; (void)w13_scale; (void)w2; (void)w2_scale; (void)num_experts; (void)hidden; (void)inter;
    (void)x_q; (void)x_scale; (void)num_tokens; (void)token_ids; (void)offsets; (void)alpha; (void)silu_vec;
    (void)silu_scalar; (void)vec_block; (void)torch_threads; (void)grain; (void)xg; (void)gu; (void)hq;
    (void)hbuf; (void)xsum; (void)hsum; (void)xs; (void)hs; (void)out; (void)row_weights; (void)token_rows;
    (void)token_start; (void)out_f32; (void)nthreads;
    return W4A8_ERR_NO_SIMD;
#else
    moe_args a;
    int64_t *active;
    const int status = moe_setup(&a, &active, w13, w13_scale, w2, w2_scale, num_experts, hidden, inter, x_q,
                                 x_scale, num_tokens, token_ids, offsets, alpha,
                                 (silu_code){silu_vec, silu_scalar, vec_block, torch_threads, grain}, xg, gu, hq,
                                 hbuf, xsum, hsum, xs, hs, out, row_weights, out_f32 ? token_rows : NULL,
                                 token_start, out_f32);
    if (status != W4A8_OK) return status;
    if (a.rows == 0) {
        free(active);
        if (out_f32) memset(out_f32, 0, (size_t)(num_tokens * hidden) * sizeof(float));
        return W4A8_OK;
    }
    pool_job job = {.nphases = out_f32 ? 5 : 4, .run = moe_phase, .args = &a};
    moe_totals(&a, job.total);
    job.chunk[PHASE_GATHER] = chunk_for(a.rows, nthreads, 2);
    /* Chunks of consecutive blocks keep each thread's weight stream long and sequential. */
    job.chunk[PHASE_GMM1] = chunk_for(job.total[PHASE_GMM1], nthreads, 32);
    job.chunk[PHASE_SWIGLU] = chunk_for(a.rows, nthreads, 4);
    job.chunk[PHASE_GMM2] = chunk_for(job.total[PHASE_GMM2], nthreads, 32);
    job.total[PHASE_COMBINE] = num_tokens;
    job.chunk[PHASE_COMBINE] = chunk_for(num_tokens, nthreads, 4);
    pool_submit(&job, nthreads);
    free(active);
    return W4A8_OK;
#endif
}

/* ---- per-token int8 quantization of the layer input ---------------------------------- */

/*
 * torch's dynamic_quant_per_token, bit for bit, in one pass per row and no temporaries:
 * a = max_k |x| / 127 (fp32 division); q = clamp(rint(x / (a > 0 ? a : 1)), -128, 127).
 * A row whose max is not finite (inf or NaN) is not quantized here: the call reports it and
 * the caller uses torch, whose handling of those values this code does not reproduce.
 */
typedef struct {
    const void *x;
    int64_t k, ldx;
    int is_bf16;
    int8_t *q;
    float *scale;
    _Atomic int nonfinite;
} quant_args;

static inline float load_x(const void *x, int is_bf16, int64_t i) {
    return is_bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

/* One row of k values (bf16 or fp32) into q [k] and *scale; returns 1 (writing nothing) when
 * the row's max |x| is not finite. */
static int quant_row(const void *row, int is_bf16, int64_t k, int8_t *q, float *scale_out) {
    /* |x| orders like its bit pattern without the sign; inf and NaN sit above every finite. */
    uint32_t max_bits = 0;
    for (int64_t j = 0; j < k; j++) {
        const float v = load_x(row, is_bf16, j);
        uint32_t b;
        memcpy(&b, &v, 4);
        b &= 0x7FFFFFFFu;
        max_bits = b > max_bits ? b : max_bits;
    }
    if (max_bits >= 0x7F800000u) return 1;
    float amax;
    memcpy(&amax, &max_bits, 4);
    const float scale = amax / 127.0f;
    const float safe = scale > 0.0f ? scale : 1.0f;
    *scale_out = scale;
    int64_t j = 0;
#if W4A8_ISA == 3
    const __m512 vs = _mm512_set1_ps(safe);
    const __m512 lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
    for (; j + 16 <= k; j += 16) {
        __m512 v = is_bf16
            ? _mm512_castsi512_ps(_mm512_slli_epi32(
                  _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + j))), 16))
            : _mm512_loadu_ps((const float *)row + j);
        v = _mm512_roundscale_ps(_mm512_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        _mm_storeu_si128((__m128i *)(q + j), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
    }
#elif W4A8_ISA >= 1
    const __m256 vs = _mm256_set1_ps(safe);
    const __m256 lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
    for (; j + 8 <= k; j += 8) {
        __m256 v = is_bf16
            ? _mm256_castsi256_ps(_mm256_slli_epi32(
                  _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + j))), 16))
            : _mm256_loadu_ps((const float *)row + j);
        v = _mm256_round_ps(_mm256_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
        const __m256i i32 = _mm256_cvtps_epi32(v);
        const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
        _mm_storel_epi64((__m128i *)(q + j), _mm_packs_epi16(i16, i16));
    }
#endif
    for (; j < k; j++) {
        float v = rintf(load_x(row, is_bf16, j) / safe);
        v = v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v);
        q[j] = (int8_t)v;
    }
    return 0;
}

static void quant_rows_phase(const pool_job *job, int phase, int64_t begin, int64_t end, int participant) {
    (void)phase; (void)participant;
    quant_args *a = (quant_args *)job->args;
    for (int64_t r = begin; r < end; r++) {
        const void *row = a->is_bf16 ? (const void *)((const uint16_t *)a->x + r * a->ldx)
                                     : (const void *)((const float *)a->x + r * a->ldx);
        if (quant_row(row, a->is_bf16, a->k, a->q + r * a->k, a->scale + r)) atomic_store(&a->nonfinite, 1);
    }
}

/* Quantize m rows of x (bf16 or fp32, row stride ldx elements) into q [m, k] and scale [m].
 * Returns 1 (and leaves the non-finite rows unwritten) when a row's max |x| is not finite. */
int w4a8_quant_rows(const void *x, int64_t m, int64_t k, int64_t ldx, int is_bf16, int8_t *q, float *scale,
                    int nthreads) {
    quant_args args = {x, k, ldx, is_bf16, q, scale, 0};
    pool_job job = {.nphases = 1, .run = quant_rows_phase, .args = &args};
    job.total[0] = m;
    job.chunk[0] = chunk_for(m, nthreads, 4);
    if (m > 0) pool_submit(&job, (m * k < (1 << 16)) ? 1 : nthreads); /* small calls: no wake-up */
    return atomic_load(&args.nonfinite);
}

/* ---- a W8A8 gated MLP (a shared expert, a dense MLP) in one call --------------------- */

/* silu_and_mul of row `row` of `rows`: hb = bf16_rne(silu(g) * u in fp32), h fp32 scratch. torch
 * computes silu on the gate's contiguous fp32 copy, hence `coalesced` runs of its scalar code. */
static void silu_and_mul_row(const uint16_t *g, const uint16_t *u, int64_t inter, const silu_code *silu,
                             int64_t row, int64_t rows, float *h, uint16_t *hb) {
    silu_mul_row(g, u, inter, silu, row, rows, 1, h);
    int64_t j = 0;
#if W4A8_ISA == 3
    for (; j + 16 <= inter; j += 16) _mm256_storeu_si256((__m256i *)(hb + j), bf16_rne_512(_mm512_loadu_ps(h + j)));
#endif
    for (; j < inter; j++) hb[j] = f32_to_bf16(h[j]);
}

typedef struct {
    gemm_args gate_up, down; /* down's x, xp, xsum, xscale: the activation phase's hq, hsum, hs */
    int64_t m, inter, ip;
    silu_code silu;
    int8_t *hq;
    int32_t *hsum;
    uint16_t *gu, *hb;
    float *hbuf, *hs;
    _Atomic int nonfinite;
} gated_args;

enum { GATED_PAD, GATED_GMM1, GATED_ACT, GATED_GMM2 };

#if W4A8_ISA != 0
/* Items [begin, end) of phase `phase` of the gated MLP (w4a8_gated_mlp_int8, w4a8_moe_block). */
static void gated_items(gated_args *a, int phase, int64_t begin, int64_t end, int participant) {
    if (phase == GATED_PAD) {
        gemm_pad_rows(&a->gate_up, begin, end);
    } else if (phase == GATED_GMM1) {
        gemm_blocks(&a->gate_up, begin, end);
    } else if (phase == GATED_GMM2) {
        gemm_blocks(&a->down, begin, end);
    } else {
        /* silu_and_mul (fp32, one rounding to bf16), then the per-token quantization of the
         * bf16 values, as torch computes it on the bf16 tensor silu_and_mul returns. */
        float *h = a->hbuf + (int64_t)participant * a->inter;
        uint16_t *hb = a->hb + (int64_t)participant * a->inter;
        for (int64_t r = begin; r < end; r++) {
            const uint16_t *g = a->gu + r * 2 * a->inter;
            silu_and_mul_row(g, g + a->inter, a->inter, &a->silu, r, a->m, h, hb);
            int8_t *q = a->hq + r * a->ip;
            if (quant_row(hb, 1, a->inter, q, a->hs + r)) {
                atomic_store(&a->nonfinite, 1);
                memset(q, 0, (size_t)a->ip);
                a->hs[r] = 0.0f;
            }
            a->hsum[r] = copy_row_padded(q, a->inter, q, a->ip); /* in place: the sum and the zero pad */
        }
    }
}

static void gated_phase(const pool_job *job, int phase, int64_t begin, int64_t end, int participant) {
    gated_items((gated_args *)job->args, phase, begin, end, participant);
}

/* The arguments of one gated MLP call (see w4a8_gated_mlp_int8 for the buffers). */
static gated_args gated_setup(const uint8_t *w13, const float *w13_scale, const uint8_t *w2, const float *w2_scale,
                              int64_t k, int64_t inter, int64_t n2, const int8_t *x_q, const float *x_scale,
                              int64_t m, silu_code silu, int8_t *xp, int32_t *xsum, uint16_t *gu, int8_t *hq,
                              float *hs, int32_t *hsum, float *hbuf, uint16_t *hb, uint16_t *out) {
    const int64_t ip = round_up(inter, 4);
    gated_args a = {
        {w13, 2 * inter, k, round_up(k, 4) / 4, m, x_q, k, xp, xsum, x_scale, w13_scale, NULL, gu, 1},
        {w2, n2, inter, ip / 4, m, NULL, 0, hq, hsum, hs, w2_scale, NULL, out, 1},
        m, inter, ip, silu, hq, hsum, gu, hb, hbuf, hs, 0};
    return a;
}

/* Items per phase of the gated MLP (GATED_PAD .. GATED_GMM2). */
static void gated_totals(const gated_args *a, int64_t total[4]) {
    total[GATED_PAD] = a->m;
    total[GATED_GMM1] = round_up(a->gate_up.n, NBLOCK) / NBLOCK;
    total[GATED_ACT] = a->m;
    total[GATED_GMM2] = round_up(a->down.n, NBLOCK) / NBLOCK;
}
#endif

/*
 * out [m, n2] bf16 = down(silu_and_mul(gate_up(x))) for x_q int8 [m, k] with x_scale fp32 [m],
 * each projection a W8A8 Linear in the int8 layout (w4a8_relayout_int8) with its scales
 * padded to a multiple of 32: w13 is the stacked gate|up [2 * inter, k], w2 [n2, inter]. The
 * bits of the torch code it replaces: the scaled GEMM (as w4a8_gemm), h = bf16_rne(silu(g) *
 * u in fp32) (silu_and_mul: torch's silu from the tables, its scalar code where its
 * TensorIterator runs scalar over the contiguous fp32 gate), the per-token quantization of
 * that bf16 h (w4a8_quant_rows), the scaled GEMM. Scratch: xp [m, 4 * kq1] int8, xsum [m],
 * gu [m, 2 * inter] bf16, hq [m, ip] int8 (ip = inter rounded up to 4), hs [m], hsum [m],
 * hbuf [nthreads, inter] fp32, hb [nthreads, inter] bf16.
 * Returns 1 when a row of h is not finite: out is then not valid and the caller runs torch.
 */
int w4a8_gated_mlp_int8(const uint8_t *w13, const float *w13_scale, const uint8_t *w2, const float *w2_scale,
                        int64_t k, int64_t inter, int64_t n2, const int8_t *x_q, const float *x_scale, int64_t m,
                        const float *silu_vec, const float *silu_scalar, int64_t vec_block, int64_t torch_threads,
                        int64_t grain, int8_t *xp, int32_t *xsum, uint16_t *gu, int8_t *hq, float *hs,
                        int32_t *hsum, float *hbuf, uint16_t *hb, uint16_t *out, int nthreads) {
#if W4A8_ISA == 0
    (void)w13; (void)w13_scale; (void)w2; (void)w2_scale; (void)k; (void)inter; (void)n2; (void)x_q;
    (void)x_scale; (void)m; (void)silu_vec; (void)silu_scalar; (void)vec_block; (void)torch_threads; (void)grain;
    (void)xp; (void)xsum; (void)gu; (void)hq; (void)hs; (void)hsum; (void)hbuf; (void)hb; (void)out;
    (void)nthreads;
    return W4A8_ERR_NO_SIMD;
#else
    if (m == 0) return W4A8_OK;
    gated_args a = gated_setup(w13, w13_scale, w2, w2_scale, k, inter, n2, x_q, x_scale, m,
                               (silu_code){silu_vec, silu_scalar, vec_block, torch_threads, grain}, xp, xsum, gu, hq,
                               hs, hsum, hbuf, hb, out);
    pool_job job = {.nphases = 4, .run = gated_phase, .args = &a};
    gated_totals(&a, job.total);
    job.chunk[GATED_PAD] = chunk_for(m, nthreads, 2);
    job.chunk[GATED_GMM1] = chunk_for(job.total[GATED_GMM1], nthreads, 8);
    job.chunk[GATED_ACT] = chunk_for(m, nthreads, 4);
    job.chunk[GATED_GMM2] = chunk_for(job.total[GATED_GMM2], nthreads, 8);
    pool_submit(&job, nthreads);
    return atomic_load(&a.nonfinite);
#endif
}

/* ---- the whole MoE block: routed experts and shared expert in one job -------------- */

typedef struct {
    quant_args quant;  /* the block input's per-token quantization */
    moe_args routed;
    gated_args shared;
    int has_shared;
    int64_t split[4];  /* phases 1-4: the routed items [0, split), then the shared expert's */
    float scaling;
    float *rowbuf;     /* [nthreads, hidden] fp32 */
    uint16_t *out;     /* [M, hidden] bf16 */
} block_args;

enum { BLOCK_QUANT, BLOCK_COMBINE = 5, BLOCK_PHASES };

int w4a8_sort_rows(const int64_t *ids, int64_t n, int64_t k, int64_t e, const float *weights, int64_t *order,
                   int64_t *token_ids, int64_t *offsets, float *row_weights);

#if W4A8_ISA != 0
/* out[t] = bf16(combine(t) * scaling + float(shared[t])): torch's out.mul_(scaling), then
 * .add_(shared.float()), then .to(bfloat16), one fp32 rounding each (no FMA in this build). */
static void block_token(const block_args *a, int64_t t, int participant) {
    const moe_args *r = &a->routed;
    const int64_t hidden = r->hidden;
    float *o = a->rowbuf + (int64_t)participant * hidden;
    combine_token(r->out, hidden, r->row_weights, r->token_rows + r->token_start[t],
                  r->token_start[t + 1] - r->token_start[t], o);
    const uint16_t *sh = a->has_shared ? a->shared.down.out_bf16 + t * hidden : NULL;
    uint16_t *dst = a->out + t * hidden;
    for (int64_t j = 0; j < hidden; j++) {
        float v = o[j] * a->scaling;
        if (sh) v = v + bf16_to_f32(sh[j]);
        dst[j] = f32_to_bf16(v);
    }
}

static void block_phase(const pool_job *job, int phase, int64_t begin, int64_t end, int participant) {
    block_args *a = (block_args *)job->args;
    if (phase == BLOCK_QUANT) {
        quant_args *q = &a->quant;
        for (int64_t t = begin; t < end; t++)
            if (quant_row((const uint16_t *)q->x + t * q->ldx, 1, q->k, q->q + t * q->k, q->scale + t))
                atomic_store(&q->nonfinite, 1);
    } else if (phase == BLOCK_COMBINE) {
        for (int64_t t = begin; t < end; t++) block_token(a, t, participant);
    } else {
        /* The routed experts' and the shared expert's phases run as one: the threads go from
         * one weight stream to the next without waiting for each other in between. */
        const int p = phase - 1;
        const int64_t split = a->split[p];
        if (begin < split) moe_items(&a->routed, p, begin, end < split ? end : split, participant);
        if (end > split) gated_items(&a->shared, p, (begin > split ? begin : split) - split, end - split, participant);
    }
}
#endif

/*
 * One MoE block on bf16 x [M, H]: out [M, H] bf16 = bf16(routed * scaling + shared), where
 *   - x is quantized per token (w4a8_quant_rows) into xq [M, H], xscale [M];
 *   - the routed rows, topk_ids / topk_weights [M, top_k], are sorted by expert
 *     (w4a8_sort_rows into order, token_ids, row_weights [M * top_k], offsets [E + 1]);
 *   - routed is the combined expert path of w4a8_moe_forward (its weights, alpha and scratch
 *     xg .. token_start; rowbuf [nthreads, H] fp32 instead of its out_f32);
 *   - shared, when sw13 is not NULL, is w4a8_gated_mlp_int8 of the same xq (intermediate size
 *     s_inter, output H; its scratch sxp .. shb and its bf16 output sout [M, H]).
 * The quantization, the routed and shared phases and the sum share one parallel region, the
 * routed and shared work of each phase claimed from one range. Returns 1 when a row of x or of
 * the shared expert's activation is not finite (out is then not valid: the caller runs torch).
 */
int w4a8_moe_block(const uint8_t *w13, const float *w13_scale, const uint8_t *w2, const float *w2_scale,
                   const float *alpha, int64_t num_experts, int64_t hidden, int64_t inter, const uint8_t *sw13,
                   const float *sw13_scale, const uint8_t *sw2, const float *sw2_scale, int64_t s_inter,
                   float scaling, const float *silu_vec, const float *silu_scalar, int64_t vec_block,
                   int64_t grain, const uint16_t *x, int64_t m, const float *topk_weights, const int64_t *topk_ids,
                   int64_t top_k, int64_t torch_threads, int8_t *xq, float *xscale, int64_t *order,
                   int64_t *token_ids, int64_t *offsets, float *row_weights, int8_t *xg, uint16_t *gu, int8_t *hq,
                   float *hbuf, int32_t *xsum, int32_t *hsum, float *xs, float *hs, uint16_t *rows_out,
                   int64_t *token_rows, int64_t *token_start, float *rowbuf, int8_t *sxp, int32_t *sxsum,
                   uint16_t *sgu, int8_t *shq, float *shs, int32_t *shsum, float *shbuf, uint16_t *shb,
                   uint16_t *sout, uint16_t *out, int nthreads) {
#if W4A8_ISA == 0
    (void)w13; (void)w13_scale; (void)w2; (void)w2_scale; (void)alpha; (void)num_experts; (void)hidden;
    (void)inter; (void)sw13; (void)sw13_scale; (void)sw2; (void)sw2_scale; (void)s_inter; (void)scaling;
    (void)silu_vec; (void)silu_scalar; (void)vec_block; (void)grain; (void)x; (void)m; (void)topk_weights;
    (void)topk_ids; (void)top_k; (void)torch_threads; (void)xq; (void)xscale; (void)order; (void)token_ids;
    (void)offsets; (void)row_weights; (void)xg; (void)gu; (void)hq; (void)hbuf; (void)xsum; (void)hsum; (void)xs;
    (void)hs; (void)rows_out; (void)token_rows; (void)token_start; (void)rowbuf; (void)sxp; (void)sxsum;
    (void)sgu; (void)shq; (void)shs; (void)shsum; (void)shbuf; (void)shb; (void)sout; (void)out; (void)nthreads;
    return W4A8_ERR_NO_SIMD;
#else
    if (m == 0) return W4A8_OK;
    int status = w4a8_sort_rows(topk_ids, m * top_k, top_k, num_experts, topk_weights, order, token_ids, offsets,
                                row_weights);
    if (status != W4A8_OK) return status;
    block_args a;
    a.quant = (quant_args){x, hidden, hidden, 1, xq, xscale, 0};
    int64_t *active;
    const silu_code silu = {silu_vec, silu_scalar, vec_block, torch_threads, grain};
    status = moe_setup(&a.routed, &active, w13, w13_scale, w2, w2_scale, num_experts, hidden, inter, xq, xscale, m,
                       token_ids, offsets, alpha, silu, xg, gu, hq, hbuf, xsum, hsum, xs, hs, rows_out, row_weights,
                       token_rows, token_start, NULL);
    if (status != W4A8_OK) return status;
    a.has_shared = sw13 != NULL;
    if (a.has_shared)
        a.shared = gated_setup(sw13, sw13_scale, sw2, sw2_scale, hidden, s_inter, hidden, xq, xscale, m, silu, sxp,
                               sxsum, sgu, shq, shs, shsum, shbuf, shb, sout);
    atomic_store(&a.shared.nonfinite, 0);
    a.scaling = scaling;
    a.rowbuf = rowbuf;
    a.out = out;
    int64_t routed_items[4], shared_items[4] = {0, 0, 0, 0};
    moe_totals(&a.routed, routed_items);
    if (a.has_shared) gated_totals(&a.shared, shared_items);
    pool_job job = {.nphases = BLOCK_PHASES, .run = block_phase, .args = &a};
    job.total[BLOCK_QUANT] = m;
    job.chunk[BLOCK_QUANT] = chunk_for(m, nthreads, 4);
    /* The smallest chunk (claim_chunk hands out larger ones first): a quarter of a thread's
     * rows, or a 256th of its weight blocks. */
    static const int64_t per_thread[4] = {2, 256, 4, 256};
    for (int p = 0; p < 4; p++) {
        a.split[p] = routed_items[p];
        job.total[p + 1] = routed_items[p] + shared_items[p];
        job.chunk[p + 1] = chunk_for(job.total[p + 1], nthreads, per_thread[p]);
    }
    job.total[BLOCK_COMBINE] = m;
    job.chunk[BLOCK_COMBINE] = chunk_for(m, nthreads, 4);
    pool_submit(&job, nthreads);
    free(active);
    return (atomic_load(&a.quant.nonfinite) || (a.has_shared && atomic_load(&a.shared.nonfinite))) ? 1 : W4A8_OK;
#endif
}

typedef struct {
    const uint16_t *gu;
    int64_t rows, inter;
    silu_code silu;
    float *hbuf;
    uint16_t *out;
} silu_and_mul_args;

static void silu_and_mul_rows(const pool_job *job, int phase, int64_t begin, int64_t end, int participant) {
    (void)phase;
    const silu_and_mul_args *a = (const silu_and_mul_args *)job->args;
    for (int64_t r = begin; r < end; r++)
        silu_and_mul_row(a->gu + r * 2 * a->inter, a->gu + r * 2 * a->inter + a->inter, a->inter, &a->silu, r,
                         a->rows, a->hbuf + (int64_t)participant * a->inter, a->out + r * a->inter);
}

/* The activation step of w4a8_gated_mlp_int8 alone (a test entry): bf16 gate|up [rows, 2*inter]
 * -> bf16 [rows, inter]; hbuf [nthreads, inter] fp32 scratch. */
int w4a8_silu_and_mul(const uint16_t *gu, int64_t rows, int64_t inter, const float *silu_vec,
                      const float *silu_scalar, int64_t vec_block, int64_t torch_threads, int64_t grain, float *hbuf,
                      uint16_t *out, int nthreads) {
    silu_and_mul_args args = {gu, rows, inter, {silu_vec, silu_scalar, vec_block, torch_threads, grain}, hbuf, out};
    pool_job job = {.nphases = 1, .run = silu_and_mul_rows, .args = &args};
    job.total[0] = rows;
    job.chunk[0] = chunk_for(rows, nthreads, 4);
    pool_submit(&job, nthreads);
    return W4A8_OK;
}

/* ---- routing: expert selection and the sort of routed rows by expert (SPEC 3) ----
 *
 * The float work that has to be torch's bits (the router matmul, sigmoid or softmax, the
 * renormalisation's sum) stays in torch; these functions do what is exact in any order:
 * comparisons, one fp32 add per expert (s + bias) and one per group (the sum of its two best),
 * and the stable counting sort of the (token, slot) rows by expert. Ranking: the larger value
 * first, NaN above every number (as torch's sort), equal values by the lower index. */

static inline int ranks_before(float a, int64_t ia, float b, int64_t ib) {
    const int na = a != a, nb = b != b;
    if (na || nb) return na && (!nb || ia < ib);
    return a > b || (a == b && ia < ib);
}

/* Insert candidate (v, i) into the ranked list best[0..*len) of capacity cap. */
static inline void rank_insert(float *val, int64_t *idx, int64_t *len, int64_t cap, float v, int64_t i) {
    int64_t n = *len;
    if (n == cap && !ranks_before(v, i, val[n - 1], idx[n - 1])) return;
    int64_t p = n < cap ? n : cap - 1;
    while (p > 0 && ranks_before(v, i, val[p - 1], idx[p - 1])) {
        val[p] = val[p - 1];
        idx[p] = idx[p - 1];
        p--;
    }
    val[p] = v;
    idx[p] = i;
    if (n < cap) *len = n + 1;
}

/* For each of m rows of scores [m, e]: rank s' = s + bias (bias may be NULL: s' = s); with
 * n_group > 1, keep the topk_group groups (of e / n_group consecutive experts) whose two best
 * s' sum highest; then the top_k experts by s' among the kept groups, best first, into
 * ids [m, top_k], and their unbiased s into weights [m, top_k]. Needs top_k <= the experts of
 * the kept groups and n_group, topk_group <= 64 (checked by the caller). */
int w4a8_select_experts(const float *scores, const float *bias, int64_t m, int64_t e, int64_t top_k,
                        int64_t n_group, int64_t topk_group, float *weights, int64_t *ids) {
    if (n_group < 1 || n_group > 64 || topk_group < 1 || topk_group > n_group || e % n_group || top_k < 1
        || top_k > topk_group * (e / n_group))
        return W4A8_ERR_ARGS;
    const int64_t per = e / n_group;
    float *biased = (float *)malloc((size_t)(e + top_k) * sizeof(float));
    if (!biased) return W4A8_ERR_NO_MEMORY;
    float *best_v = biased + e;
    for (int64_t r = 0; r < m; r++) {
        const float *s = scores + r * e;
        for (int64_t j = 0; j < e; j++) biased[j] = bias ? s[j] + bias[j] : s[j];
        uint64_t kept = ~(uint64_t)0;
        if (n_group > 1) {
            float group_v[64], two_v[2];
            int64_t group_i[64], two_i[2], ng = 0;
            for (int64_t g = 0; g < n_group; g++) {
                int64_t len = 0;
                for (int64_t j = g * per; j < (g + 1) * per; j++) rank_insert(two_v, two_i, &len, 2, biased[j], j);
                rank_insert(group_v, group_i, &ng, topk_group, len == 2 ? two_v[0] + two_v[1] : two_v[0], g);
            }
            kept = 0;
            for (int64_t g = 0; g < ng; g++) kept |= (uint64_t)1 << group_i[g];
        }
        int64_t len = 0, *out = ids + r * top_k;
        for (int64_t g = 0; g < n_group; g++) {
            if (!((kept >> g) & 1)) continue;
            for (int64_t j = g * per; j < (g + 1) * per; j++) rank_insert(best_v, out, &len, top_k, biased[j], j);
        }
        for (int64_t t = 0; t < top_k; t++) weights[r * top_k + t] = s[out[t]];
    }
    free(biased);
    return W4A8_OK;
}

/* The n flat rows (row i is token i / k, slot i % k) with expert ids ids[n], sorted stably by
 * expert: order[n] (the flat row at each sorted position), token_ids[n], offsets[e + 1] (where
 * each expert's rows start) and, when weights is not NULL, row_weights[n] = weights[order]. */
int w4a8_sort_rows(const int64_t *ids, int64_t n, int64_t k, int64_t e, const float *weights, int64_t *order,
                   int64_t *token_ids, int64_t *offsets, float *row_weights) {
    if (k < 1) return W4A8_ERR_ARGS;
    memset(offsets, 0, (size_t)(e + 1) * sizeof(int64_t));
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= e) return W4A8_ERR_EXPERT_ID;
        offsets[ids[i] + 1]++;
    }
    for (int64_t x = 0; x < e; x++) offsets[x + 1] += offsets[x];
    int64_t *cursor = (int64_t *)malloc((size_t)(e > 0 ? e : 1) * sizeof(int64_t));
    if (!cursor) return W4A8_ERR_NO_MEMORY;
    memcpy(cursor, offsets, (size_t)e * sizeof(int64_t));
    for (int64_t i = 0; i < n; i++) {
        const int64_t p = cursor[ids[i]]++;
        order[p] = i;
        token_ids[p] = i / k;
        if (weights) row_weights[p] = weights[i];
    }
    free(cursor);
    return W4A8_OK;
}

/* ---- probes for the benchmark: what the machine can stream and multiply ---- */

typedef struct {
    const uint8_t *buf;
    int64_t iters;
    int64_t results[MAX_THREADS];
} probe_args;

static void probe_read_lines(const pool_job *job, int phase, int64_t begin, int64_t end, int participant) {
    (void)phase;
    probe_args *a = (probe_args *)job->args;
    int64_t total = 0;
#if W4A8_ISA == 3
    __m512i x0 = _mm512_setzero_si512(), x1 = x0, x2 = x0, x3 = x0;
    for (int64_t i = begin; i < end; i++) {
        const uint8_t *p = a->buf + i * 256;
        if (a->iters) /* software prefetch, 4 KiB ahead */
            for (int j = 0; j < 4; j++) _mm_prefetch((const char *)(p + 4096 + 64 * j), _MM_HINT_T0);
        x0 = _mm512_xor_si512(x0, _mm512_loadu_si512((const void *)p));
        x1 = _mm512_xor_si512(x1, _mm512_loadu_si512((const void *)(p + 64)));
        x2 = _mm512_xor_si512(x2, _mm512_loadu_si512((const void *)(p + 128)));
        x3 = _mm512_xor_si512(x3, _mm512_loadu_si512((const void *)(p + 192)));
    }
    total = (int64_t)_mm512_reduce_or_epi64(_mm512_xor_si512(_mm512_xor_si512(x0, x1), _mm512_xor_si512(x2, x3)));
#elif W4A8_ISA >= 1
    __m256i x0 = _mm256_setzero_si256(), x1 = x0;
    for (int64_t i = begin; i < end; i++) {
        const uint8_t *p = a->buf + i * 256;
        if (a->iters)
            for (int j = 0; j < 4; j++) _mm_prefetch((const char *)(p + 4096 + 64 * j), _MM_HINT_T0);
        for (int j = 0; j < 8; j += 2) {
            x0 = _mm256_xor_si256(x0, _mm256_loadu_si256((const __m256i *)(p + 32 * j)));
            x1 = _mm256_xor_si256(x1, _mm256_loadu_si256((const __m256i *)(p + 32 * j + 32)));
        }
    }
    x0 = _mm256_xor_si256(x0, x1);
    total = _mm256_extract_epi64(x0, 0) ^ _mm256_extract_epi64(x0, 3);
#else
    for (int64_t i = begin; i < end; i++)
        for (int j = 0; j < 32; j++) { int64_t t; memcpy(&t, a->buf + i * 256 + 8 * j, 8); total ^= t; }
#endif
    a->results[participant] ^= total;
}

/* Read `bytes` (a multiple of 256) once with wide loads, with or without software prefetch;
 * returns a value that depends on every line. */
int64_t w4a8_probe_read(const uint8_t *buf, int64_t bytes, int prefetch, int nthreads) {
    probe_args *a = (probe_args *)calloc(1, sizeof(probe_args));
    if (!a) return 0;
    a->buf = buf;
    a->iters = prefetch;
    pool_job job = {.nphases = 1, .run = probe_read_lines, .args = a};
    job.total[0] = bytes / 256;
    job.chunk[0] = chunk_for(job.total[0], nthreads, 16);
    pool_submit(&job, nthreads);
    int64_t total = 0;
    for (int i = 0; i < MAX_THREADS; i++) total ^= a->results[i];
    free(a);
    return total;
}

static void probe_dot_chunks(const pool_job *job, int phase, int64_t begin, int64_t end, int participant) {
    (void)phase;
    probe_args *a = (probe_args *)job->args;
    const int64_t iters = (end - begin) * a->iters;
#if W4A8_ISA == 3
    __m512i acc[16];
    const __m512i x = _mm512_set1_epi8(3), y = _mm512_set1_epi8(-5);
    for (int i = 0; i < 16; i++) acc[i] = _mm512_set1_epi32(i);
    for (int64_t it = 0; it < iters; it++)
        for (int i = 0; i < 16; i++) acc[i] = dpbusd_512(acc[i], x, y);
    __m512i s = acc[0];
    for (int i = 1; i < 16; i++) s = _mm512_add_epi32(s, acc[i]);
    a->results[participant] += _mm512_reduce_add_epi32(s);
#elif W4A8_ISA >= 1
    __m256i acc[8];
    const __m256i x = _mm256_set1_epi8(3), y = _mm256_set1_epi8(-5);
    for (int i = 0; i < 8; i++) acc[i] = _mm256_set1_epi32(i);
    for (int64_t it = 0; it < iters; it++)
        for (int i = 0; i < 8; i++) acc[i] = dot_u8s8(acc[i], x, y);
    __m256i s = acc[0];
    for (int i = 1; i < 8; i++) s = _mm256_add_epi32(s, acc[i]);
    a->results[participant] += _mm256_extract_epi32(s, 0);
#else
    (void)iters; (void)participant;
#endif
}

/* Register-only u8 x s8 dot products in `chunks` chunks of `iters` iterations, shared by the
 * threads; returns the number of multiply-adds done (2 ops each). */
int64_t w4a8_probe_int8_dot(int64_t chunks, int64_t iters, int nthreads) {
    probe_args *a = (probe_args *)calloc(1, sizeof(probe_args));
    if (!a) return 0;
    a->iters = iters;
    pool_job job = {.nphases = 1, .run = probe_dot_chunks, .args = a};
    job.total[0] = chunks;
    job.chunk[0] = 1;
    pool_submit(&job, nthreads);
    free(a);
#if W4A8_ISA == 3
    return chunks * iters * 16 * 64;
#elif W4A8_ISA >= 1
    return chunks * iters * 8 * 32;
#else
    return 0;
#endif
}

/* ---- the clip search's weight operand: fp32 weight -> int4 values -> the int4 layout ---- */

/* For the calibration's clip search, which quantizes the same fp32 weight under many scale
 * vectors: q = clamp(round_half_even(w / s_n), -qmax, qmax) per element, exactly as
 * torch.clamp(torch.round(w / s), -qmax, qmax) computes it (an IEEE fp32 division, then
 * round half to even), written straight into the int4 layout of w4a8_relayout (qmax <= 7),
 * so that w4a8_gemm(int8w = 0) multiplies it without a separate int8 copy or re-layout. */
typedef struct {
    const float *w;     /* [n, k] row-major fp32 */
    const float *scale; /* [n], positive */
    int64_t n, k, kq;
    float qmax;
    uint8_t *out;
    uint8_t *rows;      /* NBLOCK * 4 * kq bytes per participant */
} quant_int4_args;

/* Row c of w quantized, plus `bias` (8: 0..15 for the layout; 0: the signed values), into
 * dst [width], the columns past k (width > k: the layout's padding) holding the bias. */
static void quant_int4_row(const quant_int4_args *a, int64_t c, uint8_t *dst, const int bias, const int64_t width) {
    if (c >= a->n) {
        memset(dst, bias, (size_t)width);
        return;
    }
    const float *src = a->w + c * a->k;
    const float s = a->scale[c], lo = -a->qmax, hi = a->qmax;
    int64_t j = 0;
#if W4A8_ISA >= 1
    const __m256 vs = _mm256_set1_ps(s), vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
    const __m256 vbias = _mm256_set1_ps((float)bias);
    for (; j + 8 <= a->k; j += 8) {
        __m256 v = _mm256_div_ps(_mm256_loadu_ps(src + j), vs);
        v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm256_add_ps(_mm256_min_ps(_mm256_max_ps(v, vlo), vhi), vbias);
        const __m256i i32 = _mm256_cvtps_epi32(v); /* -8..15: exact, and no pack saturates */
        const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
        _mm_storel_epi64((__m128i *)(dst + j), _mm_packs_epi16(i16, i16));
    }
#endif
    for (; j < a->k; j++) {
        float v = nearbyintf(src[j] / s);
        v = v < lo ? lo : (v > hi ? hi : v);
        dst[j] = (uint8_t)(int8_t)(int)(v + (float)bias);
    }
    for (; j < width; j++) dst[j] = (uint8_t)bias;
}

static void quant_int4_blocks(const pool_job *job, int phase, int64_t begin, int64_t end, int participant) {
    (void)phase;
    const quant_int4_args *a = (const quant_int4_args *)job->args;
    const int64_t kp = 4 * a->kq;
    uint8_t *rows = a->rows + (int64_t)participant * NBLOCK * kp;
    for (int64_t b = begin; b < end; b++) {
        for (int r = 0; r < NBLOCK; r++) quant_int4_row(a, b * NBLOCK + r, rows + r * kp, 8, kp);
        uint8_t *dst = a->out + b * a->kq * LINE;
        for (int64_t q = 0; q < a->kq; q++) {
            for (int lane = 0; lane < 16; lane++) {
                uint32_t lo, hi; /* four biased nibbles (one per byte) of channels lane, 16 + lane */
                memcpy(&lo, rows + lane * kp + 4 * q, 4);
                memcpy(&hi, rows + (16 + lane) * kp + 4 * q, 4);
                const uint32_t packed = lo | (hi << 4); /* bytes <= 15: no carry between bytes */
                memcpy(dst + q * LINE + 4 * lane, &packed, 4);
            }
        }
    }
}

/* Quantize fp32 w [n, k] per channel under scale [n] (qmax <= 7) into out
 * (w4a8_layout_bytes(n, k) bytes). */
int w4a8_quant_int4_layout(const float *w, int64_t n, int64_t k, const float *scale, int qmax, uint8_t *out,
                           int nthreads) {
    nthreads = nthreads < 1 ? 1 : (nthreads > MAX_THREADS ? MAX_THREADS : nthreads);
    const int64_t kq = round_up(k, 4) / 4;
    uint8_t *rows = (uint8_t *)malloc((size_t)(nthreads * NBLOCK * 4 * kq) + 1);
    if (!rows) return W4A8_ERR_NO_MEMORY;
    quant_int4_args args = {w, scale, n, k, kq, (float)qmax, out, rows};
    pool_job job = {.nphases = 1, .run = quant_int4_blocks, .args = &args};
    job.total[0] = round_up(n, NBLOCK) / NBLOCK;
    job.chunk[0] = chunk_for(job.total[0], nthreads, 4);
    pool_submit(&job, nthreads);
    free(rows);
    return W4A8_OK;
}

typedef struct {
    const quant_int4_args *each; /* one per scale vector: its scales and its output */
    int64_t count;
} quant_int4_many_args;

static void quant_int4_plain_rows(const pool_job *job, int phase, int64_t begin, int64_t end, int participant) {
    (void)phase;
    (void)participant;
    const quant_int4_many_args *m = (const quant_int4_many_args *)job->args;
    /* Row by row, every scale vector: the fp32 row is read from memory once, then from cache. */
    for (int64_t c = begin; c < end; c++)
        for (int64_t g = 0; g < m->count; g++) {
            const quant_int4_args *a = &m->each[g];
            quant_int4_row(a, c, a->out + c * a->k, 0, a->k);
        }
}

/* The values of w4a8_quant_int4_layout as row-major int8 [n, k] matrices (the operands of a
 * plain int8 GEMM such as torch._int_mm), one per scale vector: scales [count, n], outs[g]
 * [n, k]; the same quantization, element for element. */
int w4a8_quant_int4_rows(const float *w, int64_t n, int64_t k, const float *scales, int64_t count, int qmax,
                         int8_t *const *outs, int nthreads) {
    if (count < 1) return W4A8_OK;
    quant_int4_args *each = (quant_int4_args *)malloc((size_t)count * sizeof(quant_int4_args));
    if (!each) return W4A8_ERR_NO_MEMORY;
    for (int64_t g = 0; g < count; g++)
        each[g] = (quant_int4_args){w, scales + g * n, n, k, round_up(k, 4) / 4, (float)qmax, (uint8_t *)outs[g], NULL};
    quant_int4_many_args args = {each, count};
    pool_job job = {.nphases = 1, .run = quant_int4_plain_rows, .args = &args};
    job.total[0] = n;
    job.chunk[0] = chunk_for(n, nthreads, 8);
    pool_submit(&job, nthreads);
    free(each);
    return W4A8_OK;
}

/* ---- the clip search's errors: scaled int32 products against a float64 reference ---- */

/* out[m, n] = d * d with d = (double)y - ref[m, n] and y = (float(acc[m, n]) * xs[m]) * ws[n]
 * in fp32 (rounded to bf16 first when round_bf16): torch's
 * ((scale_int32(acc, xs, ws, dtype).double() - ref) ** 2) element for element, in one pass
 * instead of six; the caller sums it with torch, in torch's order. */
typedef struct {
    const int32_t *acc;
    const float *xs, *ws;
    const double *ref;
    int64_t n;
    int round_bf16;
    double *out;
} sq_err_args;

static void sq_err_rows(const pool_job *job, int phase, int64_t begin, int64_t end, int participant) {
    (void)phase; (void)participant;
    const sq_err_args *a = (const sq_err_args *)job->args;
    for (int64_t r = begin; r < end; r++) {
        const float xs = a->xs[r];
        const int32_t *acc = a->acc + r * a->n;
        const double *ref = a->ref + r * a->n;
        double *out = a->out + r * a->n;
        for (int64_t c = 0; c < a->n; c++) {
            float y = (float)acc[c] * xs;
            y = y * a->ws[c];
            if (a->round_bf16) y = bf16_to_f32(f32_to_bf16(y));
            const double d = (double)y - ref[c];
            out[c] = d * d;
        }
    }
}

void w4a8_scaled_sq_err(const int32_t *acc, int64_t m, int64_t n, const float *xs, const float *ws,
                        const double *ref, int round_bf16, double *out, int nthreads) {
    sq_err_args args = {acc, xs, ws, ref, n, round_bf16, out};
    pool_job job = {.nphases = 1, .run = sq_err_rows, .args = &args};
    job.total[0] = m;
    job.chunk[0] = chunk_for(m, nthreads, 4);
    if (m > 0 && n > 0) pool_submit(&job, (m * n < (1 << 15)) ? 1 : nthreads);
}

/* ---- the clip search's alpha refinement: the straight-through clip-quant and its gradient ---- */

/* For the Gram form of the alpha refinement (calibrate/clips.py), whose every step after the
 * first needs d loss / d alpha through the straight-through fake quantization of h [m, n]
 * (per row r: bound b = bound[r] >= 0, step s = step[r] > 0, both computed by torch):
 *   mx = maximum(h, -b); c = minimum(mx, b); z = c / s; a = z + (round(z) - z); q = a * s.
 * The backward pass gets g = d loss / d q and writes the four [m, n] terms that autograd's
 * backward functions reduce to [m, 1] (the caller sums them with torch, in torch's order):
 *   MulBackward0 (q = a * s):       ga = g * s;          t_mul = g * a
 *   DivBackward0 (z = c / s):       gc = ga / s;         t_div = -ga * ((c / s) / s)
 *   MinimumBackward0, other (b):    t_min = where(mx == b, gc / 2, gc).masked_fill(mx < b, 0)
 *   MaximumBackward0, other (-b):   gm = where(mx == b, gc / 2, gc).masked_fill(mx > b, 0);
 *                                   t_max = where(h == -b, gm / 2, gm).masked_fill(h > -b, 0)
 * Each is the IEEE single operation torch runs, in torch's order, so the bits are autograd's.
 * For finite h only (the caller checks max |h|): torch's maximum and minimum propagate NaN,
 * and return either zero on a tie of +0 and -0; neither can change a gradient bit here (a
 * zero's sign only enters through z where b = 0, whose terms torch's where discards).
 * AVX-512 or AVX2 lanes, the scalar code for row tails. */
typedef struct {
    const float *h, *g, *bound, *step;
    int64_t n;
    float *q, *t_mul, *t_div, *t_min, *t_max;
} ste_args;

/* One element of each pass, the scalar code (row tails; the vector code below is the same
 * operations lane by lane). */
static inline float ste_q(float x, float b, float nb, float s) {
    const float mx = x > nb ? x : nb;
    const float c = mx < b ? mx : b;
    const float z = c / s;
    return (z + (rintf(z) - z)) * s;
}

static inline void ste_terms(float x, float gq, float b, float nb, float s, float *t_mul, float *t_div, float *t_min,
                             float *t_max) {
    const float mx = x > nb ? x : nb;
    const float c = mx < b ? mx : b;
    const float z = c / s;
    const float ga = gq * s;
    *t_mul = gq * (z + (rintf(z) - z));
    *t_div = -ga * (z / s);
    const float gc = ga / s;
    const float w = mx == b ? gc / 2.0f : gc;
    *t_min = mx < b ? 0.0f : w;
    const float gm = mx > b ? 0.0f : w;
    const float wm = x == nb ? gm / 2.0f : gm;
    *t_max = x > nb ? 0.0f : wm;
}

static void ste_forward_rows(const pool_job *job, int phase, int64_t begin, int64_t end, int participant) {
    (void)phase; (void)participant;
    const ste_args *a = (const ste_args *)job->args;
    const int64_t n = a->n;
    for (int64_t r = begin; r < end; r++) {
        const float b = a->bound[r], nb = -b, s = a->step[r];
        const float *h = a->h + r * n;
        float *q = a->q + r * n;
        int64_t j = 0;
#if W4A8_ISA == 3
        const __m512 vb = _mm512_set1_ps(b), vnb = _mm512_set1_ps(nb), vs = _mm512_set1_ps(s);
        for (; j + 16 <= n; j += 16) {
            const __m512 x = _mm512_loadu_ps(h + j);
            const __m512 mx = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, vnb, _CMP_GT_OQ), vnb, x);
            const __m512 c = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(mx, vb, _CMP_LT_OQ), vb, mx);
            const __m512 z = _mm512_div_ps(c, vs);
            const __m512 rz = _mm512_roundscale_ps(z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm512_storeu_ps(q + j, _mm512_mul_ps(_mm512_add_ps(z, _mm512_sub_ps(rz, z)), vs));
        }
#elif W4A8_ISA >= 1
        const __m256 vb = _mm256_set1_ps(b), vnb = _mm256_set1_ps(nb), vs = _mm256_set1_ps(s);
        for (; j + 8 <= n; j += 8) {
            const __m256 x = _mm256_loadu_ps(h + j);
            const __m256 mx = _mm256_blendv_ps(vnb, x, _mm256_cmp_ps(x, vnb, _CMP_GT_OQ));
            const __m256 c = _mm256_blendv_ps(vb, mx, _mm256_cmp_ps(mx, vb, _CMP_LT_OQ));
            const __m256 z = _mm256_div_ps(c, vs);
            const __m256 rz = _mm256_round_ps(z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm256_storeu_ps(q + j, _mm256_mul_ps(_mm256_add_ps(z, _mm256_sub_ps(rz, z)), vs));
        }
#endif
        for (; j < n; j++) q[j] = ste_q(h[j], b, nb, s);
    }
}

static void ste_backward_rows(const pool_job *job, int phase, int64_t begin, int64_t end, int participant) {
    (void)phase; (void)participant;
    const ste_args *a = (const ste_args *)job->args;
    const int64_t n = a->n;
    for (int64_t r = begin; r < end; r++) {
        const float b = a->bound[r], nb = -b, s = a->step[r];
        const float *h = a->h + r * n, *g = a->g + r * n;
        float *t_mul = a->t_mul + r * n, *t_div = a->t_div + r * n;
        float *t_min = a->t_min + r * n, *t_max = a->t_max + r * n;
        int64_t j = 0;
#if W4A8_ISA == 3
        const __m512 vb = _mm512_set1_ps(b), vnb = _mm512_set1_ps(nb), vs = _mm512_set1_ps(s);
        const __m512 two = _mm512_set1_ps(2.0f), zero = _mm512_setzero_ps(), sign = _mm512_set1_ps(-0.0f);
        for (; j + 16 <= n; j += 16) {
            const __m512 x = _mm512_loadu_ps(h + j), gq = _mm512_loadu_ps(g + j);
            const __mmask16 x_gt_nb = _mm512_cmp_ps_mask(x, vnb, _CMP_GT_OQ);
            const __m512 mx = _mm512_mask_blend_ps(x_gt_nb, vnb, x);
            const __mmask16 mx_lt_b = _mm512_cmp_ps_mask(mx, vb, _CMP_LT_OQ);
            const __m512 c = _mm512_mask_blend_ps(mx_lt_b, vb, mx);
            const __m512 z = _mm512_div_ps(c, vs);
            const __m512 rz = _mm512_roundscale_ps(z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m512 ga = _mm512_mul_ps(gq, vs);
            _mm512_storeu_ps(t_mul + j, _mm512_mul_ps(gq, _mm512_add_ps(z, _mm512_sub_ps(rz, z))));
            _mm512_storeu_ps(t_div + j, _mm512_mul_ps(_mm512_xor_ps(ga, sign), _mm512_div_ps(z, vs)));
            const __m512 gc = _mm512_div_ps(ga, vs);
            const __m512 w = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(mx, vb, _CMP_EQ_OQ), gc, _mm512_div_ps(gc, two));
            _mm512_storeu_ps(t_min + j, _mm512_mask_blend_ps(mx_lt_b, w, zero));
            const __m512 gm = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(mx, vb, _CMP_GT_OQ), w, zero);
            const __m512 wm = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, vnb, _CMP_EQ_OQ), gm, _mm512_div_ps(gm, two));
            _mm512_storeu_ps(t_max + j, _mm512_mask_blend_ps(x_gt_nb, wm, zero));
        }
#elif W4A8_ISA >= 1
        const __m256 vb = _mm256_set1_ps(b), vnb = _mm256_set1_ps(nb), vs = _mm256_set1_ps(s);
        const __m256 two = _mm256_set1_ps(2.0f), zero = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
        for (; j + 8 <= n; j += 8) {
            const __m256 x = _mm256_loadu_ps(h + j), gq = _mm256_loadu_ps(g + j);
            const __m256 x_gt_nb = _mm256_cmp_ps(x, vnb, _CMP_GT_OQ);
            const __m256 mx = _mm256_blendv_ps(vnb, x, x_gt_nb);
            const __m256 mx_lt_b = _mm256_cmp_ps(mx, vb, _CMP_LT_OQ);
            const __m256 c = _mm256_blendv_ps(vb, mx, mx_lt_b);
            const __m256 z = _mm256_div_ps(c, vs);
            const __m256 rz = _mm256_round_ps(z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m256 ga = _mm256_mul_ps(gq, vs);
            _mm256_storeu_ps(t_mul + j, _mm256_mul_ps(gq, _mm256_add_ps(z, _mm256_sub_ps(rz, z))));
            _mm256_storeu_ps(t_div + j, _mm256_mul_ps(_mm256_xor_ps(ga, sign), _mm256_div_ps(z, vs)));
            const __m256 gc = _mm256_div_ps(ga, vs);
            const __m256 w = _mm256_blendv_ps(gc, _mm256_div_ps(gc, two), _mm256_cmp_ps(mx, vb, _CMP_EQ_OQ));
            _mm256_storeu_ps(t_min + j, _mm256_blendv_ps(w, zero, mx_lt_b));
            const __m256 gm = _mm256_blendv_ps(w, zero, _mm256_cmp_ps(mx, vb, _CMP_GT_OQ));
            const __m256 wm = _mm256_blendv_ps(gm, _mm256_div_ps(gm, two), _mm256_cmp_ps(x, vnb, _CMP_EQ_OQ));
            _mm256_storeu_ps(t_max + j, _mm256_blendv_ps(wm, zero, x_gt_nb));
        }
#endif
        for (; j < n; j++) ste_terms(h[j], g[j], b, nb, s, t_mul + j, t_div + j, t_min + j, t_max + j);
    }
}

static void ste_submit(phase_fn run, const ste_args *args, int64_t m, int nthreads) {
    pool_job job = {.nphases = 1, .run = run, .args = args};
    job.total[0] = m;
    job.chunk[0] = chunk_for(m, nthreads, 4);
    /* Below torch's grain size one thread: waking the team costs more than the rows. */
    if (m > 0 && args->n > 0) pool_submit(&job, (m * args->n < (1 << 15)) ? 1 : nthreads);
}

/* q [m, n] of the straight-through clip-quant (see above); bound, step [m]. */
void w4a8_ste_clip_quant(const float *h, int64_t m, int64_t n, const float *bound, const float *step, float *q,
                         int nthreads) {
    ste_args args = {h, NULL, bound, step, n, q, NULL, NULL, NULL, NULL};
    ste_submit(ste_forward_rows, &args, m, nthreads);
}

/* The four [m, n] gradient terms of the straight-through clip-quant at g = d loss / d q. */
void w4a8_ste_clip_quant_backward(const float *h, const float *g, int64_t m, int64_t n, const float *bound,
                                  const float *step, float *t_mul, float *t_div, float *t_min, float *t_max,
                                  int nthreads) {
    ste_args args = {h, g, bound, step, n, NULL, t_mul, t_div, t_min, t_max};
    ste_submit(ste_backward_rows, &args, m, nthreads);
}

/* ---- the clip search's channel maxima: max |w| per row, non-finite flagged ---- */

/* out[r] = max_j |w[r, j]| of fp32 w [n, k] (exact: a max rounds nothing), from the bit
 * patterns without the sign, which order like |w|, with inf and every NaN above all finite
 * values; returns 1 when some row holds inf or NaN (its out is then not a magnitude), else 0.
 * A zero row gives +0 (torch's maximum(-aminmax.min, aminmax.max) may give -0 there; the
 * clip search's scales map both to 1). */
typedef struct {
    const float *w;
    int64_t k;
    float *out;
    _Atomic int nonfinite;
} absmax_args;

static void absmax_rows(const pool_job *job, int phase, int64_t begin, int64_t end, int participant) {
    (void)phase; (void)participant;
    absmax_args *a = (absmax_args *)job->args;
    for (int64_t r = begin; r < end; r++) {
        const uint32_t *row = (const uint32_t *)(a->w + r * a->k);
        uint32_t max_bits = 0;
        int64_t j = 0;
#if W4A8_ISA == 3
        const __m512i mask = _mm512_set1_epi32(0x7FFFFFFF);
        __m512i m0 = _mm512_setzero_si512(), m1 = _mm512_setzero_si512();
        for (; j + 32 <= a->k; j += 32) {
            m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_loadu_si512((const void *)(row + j)), mask));
            m1 = _mm512_max_epu32(m1, _mm512_and_si512(_mm512_loadu_si512((const void *)(row + j + 16)), mask));
        }
        max_bits = _mm512_reduce_max_epu32(_mm512_max_epu32(m0, m1));
#elif W4A8_ISA >= 1
        const __m256i mask = _mm256_set1_epi32(0x7FFFFFFF);
        __m256i m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
        for (; j + 16 <= a->k; j += 16) {
            m0 = _mm256_max_epu32(m0, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(row + j)), mask));
            m1 = _mm256_max_epu32(m1, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(row + j + 8)), mask));
        }
        uint32_t lanes[8];
        _mm256_storeu_si256((__m256i *)lanes, _mm256_max_epu32(m0, m1));
        for (int l = 0; l < 8; l++) max_bits = lanes[l] > max_bits ? lanes[l] : max_bits;
#endif
        for (; j < a->k; j++) {
            const uint32_t b = row[j] & 0x7FFFFFFFu;
            max_bits = b > max_bits ? b : max_bits;
        }
        if (max_bits >= 0x7F800000u) atomic_store(&a->nonfinite, 1);
        memcpy(a->out + r, &max_bits, 4);
    }
}

int w4a8_row_absmax(const float *w, int64_t n, int64_t k, float *out, int nthreads) {
    absmax_args args = {w, k, out, 0};
    pool_job job = {.nphases = 1, .run = absmax_rows, .args = &args};
    job.total[0] = n;
    job.chunk[0] = chunk_for(n, nthreads, 4);
    if (n > 0) pool_submit(&job, (n * k < (1 << 15)) ? 1 : nthreads);
    return atomic_load(&args.nonfinite);
}
