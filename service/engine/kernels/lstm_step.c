/* The LSTM step and the character draw for batches of rows (see lstm_step.h for the layouts,
   service/engine/lstm_kernel.py for why and how it is built and loaded).

   Numerics: float32, like the model; sums run in another order than MKL's and exp is a polynomial
   (Cephes expf, ~1 ulp), so results equal the PyTorch step's to float rounding, not bit for bit.
   Float16 weights are converted exactly and the arithmetic stays float32. The bfloat16 build may
   instead multiply the recurrent layers in bfloat16 (Net.bpanels): weights and h rounded to bfloat16,
   pairs of products summed into float32. In every build and arithmetic, each element of a product is
   one fold over k, the same whichever rows share the batch and whichever thread computes it. */
#ifdef __linux__
#define _GNU_SOURCE /* pthread_setname_np */
#endif
#include "lstm_step.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <sched.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#if defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512F__)
#define CHARRNN_BF16 1
#else
#define CHARRNN_BF16 0
#endif
/* The AMX build: the bfloat16 products by tiles (_tile_dpbf16ps) instead of vdpbf16ps, and the int8 products
   of 8 rows or more by tiles (_tile_dpbusd) instead of vpdpbusd. Compiled with -mamx-tile -mamx-bf16
   -mamx-int8 on top of the bfloat16 build's flags; everything else is that build's code.
   -DCHARRNN_AMX_EMULATE (tests only) runs the same tile code on any AVX512-BF16 CPU, with the tile
   instructions done in C (below): it checks the layouts and loops, not the hardware. */
#if CHARRNN_BF16 && defined(__linux__) && \
    ((defined(__AMX_TILE__) && defined(__AMX_BF16__)) || defined(CHARRNN_AMX_EMULATE))
#define CHARRNN_AMX 1
#include <sys/syscall.h>
#else
#define CHARRNN_AMX 0
#endif

int charrnn_has_bf16(void) { return CHARRNN_BF16; }

const char *charrnn_build(void) {
#if defined(CHARRNN_AMX_EMULATE) && CHARRNN_AMX
    return "amx-emulated";
#elif CHARRNN_AMX
    return "amx";
#elif CHARRNN_BF16
    return "bf16";
#elif defined(__F16C__) && defined(__FMA__)
    return "avx2";
#else
    return "portable";
#endif
}

/* What a build needs from the operating system before its first step: for AMX, Linux's permission to use
   the tile state (without it the first tile instruction is SIGILL). The permission is the process's and
   is inherited by threads and forked children. 1: ready; 0: refused (the loader then skips this build). */
int charrnn_init(void) {
#if CHARRNN_AMX && !defined(CHARRNN_AMX_EMULATE)
    const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
    return 1;
#endif
}

int charrnn_max_layers(void) { return CHARRNN_MAX_LAYERS; }
size_t charrnn_net_size(void) { return sizeof(Net); }

/* Cephes expf: range reduction by ln 2, a degree-6 polynomial; branch-free so loops vectorize. */
static inline float exp_(float x) {
    x = fminf(fmaxf(x, -87.3f), 88.7f);
    float fx = floorf(x * 1.44269504088896341f + 0.5f);
    x -= fx * 0.693359375f;
    x -= fx * -2.12194440e-4f;
    float z = x * x;
    float y = ((((1.9875691500e-4f * x + 1.3981999507e-3f) * x + 8.3334519073e-3f) * x + 4.1665795894e-2f) * x
               + 1.6666665459e-1f) * x + 5.0000001201e-1f;
    y = y * z + x + 1.0f;
    const int32_t bits = ((int32_t)fx + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale); /* 2^fx; a copy, not a union, which kept GCC from vectorizing */
    return y * scale;
}

static inline float sigmoid_(float x) { return 1.0f / (1.0f + exp_(-x)); }
static inline float tanh_(float x) { return 2.0f / (1.0f + exp_(-2.0f * x)) - 1.0f; }

static inline float half_to_float(uint16_t h) {
#if defined(__F16C__) && defined(__FMA__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, bits;
    if (e == 0x1f) bits = sign | 0x7f800000u | (m << 13);      /* inf, nan */
    else if (e) bits = sign | ((e + 112) << 23) | (m << 13);   /* normal */
    else if (!m) bits = sign;                                  /* zero */
    else {                                                     /* subnormal: normalise */
        e = 113;
        while (!(m & 0x400)) { m <<= 1; e--; }
        bits = sign | (e << 23) | ((m & 0x3ff) << 13);
    }
    union { uint32_t u; float f; } v = { bits };
    return v.f;
#endif
}

float charrnn_half_to_float(uint16_t h) { return half_to_float(h); }

#if defined(__F16C__) && defined(__FMA__)
/* Eight weights as float32, from float16 bits (half) or from float32. */
static inline __attribute__((always_inline)) __m256 load8(const void *W, size_t at, int half) {
    if (half) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)W + at)));
    return _mm256_loadu_ps((const float *)W + at);
}

/* Every element of y += x @ W below is the same fold, whichever loop computes it:
       acc = y[r][c];  for k = 0 .. K-1: acc = fma(x[r][k], W[k][c], acc)
   (one rounding per step, k ascending). So a row's result does not depend on how many rows share the
   batch or where it sits in it: a seed gives the same text whatever else is being generated. */

/* Rows 0 .. 3 of x and y, columns j .. j + 15: the 4 x 16 block in eight registers over all of K, each
   weight loaded once for four rows, eight independent FMA chains. */
static inline __attribute__((always_inline)) void block4x16(int K, int N, const float *x, int ldx, const void *W,
                                                            const void *panels, int half, float *y, int j) {
    float *y0 = y + j, *y1 = y0 + N, *y2 = y1 + N, *y3 = y2 + N;
    const float *x0 = x, *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
    __m256 a00 = _mm256_loadu_ps(y0), a01 = _mm256_loadu_ps(y0 + 8), a10 = _mm256_loadu_ps(y1);
    __m256 a11 = _mm256_loadu_ps(y1 + 8), a20 = _mm256_loadu_ps(y2), a21 = _mm256_loadu_ps(y2 + 8);
    __m256 a30 = _mm256_loadu_ps(y3), a31 = _mm256_loadu_ps(y3 + 8);
    /* where the weights of (k, j .. j + 15) are, and how far the next k's are */
    const void *from = panels ? panels : W;
    const size_t first = panels ? (size_t)j * K : (size_t)j, stride = panels ? 16 : (size_t)N;
    for (int k = 0; k < K; k++) {
        const size_t at = first + (size_t)k * stride;
        const __m256 w0 = load8(from, at, half), w1 = load8(from, at + 8, half);
        __m256 b = _mm256_broadcast_ss(x0 + k);
        a00 = _mm256_fmadd_ps(b, w0, a00);
        a01 = _mm256_fmadd_ps(b, w1, a01);
        b = _mm256_broadcast_ss(x1 + k);
        a10 = _mm256_fmadd_ps(b, w0, a10);
        a11 = _mm256_fmadd_ps(b, w1, a11);
        b = _mm256_broadcast_ss(x2 + k);
        a20 = _mm256_fmadd_ps(b, w0, a20);
        a21 = _mm256_fmadd_ps(b, w1, a21);
        b = _mm256_broadcast_ss(x3 + k);
        a30 = _mm256_fmadd_ps(b, w0, a30);
        a31 = _mm256_fmadd_ps(b, w1, a31);
    }
    _mm256_storeu_ps(y0, a00), _mm256_storeu_ps(y0 + 8, a01), _mm256_storeu_ps(y1, a10);
    _mm256_storeu_ps(y1 + 8, a11), _mm256_storeu_ps(y2, a20), _mm256_storeu_ps(y2 + 8, a21);
    _mm256_storeu_ps(y3, a30), _mm256_storeu_ps(y3 + 8, a31);
}

/* Rows of y += x @ W streamed: W read row after row (sequentially: one stream alone is bound by
   reading W), each 8-column slice of four W rows loaded once and folded into every row of y in turn. */
static inline __attribute__((always_inline)) void rows_stream(int n, int K, int N, const float *x, int ldx,
                                                              const void *W, int half, float *y) {
    int k = 0;
    for (; k < K; k += 4) {
        const int steps = K - k < 4 ? K - k : 4;
        int j = 0;
        if (steps == 4) {
            for (; j + 8 <= N; j += 8) {
                const size_t at = (size_t)k * N + j;
                const __m256 v0 = load8(W, at, half), v1 = load8(W, at + N, half);
                const __m256 v2 = load8(W, at + 2 * (size_t)N, half), v3 = load8(W, at + 3 * (size_t)N, half);
                for (int r = 0; r < n; r++) {
                    const float *xr = x + (size_t)r * ldx + k;
                    float *yr = y + (size_t)r * N + j;
                    __m256 acc = _mm256_loadu_ps(yr);
                    acc = _mm256_fmadd_ps(_mm256_broadcast_ss(xr), v0, acc);
                    acc = _mm256_fmadd_ps(_mm256_broadcast_ss(xr + 1), v1, acc);
                    acc = _mm256_fmadd_ps(_mm256_broadcast_ss(xr + 2), v2, acc);
                    acc = _mm256_fmadd_ps(_mm256_broadcast_ss(xr + 3), v3, acc);
                    _mm256_storeu_ps(yr, acc);
                }
            }
        }
        for (; j < N; j++)  /* the last columns, and every column of the last k < 4 steps */
            for (int r = 0; r < n; r++) {
                float acc = y[(size_t)r * N + j];
                for (int i = 0; i < steps; i++) {
                    const size_t at = (size_t)(k + i) * N + j;
                    const float w = half ? half_to_float(((const uint16_t *)W)[at]) : ((const float *)W)[at];
                    acc = fmaf(x[(size_t)r * ldx + k + i], w, acc);
                }
                y[(size_t)r * N + j] = acc;
            }
    }
}

/* rows_stream for float16 and for float32 weights, each its own function: inlined into the blocked loop
   it lost registers to it, and one stream ran ~12 % slower. */
static __attribute__((noinline)) void stream_h(int n, int K, int N, const float *x, int ldx, const void *W, float *y) {
    rows_stream(n, K, N, x, ldx, W, 1, y);
}

static __attribute__((noinline)) void stream_f(int n, int K, int N, const float *x, int ldx, const void *W, float *y) {
    rows_stream(n, K, N, x, ldx, W, 0, y);
}

/* Four rows (x and y at row strides ldx and N), columns from .. N - 1 (the head's 65th), one at a time:
   the same fold by fmaf, the four rows' chains interleaved. One row's chain of K dependent fmaf waits on
   each one's latency (one row at a time, this column cost as much as the 64 before it in 4 x 16 blocks);
   four independent chains keep the FMA units busy. */
static inline void tail_columns4(int K, int N, const float *x, int ldx, const void *W, int half, float *y, int from) {
    const float *x0 = x, *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
    for (int c = from; c < N; c++) {
        float a0 = y[c], a1 = y[N + c], a2 = y[2 * (size_t)N + c], a3 = y[3 * (size_t)N + c];
        for (int k = 0; k < K; k++) {
            const size_t at = (size_t)k * N + c;
            const float w = half ? half_to_float(((const uint16_t *)W)[at]) : ((const float *)W)[at];
            a0 = fmaf(x0[k], w, a0);
            a1 = fmaf(x1[k], w, a1);
            a2 = fmaf(x2[k], w, a2);
            a3 = fmaf(x3[k], w, a3);
        }
        y[c] = a0, y[N + c] = a1, y[2 * (size_t)N + c] = a2, y[3 * (size_t)N + c] = a3;
    }
}

#else
/* y (n, N) += x (n, K; row stride ldx) @ W (K, N): four rows of W per pass, each row of y stays in L1.
   (The portable build, for CPUs without AVX2/FMA/F16C; its sums run in another order than the fold above.) */
static void matmul_batch(int n, int K, int N, const float *x, int ldx, const float *W, const void *panels, float *y) {
    (void)panels;
    int k = 0;
    for (; k + 4 <= K; k += 4) {
        const float *w0 = W + (size_t)k * N, *w1 = w0 + N, *w2 = w1 + N, *w3 = w2 + N;
        for (int r = 0; r < n; r++) {
            const float *xr = x + (size_t)r * ldx + k;
            const float a0 = xr[0], a1 = xr[1], a2 = xr[2], a3 = xr[3];
            float *restrict yr = y + (size_t)r * N;
            for (int j = 0; j < N; j++) yr[j] += a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j];
        }
    }
    for (; k < K; k++) {
        const float *w0 = W + (size_t)k * N;
        for (int r = 0; r < n; r++) {
            const float a0 = x[(size_t)r * ldx + k];
            float *restrict yr = y + (size_t)r * N;
            for (int j = 0; j < N; j++) yr[j] += a0 * w0[j];
        }
    }
}

/* matmul_batch with float16 weights: each weight converted once and used for every row of x. */
static void matmul_batch_h(int n, int K, int N, const float *x, int ldx, const uint16_t *W, const void *panels,
                           float *y) {
    (void)panels;
    int k = 0;
    for (; k + 4 <= K; k += 4) {
        const uint16_t *w0 = W + (size_t)k * N, *w1 = w0 + N, *w2 = w1 + N, *w3 = w2 + N;
        int j = 0;
        for (; j < N; j++) {
            const float a0 = half_to_float(w0[j]), a1 = half_to_float(w1[j]);
            const float a2 = half_to_float(w2[j]), a3 = half_to_float(w3[j]);
            for (int r = 0; r < n; r++) {
                const float *xr = x + (size_t)r * ldx + k;
                y[(size_t)r * N + j] += xr[0] * a0 + xr[1] * a1 + xr[2] * a2 + xr[3] * a3;
            }
        }
    }
    for (; k < K; k++) {
        const uint16_t *w0 = W + (size_t)k * N;
        for (int j = 0; j < N; j++) {
            const float a0 = half_to_float(w0[j]);
            for (int r = 0; r < n; r++) y[(size_t)r * N + j] += x[(size_t)r * ldx + k] * a0;
        }
    }
}

#endif

/* ---- products shared between threads ------------------------------------------------------------ */
#if defined(__F16C__) && defined(__FMA__)
#define CHARRNN_SHARE 1
/* One product y += x @ W cut into units, taken one at a time by whichever thread gets there first (an
   atomic counter), so that a helper the OS has put aside holds up no more than the one unit it has.
   A unit is a block of rows by a block of columns, computed by the same code whichever thread runs it:
   sharing changes nothing in the result. */
typedef struct Shared Shared;
struct Shared {
    void (*unit)(const Shared *, int);
    int units;
    atomic_int next;
    atomic_int attached; /* helpers working on it; changed under pool.lock */
    int n, K, N, ldx, groups, per_group;
    const float *x;
    const void *W, *panels;
    float *y;
    float *h; /* the gates' units (step_gates): x the gates, y the cells, h the new h (row stride ldx) */
    int most; /* helpers that may attach (run_shared sets it: the core board's share) */
};

static void shared_work(Shared *job) {
    for (;;) {
        const int u = atomic_fetch_add_explicit(&job->next, 1, memory_order_relaxed);
        if (u >= job->units) return;
        job->unit(job, u);
    }
}

/* The helper threads: started by charrnn_set_threads, asleep until a product is shared. A caller
   publishes its Shared under the lock and wakes them, works on it itself, then withdraws it and
   waits until no helper is attached, so that a late helper never sees a product that has ended. One
   caller shares at a time (`busy`); another works alone meanwhile. After a fork only the forking thread
   exists: `owner` tells the child that the helpers are not its own, and it works alone. */
static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake, left;
    Shared *job;
    atomic_ulong generation; /* changed under the lock, watched without it by a helper between products */
    atomic_int helpers; /* written under the lock, read without it by run_shared */
    atomic_int owner;   /* the pid whose helpers they are */
    atomic_flag busy;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, 0, 0, 0, ATOMIC_FLAG_INIT};

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}

/* How long a helper that has finished a product watches for the next one before it sleeps, and a caller for
   its helpers to finish theirs. Within a step the next product comes microseconds after the last (a layer's
   gates between), and a thread asleep in a futex takes tens of microseconds to wake (more on a virtual
   machine): as long as a one-row product on an AVX2-only EPYC, which then gained nothing from sharing.
   Between steps (the draw, in Python) a helper watches for at most this long, then sleeps; while it watches
   it yields its core to any thread the OS has waiting for one (a request's: the first character of a stream
   came 12 ms after its request, median, with one client and a helper that only watched; 4-6 ms yielding). */
#define WATCH_NS 100000.0

/* Waits while *value == seen, at most WATCH_NS; whether it changed. */
static int watch(atomic_ulong *value, unsigned long seen) {
    const double until = now_ns() + WATCH_NS;
    while (atomic_load_explicit(value, memory_order_acquire) == seen) {
        for (int i = 0; i < 32; i++) _mm_pause();
        if (now_ns() > until) return 0;
        sched_yield(); /* a thread the OS has waiting for this core (a request's) runs first */
    }
    return 1;
}

/* A helper's name for the OS (top -H, /proc: service/engine/thread_names.py), given by its creator before
   set_threads returns: no one sees a helper under its creator's name (charrnn-engine) for a moment. */
static void name_helper(pthread_t thread) {
#ifdef __linux__
    pthread_setname_np(thread, "charrnn-kernel"); /* fails only for a name over 15 bytes */
#else
    (void)thread;
#endif
}

#define COUNTED_HELPERS 64
static atomic_long helper_products[COUNTED_HELPERS]; /* products each helper took part in (the tests') */

/* Helper `index` (0, 1, ...) takes part in a product only if index < its `most` (the core board's share), and
   one left out sleeps until the next product instead of watching: it would only take a core from the other
   workers' threads. */
static void *helper_main(void *arg) {
    const int index = (int)(intptr_t)arg;
    unsigned long seen = 0;
    int left_out = 0;
    for (;;) {
        if (!left_out) watch(&pool.generation, seen);
        pthread_mutex_lock(&pool.lock);
        while (atomic_load_explicit(&pool.generation, memory_order_relaxed) == seen)
            pthread_cond_wait(&pool.wake, &pool.lock);
        seen = atomic_load_explicit(&pool.generation, memory_order_relaxed);
        Shared *job = pool.job;
        left_out = job && index >= job->most;
        if (left_out) job = NULL;
        if (job) {
            atomic_fetch_add_explicit(&job->attached, 1, memory_order_relaxed);
            if (index < COUNTED_HELPERS) atomic_fetch_add_explicit(&helper_products[index], 1, memory_order_relaxed);
        }
        pthread_mutex_unlock(&pool.lock);
        if (!job) continue;
        shared_work(job);
        pthread_mutex_lock(&pool.lock);
        if (atomic_fetch_sub_explicit(&job->attached, 1, memory_order_release) == 1) pthread_cond_signal(&pool.left);
        pthread_mutex_unlock(&pool.lock);
    }
    return NULL;
}

static void pool_after_fork(void);
static void small_after_fork(void);
static void register_fork_handler(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

/* In a forked child: no helpers, and the lock and conditions new (a helper may have held the lock at the fork). */
static void pool_after_fork(void) {
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.left, NULL);
    pool.job = NULL;
    atomic_store_explicit(&pool.helpers, 0, memory_order_relaxed);
    atomic_flag_clear(&pool.busy);
    small_after_fork();
}

static int set_threads(int threads) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, register_fork_handler);
    pthread_mutex_lock(&pool.lock);
    if (atomic_load_explicit(&pool.owner, memory_order_relaxed) != getpid()) { /* a forked child starts afresh */
        atomic_store_explicit(&pool.helpers, 0, memory_order_relaxed);
        atomic_store_explicit(&pool.owner, getpid(), memory_order_relaxed);
    }
    int helpers = atomic_load_explicit(&pool.helpers, memory_order_relaxed);
    while (helpers < threads - 1) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&thread, &attr, helper_main, (void *)(intptr_t)helpers);
        pthread_attr_destroy(&attr);
        if (failed) break;
        name_helper(thread);
        atomic_store_explicit(&pool.helpers, ++helpers, memory_order_relaxed);
    }
    const int total = helpers + 1;
    pthread_mutex_unlock(&pool.lock);
    return total;
}

/* Products of fewer than SHARE_ROWS rows: sharing them pays where one row's product is long (an AVX2-only
   AMD EPYC, whose L2 holds none of the default model's weights: a one-row int8 step 0.29-0.31 -> 0.21 ms)
   and not where it is shorter than waking the helpers. So it is measured: such products of at least
   SMALL_WORK multiply-adds are timed, SMALL_RUN products in a row alone, then SMALL_RUN shared, and so on
   until SMALL_TRIALS have been timed; then the way whose best times per shape (rows x K x N), summed over
   the shapes timed both ways, are the least is taken, and timed again after every SMALL_RETRIAL such
   products (a forked child measures anew): a trial that ran while the OS held the helpers back (a process
   starting beside others) chose alone, and one stream then ran at the speed of one core (6,543 characters/s
   against 8,100-10,900 shared, on an Intel Xeon with AMX) for the life of the process. Runs rather than turns: the products of one step (a layer's, then the next's) are timed the same
   way, so that a shared one finds the helpers as awake as it would every step (a step alternating between
   the ways would find them asleep). Both ways compute every element alike: the same bits. */
#define SMALL_WORK (1 << 20)
#define SMALL_TRIALS 128
#define SMALL_RUN 16
#define SMALL_SHAPES 16
#define SMALL_RETRIAL (1L << 15) /* ~1.6 s of one stream's products; a trial (128 of them, half the slower way)
                                    costs ~0.1 % of that (2^18, ~13 s, kept a spoiled trial past a 5 s bench run) */
static atomic_long small_retrial = SMALL_RETRIAL; /* charrnn_set_small_retrial: the tests' */
typedef struct {
    int n, K, N;
    double best[2]; /* the least ns of one product: alone, shared */
} SmallShape;
static struct {
    pthread_mutex_t lock;
    int shapes, started, timed, trials; /* trials: decided since the process started */
    SmallShape shape[SMALL_SHAPES];
    atomic_int choice; /* -1 until decided, then 0 (alone) or 1 (shared): the way taken between trials */
    atomic_int trial;  /* 1 while products are timed */
    atomic_long since; /* products taken the chosen way since the last trial */
} small = {PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, 0, {{0}}, -1, 1, 0};

/* The shape's entry (made on first sight; NULL when the table is full: that product is not timed). */
static SmallShape *small_shape(int n, int K, int N) {
    for (int i = 0; i < small.shapes; i++)
        if (small.shape[i].n == n && small.shape[i].K == K && small.shape[i].N == N) return &small.shape[i];
    if (small.shapes == SMALL_SHAPES) return NULL;
    SmallShape *entry = &small.shape[small.shapes++];
    *entry = (SmallShape){n, K, N, {1e30, 1e30}};
    return entry;
}

/* The way to time this product (0 alone, 1 shared), or -1: not timed. */
static int small_trial_way(int n, int K, int N) {
    pthread_mutex_lock(&small.lock);
    SmallShape *entry = small_shape(n, K, N);
    const int way = entry ? small.started++ / SMALL_RUN % 2 : -1;
    pthread_mutex_unlock(&small.lock);
    return way;
}

static void small_timed(int n, int K, int N, int way, double ns) {
    pthread_mutex_lock(&small.lock);
    SmallShape *entry = small_shape(n, K, N);
    if (entry && ns < entry->best[way]) entry->best[way] = ns;
    double total[2] = {0.0, 0.0};
    int both = 0;
    for (int i = 0; i < small.shapes; i++)
        if (small.shape[i].best[0] < 1e30 && small.shape[i].best[1] < 1e30) {
            total[0] += small.shape[i].best[0], total[1] += small.shape[i].best[1];
            both++;
        }
    if (atomic_load_explicit(&small.trial, memory_order_relaxed) && ++small.timed >= SMALL_TRIALS && both) {
        atomic_store_explicit(&small.choice, total[1] < total[0], memory_order_relaxed);
        atomic_store_explicit(&small.since, 0, memory_order_relaxed);
        atomic_store_explicit(&small.trial, 0, memory_order_relaxed);
        small.trials++;
    }
    pthread_mutex_unlock(&small.lock);
}

/* The way to take a product outside trials (the choice), starting a new trial once SMALL_RETRIAL have been. */
static int small_chosen_way(void) {
    if (atomic_fetch_add_explicit(&small.since, 1, memory_order_relaxed) + 1
        >= atomic_load_explicit(&small_retrial, memory_order_relaxed)) { /* a trial from the next product on */
        pthread_mutex_lock(&small.lock);
        small.shapes = small.started = small.timed = 0;
        atomic_store_explicit(&small.trial, 1, memory_order_relaxed);
        pthread_mutex_unlock(&small.lock);
    }
    return atomic_load_explicit(&small.choice, memory_order_relaxed);
}

/* In a forked child (pool_after_fork): the lock new, nothing measured. */
static void small_after_fork(void) {
    pthread_mutex_init(&small.lock, NULL);
    small.shapes = small.started = small.timed = small.trials = 0;
    atomic_store_explicit(&small.choice, -1, memory_order_relaxed);
    atomic_store_explicit(&small.trial, 1, memory_order_relaxed);
    atomic_store_explicit(&small.since, 0, memory_order_relaxed);
}

/* The core board: the workers of one service (Gunicorn's processes, each with its own kernel and helpers)
   share the machine's cores. Each worker may use all of them (one stream alone then steps on every core),
   but where several are stepping at once, helpers beyond their share only take cores from the others' own
   threads: a helper the OS puts aside in the middle of a unit holds up its caller until it runs again (at
   32 streams over 2 workers of 2 threads on 2 cores: 47-48k characters/s, against 54k with 1 thread each).
   So each worker stamps its slot of a board in shared memory at every step, and a worker shares its products
   with cores / (workers that stepped in the last BOARD_BUSY_NS) - 1 helpers at most; a worker whose engine
   has nothing left to step clears its stamp (charrnn_board_idle), so that one stream whose requests go to
   one worker and then another is not taken for two. The board is a file the server's master made
   (charrnn_join_board); without one, a process uses every helper it has. */
#define BOARD_SLOTS 64
#define BOARD_BUSY_NS 50e6
typedef struct {
    atomic_llong stamp; /* CLOCK_MONOTONIC ns of its last step; 0: idle */
    atomic_int pid;     /* the worker's, 0 when free; a dead worker's slot is taken again */
    char pad[64 - sizeof(atomic_llong) - sizeof(atomic_int)]; /* a cache line each: stamps do not collide */
} BoardSlot;
_Static_assert(sizeof(BoardSlot) == 64, "a board slot is one cache line (core_board.BOARD_BYTES)");
static struct {
    BoardSlot *slot; /* set once, before owner (a process joins once: a later join changes only cores) */
    int mine;
    atomic_int cores;
    atomic_int owner; /* the pid that joined; a forked child does not use its parent's slot */
} board = {NULL, -1, 0, 0};
static _Thread_local int step_helpers = 1 << 30; /* this step's share (board_share), read by run_shared */

/* Whether `pid` is gone (its slot may be taken). */
static int board_dead(int pid) { return pid != getpid() && kill(pid, 0) != 0 && errno == ESRCH; }

static int join_board(const char *path, int cores) {
    const int me = getpid();
    if (atomic_load_explicit(&board.owner, memory_order_acquire) == me) { /* joined already: the same slot */
        atomic_store_explicit(&board.cores, cores < 1 ? 1 : cores, memory_order_relaxed);
        return board.mine;
    }
    const int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) return -1;
    struct stat info;
    void *map = MAP_FAILED;
    if (fstat(fd, &info) == 0 && info.st_size >= (off_t)(BOARD_SLOTS * sizeof(BoardSlot)))
        map = mmap(NULL, BOARD_SLOTS * sizeof(BoardSlot), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return -1;
    BoardSlot *slot = map;
    for (int i = 0; i < BOARD_SLOTS; i++) {
        int seen = atomic_load_explicit(&slot[i].pid, memory_order_relaxed);
        if ((seen == 0 || seen == me || board_dead(seen))
            && atomic_compare_exchange_strong_explicit(&slot[i].pid, &seen, me, memory_order_acq_rel,
                                                       memory_order_relaxed)) {
            atomic_store_explicit(&slot[i].stamp, 0, memory_order_relaxed);
            board.slot = slot, board.mine = i; /* a forked child's join leaves its parent's mapping, unused */
            atomic_store_explicit(&board.cores, cores < 1 ? 1 : cores, memory_order_relaxed);
            atomic_store_explicit(&board.owner, me, memory_order_release);
            return i;
        }
    }
    munmap(map, BOARD_SLOTS * sizeof(BoardSlot));
    return -1;
}

/* At each step: this worker's stamp, and the helpers its products may use (all, without a board). */
static int board_share(void) {
    if (atomic_load_explicit(&board.owner, memory_order_acquire) != getpid()) return 1 << 30;
    const long long now = (long long)now_ns();
    atomic_store_explicit(&board.slot[board.mine].stamp, now, memory_order_relaxed);
    int stepping = 1;
    for (int i = 0; i < BOARD_SLOTS; i++)
        if (i != board.mine && atomic_load_explicit(&board.slot[i].pid, memory_order_relaxed) != 0
            && now - atomic_load_explicit(&board.slot[i].stamp, memory_order_relaxed) < BOARD_BUSY_NS)
            stepping++;
    return atomic_load_explicit(&board.cores, memory_order_relaxed) / stepping - 1;
}

/* Run every unit of `job`: with the helpers from SHARE_ROWS rows, and below that as measured (`small`);
   else on this thread alone. */
#define SHARE_ROWS 4
static void run_shared(Shared *job) {
    const int helpers = job->units > 1 && atomic_load_explicit(&pool.helpers, memory_order_relaxed) > 0
                        && atomic_load_explicit(&pool.owner, memory_order_relaxed) == getpid() && step_helpers > 0;
    job->most = step_helpers;
    const double work = (double)job->n * job->K * job->N;
    int want = job->n >= SHARE_ROWS, timing = -1;
    if (!want && helpers && work >= SMALL_WORK) {
        if (atomic_load_explicit(&small.trial, memory_order_relaxed)) {
            timing = small_trial_way(job->n, job->K, job->N);
            want = timing >= 0 ? timing : atomic_load_explicit(&small.choice, memory_order_relaxed) == 1;
        } else {
            want = small_chosen_way();
        }
    }
    const int share = want && helpers && !atomic_flag_test_and_set_explicit(&pool.busy, memory_order_acquire);
    if (timing != share) timing = -1; /* the way not taken (the pool busy): not timed */
    const double start = timing >= 0 ? now_ns() : 0.0;
    if (!share) {
        shared_work(job);
    } else {
        pthread_mutex_lock(&pool.lock);
        pool.job = job;
        atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
        shared_work(job);
        pthread_mutex_lock(&pool.lock);
        pool.job = NULL; /* a helper that looks from now on finds nothing */
        pthread_mutex_unlock(&pool.lock);
        const double until = now_ns() + WATCH_NS;
        while (atomic_load_explicit(&job->attached, memory_order_acquire) && now_ns() < until) _mm_pause();
        if (atomic_load_explicit(&job->attached, memory_order_acquire)) {
            pthread_mutex_lock(&pool.lock);
            while (atomic_load_explicit(&job->attached, memory_order_acquire)) pthread_cond_wait(&pool.left, &pool.lock);
            pthread_mutex_unlock(&pool.lock);
        }
        atomic_flag_clear_explicit(&pool.busy, memory_order_release);
    }
    if (timing >= 0) small_timed(job->n, job->K, job->N, timing, now_ns() - start);
}

/* float32 (or float16-stored) products: unit 0 streams the rows past the last full group of four (all
   columns; nothing when n is a multiple of 4), then unit 1 + p * groups + g is 4-row group g by
   16-column panel p, and a last panel per group for the N % 16 columns (one at a time). Every element is
   the fold above whichever unit computes it: a row's result is the same bits shared or not. */
static inline __attribute__((always_inline)) void f32_unit(const Shared *s, int u, int half) {
    const int four = 4 * s->groups;
    if (u == 0) {
        if (four < s->n)
            (half ? stream_h : stream_f)(s->n - four, s->K, s->N, s->x + (size_t)four * s->ldx, s->ldx, s->W,
                                          s->y + (size_t)four * s->N);
        return;
    }
    u -= 1;
    const int p = u / s->groups, r = 4 * (u % s->groups);
    const float *x = s->x + (size_t)r * s->ldx;
    float *y = s->y + (size_t)r * s->N;
    if (16 * p + 16 <= s->N) {
        block4x16(s->K, s->N, x, s->ldx, s->W, s->panels, half, y, 16 * p);
        return;
    }
    tail_columns4(s->K, s->N, x, s->ldx, s->W, half, y, 16 * p);
}

static void f32_unit_h(const Shared *s, int u) { f32_unit(s, u, 1); }
static void f32_unit_f(const Shared *s, int u) { f32_unit(s, u, 0); }

/* y (n, N) += x (n, K; row stride ldx) @ W (K, N) in float32 (float16-stored where `half`), shared with the
   helpers: the recurrent layers' products and the head's. */
static void matmul_shared(int n, int K, int N, const float *x, int ldx, const void *W, const void *panels, int half,
                          float *y) {
    const int groups = n / 4, per_group = N / 16 + (N % 16 != 0);
    Shared job = {half ? f32_unit_h : f32_unit_f, 1 + groups * per_group, 0, 0, n, K, N, ldx, groups, per_group,
                  x, W, panels, y, NULL};
    run_shared(&job);
}
#else
#define CHARRNN_SHARE 0
#endif

#if CHARRNN_BF16
/* float32 -> bfloat16 bits, rounded to nearest even (as torch's .to(torch.bfloat16) rounds the weights);
   a NaN stays a NaN. */
static inline uint16_t to_bf16(float f) {
    union { float f; uint32_t u; } v = { f };
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

/* Rows 0 .. R - 1 (R <= 8) of y, the 32 columns of one panel, over all K = 2 * K2:
       acc = y[r][c];  for k2 = 0 .. K2 - 1: acc = vdpbf16ps(acc, (x[r][2 k2], x[r][2 k2 + 1]), (w[2 k2][c], w[2 k2 + 1][c]))
   The same fold for every element whatever R is (so whatever shares the batch); each pair of weights
   loaded once for R rows, 2R independent chains. */
static inline __attribute__((always_inline)) void bblock(const int R, int K2, int N, const uint16_t *xb, int ldxb,
                                                         const uint16_t *panel, float *y) {
    __m512 a[8][2];
    for (int r = 0; r < R; r++) a[r][0] = _mm512_loadu_ps(y + (size_t)r * N), a[r][1] = _mm512_loadu_ps(y + (size_t)r * N + 16);
    for (int k = 0; k < K2; k++) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + (size_t)k * 64);
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + (size_t)k * 64 + 32);
        for (int r = 0; r < R; r++) {
            int32_t pair;
            memcpy(&pair, xb + (size_t)r * ldxb + 2 * k, sizeof pair);
            const __m512bh b = (__m512bh)_mm512_set1_epi32(pair);
            a[r][0] = _mm512_dpbf16_ps(a[r][0], b, w0);
            a[r][1] = _mm512_dpbf16_ps(a[r][1], b, w1);
        }
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(y + (size_t)r * N, a[r][0]), _mm512_storeu_ps(y + (size_t)r * N + 16, a[r][1]);
}

/* bblock with R a constant, each its own function with its accumulators in registers. */
#define BBLOCK(R)                                                                                               \
    static __attribute__((noinline)) void bblock##R(int K2, int N, const uint16_t *xb, int ldxb, const uint16_t *panel, \
                                                    float *y) {                                                 \
        bblock(R, K2, N, xb, ldxb, panel, y);                                                                   \
    }
BBLOCK(1) BBLOCK(2) BBLOCK(3) BBLOCK(4) BBLOCK(5) BBLOCK(6) BBLOCK(7) BBLOCK(8)
#undef BBLOCK

static void (*const bblocks[9])(int, int, const uint16_t *, int, const uint16_t *, float *) = {
    NULL, bblock1, bblock2, bblock3, bblock4, bblock5, bblock6, bblock7, bblock8,
};

#if CHARRNN_AMX
/* Tiles: the 64-byte configuration _tile_loadconfig reads (palette 1), room for TILE_SLOTS tiles of which
   palette 1 has 8. */
#define TILE_SLOTS 16
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[TILE_SLOTS];
    uint8_t rows[TILE_SLOTS];
} TileConfig;

#ifdef CHARRNN_AMX_EMULATE
/* The tile instructions in C, as Intel's pseudo-code has them (each bfloat16 product exact in float32,
   the pair's two products added to the sum one after the other), for the tests of the tile code. */
#define EMU_TILES 8      /* tiles of palette 1 */
#define EMU_ROWS 16      /* at most, per tile */
#define EMU_ROW_BYTES 64 /* at most, per tile row */
static __thread struct {
    int rows[EMU_TILES], colsb[EMU_TILES];
    uint8_t data[EMU_TILES][EMU_ROWS][EMU_ROW_BYTES];
} emu;

static void emu_loadconfig(const TileConfig *cfg) {
    for (int t = 0; t < EMU_TILES; t++) emu.rows[t] = cfg->rows[t], emu.colsb[t] = cfg->colsb[t];
    memset(emu.data, 0, sizeof emu.data); /* as the instruction does */
}

/* What the hardware checks of a product's tiles (a #UD there): C (M x N) += A (M x 4K bytes) . B (K x N). */
static void emu_shapes(int c, int a, int b) {
    if (!emu.rows[c] || emu.rows[a] != emu.rows[c] || emu.colsb[a] / 4 != emu.rows[b] || emu.colsb[b] != emu.colsb[c]
        || c == a || c == b || a == b)
        abort();
}

static void emu_loadd(int t, const void *base, long stride) {
    memset(emu.data[t], 0, sizeof emu.data[t]);
    for (int r = 0; r < emu.rows[t]; r++) memcpy(emu.data[t][r], (const uint8_t *)base + r * stride, emu.colsb[t]);
}

static void emu_stored(int t, void *base, long stride) {
    for (int r = 0; r < emu.rows[t]; r++) memcpy((uint8_t *)base + r * stride, emu.data[t][r], emu.colsb[t]);
}

static float emu_bf16(uint16_t b) {
    const uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void emu_dpbf16ps(int c, int a, int b) {
    emu_shapes(c, a, b);
    for (int m = 0; m < emu.rows[c]; m++)
        for (int n = 0; n < emu.colsb[c] / 4; n++) {
            float acc;
            memcpy(&acc, &emu.data[c][m][4 * n], sizeof acc);
            for (int k = 0; k < emu.colsb[a] / 4; k++) {
                uint16_t x[2], w[2];
                memcpy(x, &emu.data[a][m][4 * k], sizeof x);
                memcpy(w, &emu.data[b][k][4 * n], sizeof w);
                acc += emu_bf16(x[0]) * emu_bf16(w[0]);
                acc += emu_bf16(x[1]) * emu_bf16(w[1]);
            }
            memcpy(&emu.data[c][m][4 * n], &acc, sizeof acc);
        }
}

static void emu_dpbusd(int c, int a, int b) {
    emu_shapes(c, a, b);
    for (int m = 0; m < emu.rows[c]; m++)
        for (int n = 0; n < emu.colsb[c] / 4; n++) {
            uint32_t acc; /* int32 arithmetic that wraps, as the instruction's */
            memcpy(&acc, &emu.data[c][m][4 * n], sizeof acc);
            for (int k = 0; k < emu.colsb[a] / 4; k++)
                for (int i = 0; i < 4; i++)
                    acc += (uint32_t)((int32_t)emu.data[a][m][4 * k + i] * (int8_t)emu.data[b][k][4 * n + i]);
            memcpy(&emu.data[c][m][4 * n], &acc, sizeof acc);
        }
}

#undef _tile_loadconfig
#undef _tile_zero
#undef _tile_dpbusd
#undef _tile_loadd
#undef _tile_stored
#undef _tile_dpbf16ps
#define _tile_loadconfig(cfg) emu_loadconfig((const TileConfig *)(cfg))
#define _tile_loadd(t, base, stride) emu_loadd(t, base, stride)
#define _tile_stored(t, base, stride) emu_stored(t, base, stride)
#define _tile_dpbf16ps(c, a, b) emu_dpbf16ps(c, a, b)
#define _tile_dpbusd(c, a, b) emu_dpbusd(c, a, b)
#define _tile_zero(t) memset(emu.data[t], 0, sizeof emu.data[t])
#endif

/* The tile configuration this thread has loaded (tile configuration is per thread; loading one zeroes the
   tiles, so it is loaded only when it changes). */
static __thread TileConfig tiles_loaded;
static __thread int tiles_ready = 0;

static void load_tiles(const TileConfig *cfg) {
    if (tiles_ready && !memcmp(cfg, &tiles_loaded, sizeof *cfg)) return;
    _tile_loadconfig(cfg);
    tiles_loaded = *cfg, tiles_ready = 1;
}

/* The tile configuration is the caller's to save (the x86-64 ABI): whatever ran on this thread between two
   calls into this library (oneDNN's AMX kernels in a torch operation, say) may have loaded its own or
   released the tiles. So the calling thread loads its configuration afresh at each step; the helpers run
   only this library's code and keep theirs. */
static void forget_tiles(void) { tiles_ready = 0; }

/* tmm0, tmm1: y's R rows by 16 columns (float32), the two halves of a 32-column panel; tmm2: R rows of x by
   32 k (bfloat16); tmm3, tmm4: 16 pairs of k by 16 columns of the panel's weights (the pairs layout of
   bpanels is the tiles' "VNNI" layout); tmm5 .. tmm7 the same for the last K % 32 values of k. */
static void tile_config(int R, int tail) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    cfg.rows[0] = cfg.rows[1] = cfg.rows[2] = (uint8_t)R;
    cfg.colsb[0] = cfg.colsb[1] = cfg.colsb[2] = 64;
    cfg.rows[3] = cfg.rows[4] = 16;
    cfg.colsb[3] = cfg.colsb[4] = 64;
    if (tail) {
        cfg.rows[5] = (uint8_t)R;
        cfg.colsb[5] = (uint16_t)(2 * tail);
        cfg.rows[6] = cfg.rows[7] = (uint8_t)(tail / 2);
        cfg.colsb[6] = cfg.colsb[7] = 64;
    }
    load_tiles(&cfg);
}

/* Unit u of an AMX product: 32-column panel u / groups by 16-row group u % groups. Every element is
       acc = y[r][c];  for each chunk of 32 k (then the K % 32 left): acc = tdpbf16ps(acc, x[r][chunk], w[chunk][c])
   the same chunks for every row whatever R is, so a row's result does not depend on its batch. */
static void amx_unit(const Shared *s, int u) {
    const int K = s->K, N = s->N, j = (u / s->groups) * 32, r = (u % s->groups) * 16;
    const int R = s->n - r < 16 ? s->n - r : 16, full = K & ~31, tail = K - full;
    const uint16_t *xb = (const uint16_t *)s->x + (size_t)r * K, *panel = (const uint16_t *)s->panels + (size_t)j * K;
    float *y = s->y + (size_t)r * N + j;
    tile_config(R, tail);
    _tile_loadd(0, y, 4 * N);
    _tile_loadd(1, y + 16, 4 * N);
    for (int k = 0; k < full; k += 32) {
        _tile_loadd(2, xb + k, 2 * K);
        _tile_loadd(3, panel + (size_t)k * 32, 128); /* pair k / 2 of the panel: 64 bfloat16, 128 bytes */
        _tile_loadd(4, panel + (size_t)k * 32 + 32, 128);
        _tile_dpbf16ps(0, 2, 3);
        _tile_dpbf16ps(1, 2, 4);
    }
    if (tail) {
        _tile_loadd(5, xb + full, 2 * K);
        _tile_loadd(6, panel + (size_t)full * 32, 128);
        _tile_loadd(7, panel + (size_t)full * 32 + 32, 128);
        _tile_dpbf16ps(0, 5, 6);
        _tile_dpbf16ps(1, 5, 7);
    }
    _tile_stored(0, y, 4 * N);
    _tile_stored(1, y + 16, 4 * N);
}

#else
/* Unit u of a bfloat16 product: 32-column panel u / groups by 8-row group u % groups (the last group what
   is left); x here is xb, the rows rounded to bfloat16 (row stride K). */
static void bf16_unit(const Shared *s, int u) {
    const int j = (u / s->groups) * 32, r = (u % s->groups) * 8, R = s->n - r < 8 ? s->n - r : 8;
    const uint16_t *xb = (const uint16_t *)s->x, *panels = s->panels;
    bblocks[R](s->K / 2, s->N, xb + (size_t)r * s->K, s->K, panels + (size_t)j * s->K, s->y + (size_t)r * s->N + j);
}
#endif

/* y (n, N) += bf16(x) (n, K; row stride ldx) @ the bfloat16 panels: x rounded into xb, then the units
   panel by panel, so that a panel (K x 32 bfloat16: 64 KB at K = 1024) is read from memory once and from
   cache by the other groups, and the rows of x (n x K bfloat16) stay in cache throughout. */
static void matmul_bf16(const Net *net, int n, int K, int N, const float *x, int ldx, const uint16_t *panels, float *y) {
    uint16_t *xb = net->xb;
    for (int r = 0; r < n; r++)
        for (int k = 0; k < K; k++) xb[(size_t)r * K + k] = to_bf16(x[(size_t)r * ldx + k]);
#if CHARRNN_AMX
    const int groups = (n + 15) / 16;
    Shared job = {amx_unit, groups * (N / 32), 0, 0, n, K, N, K, groups, N / 32, (const float *)xb, NULL, panels, y, NULL};
#else
    const int groups = (n + 7) / 8;
    Shared job = {bf16_unit, groups * (N / 32), 0, 0, n, K, N, K, groups, N / 32, (const float *)xb, NULL, panels, y, NULL};
#endif
    run_shared(&job);
}
#endif

/* int8 products (Net.qpanels): exact int32 sums, so the order of k does not matter at all, then one
   multiply-add per element into y, y += qscale * (sum_k (xq - 128) q): the same int32 sum and the same
   float operations in both builds that have int8, so the same bits in y. */
#if CHARRNN_SHARE && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define CHARRNN_INT8 1
#define QROWS 8    /* rows per unit */
#define XQ_BYTES 1 /* per input in xq */

/* Row y's 32 columns += scale * (sums - corr), sums (a0, a1) the exact int32 sums of the inputs stored plus 128:
   the one finish of every int8 product in this build (vpdpbusd's and the AMX tiles'), so the same bits. */
static inline __attribute__((always_inline)) void finish32(float *y, __m512i a0, __m512i a1, const float *scale,
                                                           const int32_t *corr) {
    const __m512i c0 = _mm512_loadu_si512(corr), c1 = _mm512_loadu_si512(corr + 16);
    _mm512_storeu_ps(y, _mm512_fmadd_ps(_mm512_loadu_ps(scale), _mm512_cvtepi32_ps(_mm512_sub_epi32(a0, c0)),
                                        _mm512_loadu_ps(y)));
    _mm512_storeu_ps(y + 16, _mm512_fmadd_ps(_mm512_loadu_ps(scale + 16), _mm512_cvtepi32_ps(_mm512_sub_epi32(a1, c1)),
                                             _mm512_loadu_ps(y + 16)));
}

/* By vpdpbusd: the inputs stored plus 128 (unsigned bytes, 1 .. 255), qcorr taken off the sums. */
static inline __attribute__((always_inline)) void qblock(const int R, int K4, int N, const uint8_t *xq, int ldxq,
                                                         const int8_t *panel, const float *scale,
                                                         const int32_t *corr, float *y) {
    __m512i a[8][2];
    for (int r = 0; r < R; r++) a[r][0] = a[r][1] = _mm512_setzero_si512();
    for (int k = 0; k < K4; k++) {
        const __m512i w0 = _mm512_loadu_si512(panel + (size_t)k * 128);
        const __m512i w1 = _mm512_loadu_si512(panel + (size_t)k * 128 + 64);
        for (int r = 0; r < R; r++) {
            int32_t quad;
            memcpy(&quad, xq + (size_t)r * ldxq + 4 * k, sizeof quad);
            const __m512i b = _mm512_set1_epi32(quad);
            a[r][0] = _mm512_dpbusd_epi32(a[r][0], b, w0);
            a[r][1] = _mm512_dpbusd_epi32(a[r][1], b, w1);
        }
    }
    for (int r = 0; r < R; r++) finish32(y + (size_t)r * N, a[r][0], a[r][1], scale, corr);
}

/* Row r of x into xq: round(127 x) + 128, to nearest even (as lrintf), clamped to 1 .. 255. */
static void quantize_row(const float *xr, int K, void *xq, int r) {
    uint8_t *qr = (uint8_t *)xq + (size_t)r * K;
    const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f), by = _mm512_set1_ps(127.0f);
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        const __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(xr + k), by), lo), hi);
        const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(v), _mm512_set1_epi32(128));
        _mm_storeu_si128((__m128i *)(qr + k), _mm512_cvtepi32_epi8(q));
    }
    for (; k < K; k++) qr[k] = (uint8_t)(lrintf(fminf(fmaxf(xr[k] * 127.0f, -127.0f), 127.0f)) + 128);
}

#elif CHARRNN_SHARE && defined(__AVX2__) && defined(__FMA__)
#define CHARRNN_INT8 1
#define QROWS 4    /* rows per unit: 4 rows x 8 columns of int32 pair sums fill 8 of the 16 registers */
#define XQ_BYTES 2 /* per input in xq */

/* Without VNNI, by vpmaddwd: the inputs stored as round(127 x) in int16 (-127 .. 127), a quad of weights
   sign-extended to int16, pairs of products summed exactly into int32 (|sum| <= 2 x 127 x 127), two sums per
   column per quad folded at the end. Each sum is vpdpbusd's less qcorr, exactly. */
static inline __attribute__((always_inline)) void qblock(const int R, int K4, int N, const uint8_t *xq, int ldxq,
                                                         const int8_t *panel, const float *scale,
                                                         const int32_t *corr, float *y) {
    (void)corr;
    const int16_t *xs = (const int16_t *)(const void *)xq;
    /* P groups of 8 columns a pass, as many as 8 accumulators allow: a row alone reads the panel once, in
       order (4 groups), two rows in two passes, more rows in four */
    const int P = R == 1 ? 4 : R == 2 ? 2 : 1;
    for (int c = 0; c < 32; c += 8 * P) {
        __m256i a[4][8];
        for (int r = 0; r < R; r++)
            for (int g = 0; g < 2 * P; g++) a[r][g] = _mm256_setzero_si256();
        for (int k = 0; k < K4; k++) {
            const int8_t *quads = panel + (size_t)k * 128 + 4 * c; /* columns c .. c + 8P - 1, four weights each */
            __m256i w[8];
            for (int g = 0; g < 2 * P; g++) w[g] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(quads + 16 * g)));
            for (int r = 0; r < R; r++) {
                int64_t quad;
                memcpy(&quad, xs + (size_t)r * ldxq + 4 * k, sizeof quad);
                const __m256i b = _mm256_set1_epi64x(quad);
                for (int g = 0; g < 2 * P; g++) a[r][g] = _mm256_add_epi32(a[r][g], _mm256_madd_epi16(w[g], b));
            }
        }
        for (int g = 0; g < P; g++) {
            const __m256 s = _mm256_loadu_ps(scale + c + 8 * g);
            for (int r = 0; r < R; r++) {
                /* hadd: columns c, c+1, c+4, c+5 | c+2, c+3, c+6, c+7; the permute puts them in order */
                const __m256i sums = _mm256_permute4x64_epi64(_mm256_hadd_epi32(a[r][2 * g], a[r][2 * g + 1]), 0xD8);
                float *yr = y + (size_t)r * N + c + 8 * g;
                _mm256_storeu_ps(yr, _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(sums), _mm256_loadu_ps(yr)));
            }
        }
    }
}

/* Row r of x into xq, as int16: round(127 x) to nearest even (as lrintf), clamped to -127 .. 127. */
static void quantize_row(const float *xr, int K, void *xq, int r) {
    int16_t *qr = (int16_t *)xq + (size_t)r * K;
    const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f), by = _mm256_set1_ps(127.0f);
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m256i q = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + k), by), lo), hi));
        _mm_storeu_si128((__m128i *)(qr + k), _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)));
    }
    for (; k < K; k++) qr[k] = (int16_t)lrintf(fminf(fmaxf(xr[k] * 127.0f, -127.0f), 127.0f));
}
#else
#define CHARRNN_INT8 0
#endif

#if CHARRNN_INT8
#define QBLOCK(R)                                                                                                \
    static __attribute__((noinline)) void qblock##R(int K4, int N, const uint8_t *xq, int ldxq, const int8_t *panel, \
                                                    const float *scale, const int32_t *corr, float *y) {         \
        qblock(R, K4, N, xq, ldxq, panel, scale, corr, y);                                                       \
    }
QBLOCK(1) QBLOCK(2) QBLOCK(3) QBLOCK(4)
#if QROWS == 8
QBLOCK(5) QBLOCK(6) QBLOCK(7) QBLOCK(8)
#endif
static void (*const qblocks[QROWS + 1])(int, int, const uint8_t *, int, const int8_t *, const float *,
                                        const int32_t *, float *) = {
    NULL, qblock1, qblock2, qblock3, qblock4,
#if QROWS == 8
    qblock5, qblock6, qblock7, qblock8,
#endif
};
#undef QBLOCK

/* The int8 product's panels, scales and corrections for one call (Shared has room for one pointer). */
typedef struct {
    const uint8_t *xq;
    const int8_t *panels;
    const float *scale;
    const int32_t *corr;
} Int8Product;

#if CHARRNN_AMX && XQ_BYTES == 1 && (defined(__AMX_INT8__) || defined(CHARRNN_AMX_EMULATE))
#define CHARRNN_AMX_INT8 1
/* The int8 products of many rows by AMX tiles (_tile_dpbusd: xq's unsigned bytes by the signed weights,
   exact int32 sums as vpdpbusd's, so whatever adds them up), finished by qblock's own float operations:
   the same bits as the AVX512 code above and the AVX2 build's, a row's whatever its batch. A unit is up
   to 32 rows (two groups of 16) by a 32-column panel: tmm0 .. tmm3 the sums of group g, column half h at
   2g + h; tmm4, tmm5 the groups' 64 k of xq; tmm6, tmm7 16 quads of k by 16 columns of the panel (the
   qpanels layout is the tiles' own, 128 bytes a quad). The last K % 64 of k go through vpdpbusd. */
#define QTILE_ROWS 32

/* Products of at least this many rows go to the tiles (0: none do); fewer rows read the weights faster
   through vpdpbusd (measured: docs/BENCHMARKS.md). */
static atomic_int qtile_rows = 8;

static void qtile_config(int R0, int R1) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    cfg.rows[0] = cfg.rows[1] = cfg.rows[4] = (uint8_t)R0;
    cfg.colsb[0] = cfg.colsb[1] = cfg.colsb[4] = 64;
    if (R1) {
        cfg.rows[2] = cfg.rows[3] = cfg.rows[5] = (uint8_t)R1;
        cfg.colsb[2] = cfg.colsb[3] = cfg.colsb[5] = 64;
    }
    cfg.rows[6] = cfg.rows[7] = 16;
    cfg.colsb[6] = cfg.colsb[7] = 64;
    load_tiles(&cfg);
}

static void int8_tile_unit(const Shared *s, int u) {
    const Int8Product *p = s->panels;
    const int K = s->K, N = s->N, j = (u / s->groups) * 32, r = (u % s->groups) * QTILE_ROWS;
    const int rows = s->n - r < QTILE_ROWS ? s->n - r : QTILE_ROWS, R0 = rows < 16 ? rows : 16, R1 = rows - R0;
    const int full = K & ~63;
    const uint8_t *xq = p->xq + (size_t)r * K;
    const int8_t *panel = p->panels + (size_t)j * K;
    int32_t sums[QTILE_ROWS][32];
    qtile_config(R0, R1);
    _tile_zero(0);
    _tile_zero(1);
    if (R1) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int k = 0; k < full; k += 64) {
        _tile_loadd(6, panel + (size_t)k * 32, 128); /* quads k / 4 .. k / 4 + 15, columns 0 .. 15 */
        _tile_loadd(7, panel + (size_t)k * 32 + 64, 128);
        _tile_loadd(4, xq + k, K);
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
        if (R1) {
            _tile_loadd(5, xq + (size_t)16 * K + k, K);
            _tile_dpbusd(2, 5, 6);
            _tile_dpbusd(3, 5, 7);
        }
    }
    _tile_stored(0, sums[0], 128);
    _tile_stored(1, sums[0] + 16, 128);
    if (R1) {
        _tile_stored(2, sums[QTILE_ROWS / 2], 128);
        _tile_stored(3, sums[QTILE_ROWS / 2] + 16, 128);
    }
    for (int q = 0; q < rows; q++) {
        __m512i a0 = full ? _mm512_loadu_si512(sums[q]) : _mm512_setzero_si512();
        __m512i a1 = full ? _mm512_loadu_si512(sums[q] + 16) : _mm512_setzero_si512();
        for (int k = full; k < K; k += 4) {
            int32_t quad;
            memcpy(&quad, xq + (size_t)q * K + k, sizeof quad);
            const __m512i b = _mm512_set1_epi32(quad);
            a0 = _mm512_dpbusd_epi32(a0, b, _mm512_loadu_si512(panel + (size_t)k * 32));
            a1 = _mm512_dpbusd_epi32(a1, b, _mm512_loadu_si512(panel + (size_t)k * 32 + 64));
        }
        finish32(s->y + (size_t)(r + q) * N + j, a0, a1, p->scale + j, p->corr + j);
    }
}
#endif

/* Unit u: 32-column panel u / groups by QROWS-row group u % groups (the last group what is left). xq's rows
   are K values apart (bytes in the VNNI build, int16 in the AVX2 one: qblock scales the offset). */
static void int8_unit(const Shared *s, int u) {
    const Int8Product *p = s->panels;
    const int j = (u / s->groups) * 32, r = (u % s->groups) * QROWS, R = s->n - r < QROWS ? s->n - r : QROWS;
    const size_t row_bytes = XQ_BYTES * (size_t)s->K;
    qblocks[R](s->K / 4, s->N, p->xq + (size_t)r * row_bytes, s->K, p->panels + (size_t)j * s->K, p->scale + j,
               p->corr + j, s->y + (size_t)r * s->N + j);
}

/* y (n, N) += layer l's int8 product of x (n, K; row stride ldx): x quantized into xq (a fixed scale: every
   input is an h, in (-1, 1)), then the units panel by panel, as matmul_bf16 does. */
static void matmul_int8(const Net *net, int l, int n, int K, int N, const float *x, int ldx, float *y) {
    for (int r = 0; r < n; r++) quantize_row(x + (size_t)r * ldx, K, net->xq, r);
    const Int8Product product = {net->xq, net->qpanels[l], net->qscale[l], net->qcorr[l]};
#if CHARRNN_AMX_INT8
    const int tiles = atomic_load_explicit(&qtile_rows, memory_order_relaxed), by_tiles = tiles > 0 && n >= tiles;
    const int per = by_tiles ? QTILE_ROWS : QROWS, groups = (n + per - 1) / per;
    Shared job = {by_tiles ? int8_tile_unit : int8_unit, groups * (N / 32), 0, 0, n, K, N, K, groups, N / 32, NULL, NULL,
                  &product, y, NULL};
#else
    const int groups = (n + QROWS - 1) / QROWS;
    Shared job = {int8_unit, groups * (N / 32), 0, 0, n, K, N, K, groups, N / 32, NULL, NULL, &product, y, NULL};
#endif
    run_shared(&job);
}
#endif
#ifndef CHARRNN_AMX_INT8
#define CHARRNN_AMX_INT8 0
#endif

int charrnn_has_int8(void) { return CHARRNN_INT8; }

/* Products of at least `rows` rows go to the AMX build's int8 tiles (0: none do; the same bits either way);
   returns the setting before, or -1 in a build without them. */
int charrnn_set_int8_tile_rows(int rows) {
#if CHARRNN_AMX_INT8
    return atomic_exchange_explicit(&qtile_rows, rows, memory_order_relaxed);
#else
    (void)rows;
    return -1;
#endif
}

/* 1: products of fewer than SHARE_ROWS rows are shared (measured: run_shared); 0: not; -1: not decided yet
   (the last choice while they are timed again). */
int charrnn_small_products_shared(void) {
#if CHARRNN_SHARE
    return atomic_load_explicit(&small.choice, memory_order_relaxed);
#else
    return 0;
#endif
}

/* Trials of small products decided so far in this process; and how many products are taken the chosen way
   before the next trial (2^15; returns the setting before; the tests shorten it). */
int charrnn_small_trials(void) {
#if CHARRNN_SHARE
    pthread_mutex_lock(&small.lock);
    const int trials = small.trials;
    pthread_mutex_unlock(&small.lock);
    return trials;
#else
    return 0;
#endif
}

long charrnn_set_small_retrial(long products) {
#if CHARRNN_SHARE
    return atomic_exchange_explicit(&small_retrial, products, memory_order_relaxed);
#else
    (void)products;
    return 0;
#endif
}

int charrnn_join_board(const char *path, int cores) {
#if CHARRNN_SHARE
    pthread_mutex_lock(&pool.lock);
    const int slot = join_board(path, cores);
    pthread_mutex_unlock(&pool.lock);
    return slot;
#else
    (void)path, (void)cores;
    return -1;
#endif
}

void charrnn_board_idle(void) {
#if CHARRNN_SHARE
    if (atomic_load_explicit(&board.owner, memory_order_acquire) == getpid())
        atomic_store_explicit(&board.slot[board.mine].stamp, 0, memory_order_relaxed);
#endif
}

long charrnn_helper_products(int helper) {
#if CHARRNN_SHARE
    return helper >= 0 && helper < COUNTED_HELPERS ? atomic_load_explicit(&helper_products[helper], memory_order_relaxed)
                                                   : 0;
#else
    (void)helper;
    return 0;
#endif
}

int charrnn_board_share(void) {
#if CHARRNN_SHARE
    const int share = board_share();
    const int helpers = atomic_load_explicit(&pool.helpers, memory_order_relaxed);
    return share < helpers ? share : helpers;
#else
    return 0;
#endif
}

int charrnn_set_threads(int threads) {
#if CHARRNN_SHARE
    return set_threads(threads);
#else
    (void)threads;
    return 1;
#endif
}

/* y (n, 4H) += x @ layer l's recurrent weights, in whichever precision the net holds them, shared with
   the helper threads where the build has them. */
static void recurrent_acc(const Net *net, int l, int n, int K, const float *x, int ldx, float *y) {
#if CHARRNN_INT8
    if (net->qpanels[l]) {
        matmul_int8(net, l, n, K, 4 * net->hidden, x, ldx, y);
        return;
    }
#endif
#if CHARRNN_BF16
    if (net->bpanels[l]) {
        matmul_bf16(net, n, K, 4 * net->hidden, x, ldx, net->bpanels[l], y);
        return;
    }
#endif
#if CHARRNN_SHARE
    const int half = net->wh[l] != NULL;
    matmul_shared(n, K, 4 * net->hidden, x, ldx, half ? (const void *)net->wh[l] : net->w[l], net->panels[l], half, y);
#else
    if (net->wh[l]) matmul_batch_h(n, K, 4 * net->hidden, x, ldx, net->wh[l], net->panels[l], y);
    else matmul_batch(n, K, 4 * net->hidden, x, ldx, net->w[l], net->panels[l], y);
#endif
}

/* gates (n, 4H) in order i, f, o, g -> new c (in place) and h (written at h, row stride ldh). */
#if defined(__AVX2__) && defined(__FMA__)
/* exp_ eight at a time: the same Cephes steps, each an FMA where exp_ has a multiply and an add. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
    const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    const __m256 z = _mm256_mul_ps(x, x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

static inline __m256 sigmoid8(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

static inline __m256 tanh8(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
    return _mm256_sub_ps(_mm256_div_ps(two, _mm256_add_ps(one, exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0f), x)))), one);
}

/* Eight units: gate pre-activations at g (i, f, o, g at strides of H), c in place, h written. */
static inline void gates8(const float *g, int H, float *c, float *h) {
    const __m256 i = sigmoid8(_mm256_loadu_ps(g)), f = sigmoid8(_mm256_loadu_ps(g + H));
    const __m256 o = sigmoid8(_mm256_loadu_ps(g + 2 * (size_t)H)), t = tanh8(_mm256_loadu_ps(g + 3 * (size_t)H));
    const __m256 cn = _mm256_fmadd_ps(f, _mm256_loadu_ps(c), _mm256_mul_ps(i, t));
    _mm256_storeu_ps(c, cn);
    _mm256_storeu_ps(h, _mm256_mul_ps(o, tanh8(cn)));
}

/* Eight units at a time (the compiler left the scalar loop scalar, and it took half of a bfloat16
   step), sixteen where the build has AVX-512 (gates16: the same operations lane by lane, so the same bits);
   the last H % 8 through the same code on a padded copy, so every unit is computed alike. */
#if defined(__AVX512F__)
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
    const __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                           _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
    const __m512 z = _mm512_mul_ps(x, x);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_add_ps(_mm512_fmadd_ps(y, z, x), _mm512_set1_ps(1.0f));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(bits));
}

static inline __m512 sigmoid16(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

static inline __m512 tanh16(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f);
    return _mm512_sub_ps(_mm512_div_ps(two, _mm512_add_ps(one, exp16(_mm512_mul_ps(_mm512_set1_ps(-2.0f), x)))), one);
}

static inline void gates16(const float *g, int H, float *c, float *h) {
    const __m512 i = sigmoid16(_mm512_loadu_ps(g)), f = sigmoid16(_mm512_loadu_ps(g + H));
    const __m512 o = sigmoid16(_mm512_loadu_ps(g + 2 * (size_t)H)), t = tanh16(_mm512_loadu_ps(g + 3 * (size_t)H));
    const __m512 cn = _mm512_fmadd_ps(f, _mm512_loadu_ps(c), _mm512_mul_ps(i, t));
    _mm512_storeu_ps(c, cn);
    _mm512_storeu_ps(h, _mm512_mul_ps(o, tanh16(cn)));
}
#endif

static void lstm_gates(int n, int H, const float *gates, float *c, float *h, int ldh) {
    for (int r = 0; r < n; r++) {
        const float *g = gates + (size_t)r * 4 * H;
        float *cr = c + (size_t)r * H, *hr = h + (size_t)r * ldh;
        int j = 0;
#if defined(__AVX512F__)
        for (; j + 16 <= H; j += 16) gates16(g + j, H, cr + j, hr + j);
#endif
        for (; j + 8 <= H; j += 8) gates8(g + j, H, cr + j, hr + j);
        if (j < H) {
            float pad[4][8] = {{0}}, cp[8] = {0}, hp[8];
            const int rest = H - j;
            for (int q = 0; q < 4; q++) memcpy(pad[q], g + (size_t)q * H + j, rest * sizeof(float));
            memcpy(cp, cr + j, rest * sizeof(float));
            gates8(&pad[0][0], 8, cp, hp);
            memcpy(cr + j, cp, rest * sizeof(float));
            memcpy(hr + j, hp, rest * sizeof(float));
        }
    }
}
#else
static void lstm_gates(int n, int H, const float *gates, float *c, float *h, int ldh) {
    for (int r = 0; r < n; r++) {
        const float *g = gates + (size_t)r * 4 * H;
        float *restrict cr = c + (size_t)r * H;
        float *restrict hr = h + (size_t)r * ldh;
        for (int j = 0; j < H; j++) {
            float i = sigmoid_(g[j]), f = sigmoid_(g[H + j]), o = sigmoid_(g[2 * H + j]), t = tanh_(g[3 * H + j]);
            float cn = f * cr[j] + i * t;
            cr[j] = cn;
            hr[j] = o * tanh_(cn);
        }
    }
}
#endif

/* The gates of n rows, shared with the helper threads from GATE_SHARE_ROWS rows (fewer finish before
   the helpers would wake): units of four rows, each row by lstm_gates' own code, so sharing changes no bit. */
#define GATE_SHARE_ROWS 16
#if CHARRNN_SHARE
static void gates_unit(const Shared *s, int u) {
    const int r = 4 * u, rows = s->n - r < 4 ? s->n - r : 4;
    lstm_gates(rows, s->K, s->x + (size_t)r * s->N, s->y + (size_t)r * s->K, s->h + (size_t)r * s->ldx, s->ldx);
}
#endif

static void step_gates(int n, int H, const float *gates, float *c, float *h, int ldh) {
#if CHARRNN_SHARE
    if (n >= GATE_SHARE_ROWS) {
        Shared job = {gates_unit, (n + 3) / 4, 0, 0, n, H, 4 * H, ldh, 0, 0, gates, NULL, NULL, c, h};
        run_shared(&job);
        return;
    }
#endif
    lstm_gates(n, H, gates, c, h, ldh);
}

void charrnn_lstm_step(const Net *net, int n, const int64_t *ids) {
#ifdef CHARRNN_TEST_TRAP
    __builtin_trap(); /* a build that dies on its first step (SIGILL on x86), for the loader's tests */
#endif
#if CHARRNN_AMX
    forget_tiles();
#endif
#if CHARRNN_SHARE
    step_helpers = board_share();
#endif
    const int H = net->hidden, L = net->layers, G = 4 * H, ld = L * H;
    for (int r = 0; r < n; r++) memcpy(net->gates + (size_t)r * G, net->table + (size_t)ids[r] * G, G * sizeof(float));
    recurrent_acc(net, 0, n, H, net->hs, ld, net->gates);
    step_gates(n, H, net->gates, net->cs, net->hs, ld);
    for (int l = 1; l < L; l++) {
        for (int r = 0; r < n; r++) memcpy(net->gates + (size_t)r * G, net->b[l], G * sizeof(float));
        recurrent_acc(net, l, n, 2 * H, net->hs + (size_t)(l - 1) * H, ld, net->gates);
        step_gates(n, H, net->gates, net->cs + (size_t)l * net->capacity * H, net->hs + (size_t)l * H, ld);
    }
    for (int r = 0; r < n; r++) memcpy(net->logits + (size_t)r * net->vocab, net->head_b, net->vocab * sizeof(float));
    const float *top = net->hs + (size_t)(L - 1) * H;
#if CHARRNN_SHARE
    matmul_shared(n, H, net->vocab, top, ld, net->head_w, NULL, 0, net->logits);
#else
    matmul_batch(n, H, net->vocab, top, ld, net->head_w, NULL, net->logits);
#endif
}

/* The draw torch.multinomial(softmax(z / t), 1) makes from exponential noise q:
   argmax(softmax(z / t) / q). Returns the id; *logprob = log_softmax(z)[id]. A logit of -inf (a
   character a constraint masks) has probability 0 and is never drawn: exp_ clamps its argument, so
   such entries are skipped rather than computed. */
int64_t charrnn_draw(const float *z, int V, float temperature, const float *q, float *logprob) {
    float m = -INFINITY, mz = -INFINITY;
    for (int j = 0; j < V; j++) { float s = z[j] / temperature; m = s > m ? s : m; mz = z[j] > mz ? z[j] : mz; }
    float sum = 0.0f, sumz = 0.0f;
    for (int j = 0; j < V; j++) {
        if (z[j] == -INFINITY) continue;
        sum += exp_(z[j] / temperature - m);
        sumz += exp_(z[j] - mz);
    }
    int64_t best = 0;
    float best_ratio = -1.0f;
    for (int j = 0; j < V; j++) {
        if (z[j] == -INFINITY) continue;
        float ratio = (exp_(z[j] / temperature - m) / sum) / q[j];
        if (ratio > best_ratio) { best_ratio = ratio; best = j; }
    }
    *logprob = z[best] - mz - logf(sumz);
    return best;
}

/* charrnn_draw for each row r of logits (n, V) whose temperature is > 0, with noise[r] (V,). */
void charrnn_draw_rows(int n, int V, const float *logits, const float *temps, const float *const *noise,
                       int64_t *ids, float *logprobs) {
    for (int r = 0; r < n; r++)
        if (temps[r] > 0) ids[r] = charrnn_draw(logits + (size_t)r * V, V, temps[r], noise[r], logprobs + r);
}

/* `steps` times: a character for every row of the batch, drawn from the net's logits (every row plain:
   temps[r] > 0), then the step that reads them: one call for what the draw and the step do apart, and for
   several steps. Step s reads noise[s * n + r] and writes ids[s * n + r] and logprobs[s * n + r]. */
void charrnn_draw_step(const Net *net, int n, int steps, const float *temps, const float *const *noise, int64_t *ids,
                       float *logprobs) {
    for (int s = 0; s < steps; s++) {
        const size_t at = (size_t)s * (size_t)n;
        charrnn_draw_rows(n, net->vocab, net->logits, temps, noise + at, ids + at, logprobs + at);
        charrnn_lstm_step(net, n, ids + at);
    }
}

/* ---- charrnn_self_test: this build's first run, in a child process of the loader ---------------------- */

#define ST_ROWS 19 /* more than one group of rows (8 for vdpbf16ps and vpdpbusd, 16 for bfloat16 tiles; for int8
                      tiles both 16-row halves of a 32-row unit), shared by threads */
#define ST_K 112   /* whole tiles of k and a tail: 3 x 32 + 16 (bfloat16), 64 + 48 (int8) */
#define ST_N 64    /* two 32-column panels */

static uint32_t st_seed;

/* A uniform value in (-1, 1) from a linear congruential generator: the same numbers on every machine. */
static float st_rand(void) {
    st_seed = st_seed * 1664525u + 1013904223u;
    return (float)(st_seed >> 8) * (2.0f / 16777216.0f) - 1.0f;
}

/* What is wrong with y (ST_ROWS x ST_N) = y0 + x @ W against ref, and with the last row computed alone. */
static const char *st_check(const Net *net, const float *x, const float *y0, const double *ref, double tolerance,
                            const char *off, const char *alone_differs) {
    static float y[ST_ROWS * ST_N], alone[ST_N];
    const size_t last = (size_t)(ST_ROWS - 1) * ST_N;
    memcpy(y, y0, sizeof y);
    recurrent_acc(net, 0, ST_ROWS, ST_K, x, ST_K, y);
    for (int i = 0; i < ST_ROWS * ST_N; i++)
        if (!(fabs((double)y[i] - ref[i]) <= tolerance)) return off; /* a NaN fails too */
    memcpy(alone, y0 + last, sizeof alone);
    recurrent_acc(net, 0, 1, ST_K, x + (size_t)(ST_ROWS - 1) * ST_K, ST_K, alone);
    return memcmp(alone, y + last, sizeof alone) ? alone_differs : NULL;
}

const char *charrnn_self_test(void) {
    static float W[ST_K * ST_N], x[ST_ROWS * ST_K], y0[ST_ROWS * ST_N];
    static double ref[ST_ROWS * ST_N];
    if (!charrnn_init()) return "the operating system refused what this build needs (AMX tile state)";
    charrnn_set_threads(2);
    st_seed = 29;
    for (int i = 0; i < ST_K * ST_N; i++) W[i] = 0.3f * st_rand();
    for (int i = 0; i < ST_ROWS * ST_K; i++) x[i] = st_rand();
    for (int i = 0; i < ST_ROWS * ST_N; i++) y0[i] = st_rand();
    for (int r = 0; r < ST_ROWS; r++)
        for (int c = 0; c < ST_N; c++) {
            double sum = y0[r * ST_N + c];
            for (int k = 0; k < ST_K; k++) sum += (double)x[r * ST_K + k] * W[k * ST_N + c];
            ref[r * ST_N + c] = sum;
        }
    Net net;
    memset(&net, 0, sizeof net);
    net.layers = 1, net.hidden = ST_N / 4, net.capacity = ST_ROWS, net.w[0] = W;
    const char *problem = st_check(&net, x, y0, ref, 1e-4, "float32 products differ from a float64 reference",
                                   "float32: a row alone differs from the same row in a batch");
    if (problem) return problem;
#if CHARRNN_BF16 /* bfloat16 weights and inputs: 8 bits of mantissa each, ST_K products of up to 0.3 (errors
                    of ~1e-3 each, summed at random: ~0.01) */
    static uint16_t bpanel[ST_K * ST_N], xb[ST_ROWS * ST_K];
    for (int k = 0; k < ST_K; k++)
        for (int c = 0; c < ST_N; c++)
            bpanel[((c / 32) * (ST_K / 2) + k / 2) * 64 + 2 * (c % 32) + k % 2] = to_bf16(W[k * ST_N + c]);
    net.bpanels[0] = bpanel, net.xb = xb;
    problem = st_check(&net, x, y0, ref, 0.1, "bfloat16 products differ from a float64 reference",
                       "bfloat16: a row alone differs from the same row in a batch");
    net.bpanels[0] = NULL, net.xb = NULL;
    if (problem) return problem;
#endif
#if CHARRNN_INT8 /* int8 weights per column and inputs at a step of 1 / 127 */
    static int8_t qpanel[ST_K * ST_N];
    static float qscale[ST_N];
    static int32_t qcorr[ST_N];
    static int16_t xq[ST_ROWS * ST_K]; /* room for int16 inputs (the AVX2 build's) */
    for (int c = 0; c < ST_N; c++) {
        float most = 0.0f;
        for (int k = 0; k < ST_K; k++) most = fmaxf(most, fabsf(W[k * ST_N + c]));
        const float scale = most > 0.0f ? most / 127.0f : 1.0f;
        int32_t sum = 0;
        for (int k = 0; k < ST_K; k++) {
            const int8_t q = (int8_t)lrintf(fminf(fmaxf(W[k * ST_N + c] / scale, -127.0f), 127.0f));
            qpanel[((c / 32) * (ST_K / 4) + k / 4) * 128 + 4 * (c % 32) + k % 4] = q;
            sum += q;
        }
        qscale[c] = scale / 127.0f, qcorr[c] = 128 * sum;
    }
    net.qpanels[0] = qpanel, net.qscale[0] = qscale, net.qcorr[0] = qcorr, net.xq = (uint8_t *)xq;
    const int tile_rows = charrnn_set_int8_tile_rows(2); /* the batch by tiles, the row alone by vpdpbusd */
    problem = st_check(&net, x, y0, ref, 0.1, "int8 products differ from a float64 reference",
                       "int8: a row alone differs from the same row in a batch");
    charrnn_set_int8_tile_rows(tile_rows);
    if (problem) return problem;
#endif
    /* one whole step of a 1-layer net (the gates' code too): finite logits */
    enum { H = ST_N / 4, V = 5 };
    static float table[V * 4 * H], head_w[H * V], head_b[V], hs[ST_ROWS * H], cs[ST_ROWS * H], gates[ST_ROWS * 4 * H],
        logits[ST_ROWS * V];
    static int64_t ids[ST_ROWS];
    for (int i = 0; i < V * 4 * H; i++) table[i] = st_rand();
    for (int i = 0; i < H * V; i++) head_w[i] = st_rand();
    for (int r = 0; r < ST_ROWS; r++) ids[r] = r % V;
    Net step;
    memset(&step, 0, sizeof step);
    step.layers = 1, step.hidden = H, step.vocab = V, step.capacity = ST_ROWS;
    step.table = table, step.head_w = head_w, step.head_b = head_b, step.w[0] = W; /* W's first H rows: (H, 4H) */
    step.hs = hs, step.cs = cs, step.gates = gates, step.logits = logits;
    for (int t = 0; t < 3; t++) charrnn_lstm_step(&step, ST_ROWS, ids);
    for (int i = 0; i < ST_ROWS * V; i++)
        if (!isfinite(logits[i])) return "a whole step gave logits that are not finite";
    return NULL;
}
