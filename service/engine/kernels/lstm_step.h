/* The C kernel's interface: the LSTM step and the character draw of service/engine/lstm_kernel.py, which
   binds these functions with ctypes and mirrors Net as native_lstm.Net.

   Layouts (row-major float32; gate columns reordered to i, f, o, g):
       table (vocab, 4H)   layer 0's input projection, embedding and both biases folded in
       w[0]  (H, 4H)       layer 0's recurrent weights; w[l] (2H, 4H) = [W_ih_l; W_hh_l] for l >= 1
       wh[l]               w[l] as float16 (uint16 bits), or NULL
       b[l]  (4H,)         b_ih_l + b_hh_l for l >= 1
       hs    (capacity, layers * H)   every layer's h, side by side in a row
       cs    (layers, capacity, H)
*/
#ifndef CHARRNN_LSTM_STEP_H
#define CHARRNN_LSTM_STEP_H

#include <stddef.h>
#include <stdint.h>

/* The most layers a Net holds. Defined once, as native_lstm.MAX_LAYERS, which the loader passes as
   -DCHARRNN_MAX_LAYERS=N; the library reports it back (charrnn_max_layers) so that a kernel built
   for another limit is not used. */
#ifndef CHARRNN_MAX_LAYERS
#error "compile with -DCHARRNN_MAX_LAYERS=N (service/engine/lstm_kernel.py does)"
#endif

typedef struct {
    int layers, hidden, vocab, capacity;
    const float *table, *head_w, *head_b;
    const float *w[CHARRNN_MAX_LAYERS], *b[CHARRNN_MAX_LAYERS];
    float *hs, *cs, *gates, *logits;
    const uint16_t *wh[CHARRNN_MAX_LAYERS]; /* float16 copies of w[l] read instead of them; NULL: read w[l] */
    /* w[l] (or wh[l] where set) packed in panels of 16 columns, each panel's K rows contiguous:
       panel[(j / 16) * K * 16 + k * 16 + c] = w[k][j + c], so a 4 x 16 block reads its weights in order.
       NULL where 4H is not a multiple of 16 (the block then reads w[l] itself). */
    const void *panels[CHARRNN_MAX_LAYERS];
    /* bfloat16 arithmetic (a kernel built with AVX512-BF16, where the CPU has it; see charrnn_has_bf16):
       w[l] rounded to bfloat16 and packed in panels of 32 columns by pairs of k,
           bpanels[l][((j / 32) * (K / 2) + k / 2) * 64 + 2 * c + k % 2] = bf16(w[l][k][j + c]),
       so one vdpbf16ps multiplies a pair of x by a pair of rows for 16 columns. Set for every layer or
       for none (NULL: float32 arithmetic); needs 4H a multiple of 32 and K even (the loader checks).
       xb (capacity, 2H) holds the rows of x rounded to bfloat16 while a layer is multiplied. */
    const uint16_t *bpanels[CHARRNN_MAX_LAYERS];
    uint16_t *xb;
    /* int8 arithmetic (a kernel built with AVX512-VNNI or AVX2, where the CPU has it; see charrnn_has_int8):
       w[l] quantized per column c, q = round(w / s_c) with s_c = max_k |w[k][c]| / 127, packed in panels of
       32 columns by quads of k,
           qpanels[l][((j / 32) * (K / 4) + k / 4) * 128 + 4 * c + k % 4] = q[k][j + c],
       qscale[l][c] = s_c / 127 and qcorr[l][c] = 128 * sum_k q[k][c]. The rows of x (every h, in (-1, 1))
       are quantized to round(127 x) while a layer is multiplied, into xq (room for capacity x 2H int16):
       the VNNI build stores them plus 128 as bytes, so that one vpdpbusd multiplies 4 of x by 4 rows for 16
       columns, and takes qcorr off; the AVX2 build stores int16 and multiplies pairs by vpmaddwd. Both sum
       exactly in int32, so both give the same bits:
           y[r][c] += qscale[c] * (sum_k round(127 x[r][k]) q[k][c])
       Set for every layer or for none (NULL: float or bfloat16 arithmetic); needs 4H a multiple of 32 and
       K a multiple of 4 (the loader checks). */
    const int8_t *qpanels[CHARRNN_MAX_LAYERS];
    const float *qscale[CHARRNN_MAX_LAYERS];
    const int32_t *qcorr[CHARRNN_MAX_LAYERS];
    uint8_t *xq;
} Net;

/* One step of n rows: ids (n,) -> logits (n, vocab); hs and cs move on by one character. */
void charrnn_lstm_step(const Net *net, int n, const int64_t *ids);

/* The draw torch.multinomial(softmax(z / t), 1) makes from exponential noise q (V,). Returns the id;
   *logprob = log_softmax(z)[id]. */
int64_t charrnn_draw(const float *z, int V, float temperature, const float *q, float *logprob);

/* charrnn_draw for each row r of logits (n, V) whose temperature is > 0, with noise[r] (V,). */
void charrnn_draw_rows(int n, int V, const float *logits, const float *temps, const float *const *noise,
                       int64_t *ids, float *logprobs);

/* `steps` times: charrnn_draw_rows on net->logits (rows 0 .. n - 1, every one plain), then charrnn_lstm_step
   with the ids drawn; step s reads noise[s * n .. s * n + n - 1] and writes ids and logprobs there. */
void charrnn_draw_step(const Net *net, int n, int steps, const float *temps, const float *const *noise, int64_t *ids,
                       float *logprobs);

/* Threads that share a step from 4 rows up (the recurrent layers' products and the head's; the gates from
   16 rows; the products of 1-3 rows where the kernel measured sharing them faster, see
   charrnn_small_products_shared): this one and threads - 1 helpers, started now (the helpers never end; a
   later call with fewer keeps them). Returns how many there are; 1 in the portable build, which steps on
   the calling thread alone. */
int charrnn_set_threads(int threads);

/* Joins the core board at `path` (a file of 4 KiB, zeros at first, that every worker of one server opens):
   from then on this process's steps share their products with at most cores / (workers on the board that
   stepped in the last 50 ms) - 1 helpers, so that workers stepping at once do not put more threads on the
   cores than there are (one worker alone still uses every helper). Returns this worker's slot, or -1 (no such
   file, or the board full): then nothing changes. A process joins once: a later call changes only `cores`
   (and returns the same slot). The portable build has no helpers and returns -1. */
int charrnn_join_board(const char *path, int cores);

/* This worker has nothing to step: the others may count on its cores (the engine calls it before it waits). */
void charrnn_board_idle(void);

/* How many products helper `helper` (0 for the first started) has taken part in (for the tests). */
long charrnn_helper_products(int helper);

/* The helpers a step would share its products with now (stamps this worker's slot, as a step does). */
int charrnn_board_share(void);

/* Whether the products of 1-3 rows (1M multiply-adds or more, in panels: bfloat16 and int8) are shared with
   the helpers: 1 yes, 0 no, -1 not decided yet. Their first 128 are timed, in runs of 16 alone and 16 shared,
   and the way faster over the shapes timed both ways is taken until 2^15 more have been, then they are timed
   again; either way gives the same bits. */
int charrnn_small_products_shared(void);

/* How many of those trials have been decided in this process; and how many products are taken the chosen way
   before they are timed again (2^15: returns the setting before; for the tests). */
int charrnn_small_trials(void);
long charrnn_set_small_retrial(long products);

/* This library's build: "amx", "bf16", "avx2" or "portable" (lstm_kernel.VARIANTS). */
const char *charrnn_build(void);

/* Asks the operating system for what the build needs before its first step (AMX: Linux's permission for
   the tile state). 1 if ready, 0 if refused: then the build must not be used. Idempotent. */
int charrnn_init(void);

/* This build's first run, for the loader's child process: charrnn_init, then the products of a small random
   matrix (19 rows, two helper threads) in each arithmetic the build has (float32; bfloat16 and int8, by
   tiles in the AMX build) against a float64 reference, the last row again alone (the same bits, or the
   seeded-batch contract is broken), and a few whole steps of a small net. NULL if all is right, else what
   was wrong. A build whose instructions this CPU lacks dies here instead (SIGILL). */
const char *charrnn_self_test(void);

/* 1 if this library was built with the int8 step (AVX512-VNNI's vpdpbusd or AVX2's vpmaddwd: the same bits), else 0. */
int charrnn_has_int8(void);

/* Int8 products of at least `rows` rows go to the AMX build's tiles (0: none do); the same bits either way
   (exact int32 sums), only the speed changes. Returns the setting before; -1 in a build without tiles. */
int charrnn_set_int8_tile_rows(int rows);

/* 1 if this library was built with the bfloat16 step (AVX512-BF16 and AVX512-VL), else 0. */
int charrnn_has_bf16(void);

/* A float16 value (its bits) as float32: exact; exported for the tests. */
float charrnn_half_to_float(uint16_t h);

/* CHARRNN_MAX_LAYERS and sizeof(Net), as this library was compiled: the loader checks them against
   its ctypes mirror before a step is run. */
int charrnn_max_layers(void);
size_t charrnn_net_size(void);

#endif
