"""A small C kernel for the LSTM step and the draw of one character, for batches of a few rows.

Why: one stream's step is a handful of matrix-vector products and some gate arithmetic; in PyTorch
each of its ~25 operations costs microseconds of Python and dispatcher overhead, which for one row
is as much as the arithmetic itself, and MKL's one-row sgemm reads the weights slower than the
machine can. One C call does a whole step (and one the draw), with the GIL released.

The C source below is compiled on first use with the system's C compiler (`cc`, -O3, AVX2/FMA/F16C
when the CPU has them) into a cache directory, keyed by a hash of source and flags; a kernel already
there is used without a compiler (the Docker image's, built in its build stage). If there is neither,
or `CHARRNN_NATIVE=0`, `load()` returns None and the engine uses its PyTorch step.

Loading a shared library runs its code, and the cache path is computable by anyone, so a kernel is
loaded only from what this user (or root) could have written: the directory and the file must be
owned by this user or root and writable by no one else, neither may be a symbolic link, and what is
loaded is the very file checked (opened once without following links, checked with fstat, loaded
through /proc/self/fd). The cache directory is created 0700 (`build_all`'s, for an image's other
users, 0755). Anything else, or a library without the kernel's functions, means a warning and the
PyTorch step.

Numerics: float32 throughout, like the model; sums run in another order than MKL's and exp is a
polynomial (Cephes expf, ~1 ulp), so results equal the PyTorch step's to float rounding, not bit for
bit (see docs/ENGINE_INTERFACE.md on what that means for the text).

Weights stored as float16 (a checkpoint written by `charrnn export --half`, like the shipped default
model) are read as float16: every such weight converts back to the same float32, so nothing changes
but the bytes read per step, which halve. One stream's step is matrix-vector products, bound by
reading the weights (at hidden 512, 12 MB of float32 per character), so this is what makes it faster.
Arithmetic stays float32.

Layouts (row-major float32; gate columns reordered to i, f, o, g):
    table (vocab, 4H)   layer 0's input projection, embedding and both biases folded in
    w[0]  (H, 4H)       layer 0's recurrent weights; w[l] (2H, 4H) = [W_ih_l; W_hh_l] for l >= 1
    wh[l]               w[l] as float16 (uint16 bits), or NULL
    b[l]  (4H,)         b_ih_l + b_hh_l for l >= 1
    hs    (capacity, layers * H)   every layer's h, side by side in a row
    cs    (layers, capacity, H)
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#endif

typedef struct {
    int layers, hidden, vocab, capacity;
    const float *table, *head_w, *head_b;
    const float *w[16], *b[16];
    float *hs, *cs, *gates, *logits;
    const uint16_t *wh[16];  /* float16 copies of w[l] read instead of them; NULL: read w[l] */
} Net;

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
    union { int32_t i; float f; } scale;
    scale.i = ((int32_t)fx + 127) << 23;
    return y * scale.f;
}

static inline float sigmoid_(float x) { return 1.0f / (1.0f + exp_(-x)); }
static inline float tanh_(float x) { return 2.0f / (1.0f + exp_(-2.0f * x)) - 1.0f; }

/* y (n, N) += x (n, K; row stride ldx) @ W (K, N): four rows of W per pass, each row of y stays in L1. */
static void matmul_acc(int n, int K, int N, const float *x, int ldx, const float *W, float *y) {
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

float charrnn_half_to_float(uint16_t h) { return half_to_float(h); }  /* for the tests */

/* matmul_acc with float16 weights: each 8-column slice of four weight rows is converted once and
   used for every row of x. Half the bytes of W per step, and W's reads are what bound one stream. */
static void matmul_acc_h(int n, int K, int N, const float *x, int ldx, const uint16_t *W, float *y) {
    int k = 0;
    for (; k + 4 <= K; k += 4) {
        const uint16_t *w0 = W + (size_t)k * N, *w1 = w0 + N, *w2 = w1 + N, *w3 = w2 + N;
        int j = 0;
#if defined(__F16C__) && defined(__FMA__)
        for (; j + 8 <= N; j += 8) {
            const __m256 v0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w0 + j)));
            const __m256 v1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w1 + j)));
            const __m256 v2 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w2 + j)));
            const __m256 v3 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w3 + j)));
            for (int r = 0; r < n; r++) {
                const float *xr = x + (size_t)r * ldx + k;
                float *yr = y + (size_t)r * N + j;
                __m256 acc = _mm256_loadu_ps(yr);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(xr[0]), v0, acc);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(xr[1]), v1, acc);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(xr[2]), v2, acc);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(xr[3]), v3, acc);
                _mm256_storeu_ps(yr, acc);
            }
        }
#endif
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

/* y (n, 4H) += x @ layer l's recurrent weights, in whichever precision the net holds them. */
static void recurrent_acc(const Net *net, int l, int n, int K, const float *x, int ldx, float *y) {
    if (net->wh[l]) matmul_acc_h(n, K, 4 * net->hidden, x, ldx, net->wh[l], y);
    else matmul_acc(n, K, 4 * net->hidden, x, ldx, net->w[l], y);
}

/* gates (n, 4H) in order i, f, o, g -> new c (in place) and h (written at h, row stride ldh). */
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

/* One step of n rows: ids (n,) -> logits (n, vocab); hs and cs move on by one character. */
void charrnn_lstm_step(const Net *net, int n, const int64_t *ids) {
    const int H = net->hidden, L = net->layers, G = 4 * H, ld = L * H;
    for (int r = 0; r < n; r++) memcpy(net->gates + (size_t)r * G, net->table + (size_t)ids[r] * G, G * sizeof(float));
    recurrent_acc(net, 0, n, H, net->hs, ld, net->gates);
    lstm_gates(n, H, net->gates, net->cs, net->hs, ld);
    for (int l = 1; l < L; l++) {
        for (int r = 0; r < n; r++) memcpy(net->gates + (size_t)r * G, net->b[l], G * sizeof(float));
        recurrent_acc(net, l, n, 2 * H, net->hs + (size_t)(l - 1) * H, ld, net->gates);
        lstm_gates(n, H, net->gates, net->cs + (size_t)l * net->capacity * H, net->hs + (size_t)l * H, ld);
    }
    for (int r = 0; r < n; r++) memcpy(net->logits + (size_t)r * net->vocab, net->head_b, net->vocab * sizeof(float));
    matmul_acc(n, H, net->vocab, net->hs + (size_t)(L - 1) * H, ld, net->head_w, net->logits);
}

/* The draw torch.multinomial(softmax(z / t), 1) makes from exponential noise q:
   argmax(softmax(z / t) / q). Returns the id; *logprob = log_softmax(z)[id]. */
int64_t charrnn_draw(const float *z, int V, float temperature, const float *q, float *logprob) {
    float m = -INFINITY, mz = -INFINITY;
    for (int j = 0; j < V; j++) { float s = z[j] / temperature; m = s > m ? s : m; mz = z[j] > mz ? z[j] : mz; }
    float sum = 0.0f, sumz = 0.0f;
    for (int j = 0; j < V; j++) { sum += exp_(z[j] / temperature - m); sumz += exp_(z[j] - mz); }
    int64_t best = 0;
    float best_ratio = -1.0f;
    for (int j = 0; j < V; j++) {
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
"""


class Net(ctypes.Structure):
    """Mirror of the C struct: shapes and the addresses of every buffer a step reads or writes."""

    _fields_ = [
        ("layers", ctypes.c_int),
        ("hidden", ctypes.c_int),
        ("vocab", ctypes.c_int),
        ("capacity", ctypes.c_int),
        ("table", ctypes.c_void_p),
        ("head_w", ctypes.c_void_p),
        ("head_b", ctypes.c_void_p),
        ("w", ctypes.c_void_p * 16),
        ("b", ctypes.c_void_p * 16),
        ("hs", ctypes.c_void_p),
        ("cs", ctypes.c_void_p),
        ("gates", ctypes.c_void_p),
        ("logits", ctypes.c_void_p),
        ("wh", ctypes.c_void_p * 16),
    ]


MAX_LAYERS = 16
_library: ctypes.CDLL | None = None
_tried = False
_held_fds: list[int] = []  # the descriptors kernels were loaded through (see open_checked)


class UntrustedKernel(RuntimeError):
    """A kernel (or its directory) that someone other than this user or root could have written."""


def load() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), or None where it cannot be built, is not trusted or is off."""
    global _library, _tried
    if _tried:
        return _library
    _tried = True
    if os.environ.get("CHARRNN_NATIVE", "1") == "0":
        return None
    try:
        path = _build()
        _library = _bind(open_checked(path), path)
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        log.warning("native LSTM kernel unavailable, using the PyTorch step: %s", exc)
    return _library


def build_all() -> list[Path]:
    """Compile every variant this architecture has (AVX2/FMA/F16C and portable) into the cache.

    For an image built on one machine and run on others (the Dockerfile's build stage): a runtime CPU
    without AVX2 then finds its portable kernel instead of falling back to the PyTorch step. The
    directory, if this creates it, is readable by every user (0755): the image runs as another user.
    """
    variants = [True, False] if platform.machine().lower() in ("x86_64", "amd64") else [False]
    return [_build(simd, dir_mode=0o755) for simd in variants]


def open_checked(path: Path) -> ctypes.CDLL:
    """The library at `path`, loaded only if it and its directory are trusted (UntrustedKernel if not).

    Opened once, without following links; the checks are of that open file (fstat), and what is
    loaded is that file, through /proc/self/fd/N, so nothing can be swapped in between. The
    descriptor stays open: dlopen answers a name it has loaded before with that library, so the
    name /proc/self/fd/N must never come round again for another file.
    """
    dir_fd = _open_no_follow(path.parent, os.O_DIRECTORY)
    try:
        _check_trusted(os.fstat(dir_fd), path.parent, "directory")
        fd = _open_no_follow(Path(path.name), 0, dir_fd=dir_fd, shown=path)
    finally:
        os.close(dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UntrustedKernel(f"{path} is not a regular file")
        _check_trusted(info, path, "file")
        by_fd = f"/proc/self/fd/{fd}"
        library = ctypes.CDLL(by_fd if os.path.exists(by_fd) else str(path))  # no /proc: the path just checked
    except BaseException:
        os.close(fd)
        raise
    _held_fds.append(fd)
    return library


def _open_no_follow(path: Path, flags: int, dir_fd: int | None = None, shown: Path | None = None) -> int:
    """os.open for reading, refusing a symbolic link (UntrustedKernel); `shown` names it in messages."""
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | flags, dir_fd=dir_fd)
    except OSError as exc:
        # what O_NOFOLLOW answers for a link (ENOTDIR with O_DIRECTORY); no link: the error as it is
        linked = exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and dir_fd is None and os.path.islink(path))
        if linked:
            raise UntrustedKernel(
                f"{shown or path} is a symbolic link; kernels are loaded only from real files"
            ) from None
        raise


def _check_trusted(info: os.stat_result, path: Path, what: str) -> None:
    """UntrustedKernel unless `info` is owned by this user or root and writable by no one else."""
    if info.st_uid not in (os.geteuid(), 0):
        raise UntrustedKernel(
            f"the kernel {what} {path} belongs to uid {info.st_uid}, not to this user ({os.geteuid()}) or root;"
            " it is not loaded (remove it, or point CHARRNN_KERNEL_DIR at a directory of your own)"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedKernel(
            f"the kernel {what} {path} is writable by other users (mode {stat.S_IMODE(info.st_mode):o});"
            " it is not loaded (remove it, or make it writable only by its owner: chmod go-w)"
        )


def _cpu_has_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _flags(simd: bool) -> list[str]:
    return ["-O3", "-fPIC", "-shared", "-fno-math-errno", *(["-mavx2", "-mfma", "-mf16c"] if simd else [])]


def _build(simd: bool | None = None, dir_mode: int = 0o700) -> Path:
    """Compile SOURCE into the cache (once per source and flags); concurrent builders are harmless.

    `simd` None means what this CPU runs: AVX2/FMA/F16C where it has AVX2, else portable C. The cache
    directory is created with `dir_mode`, and an existing one must be trusted (see `open_checked`).
    """
    flags = _flags(_cpu_has_avx2() if simd is None else simd)
    target = kernel_path(simd)
    cache = target.parent
    if os.path.lexists(target):  # built earlier, maybe elsewhere (the Docker image's build stage): no compiler needed
        return target  # checked when it is opened
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise RuntimeError("no C compiler (cc) on PATH")
    _make_dir(cache, dir_mode)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src = Path(tmp) / "lstm_step.c"
        src.write_text(SOURCE)
        out = Path(tmp) / target.name
        subprocess.run(
            [compiler, *flags, "-o", str(out), str(src), "-lm"], check=True, capture_output=True, timeout=120
        )
        out.chmod(0o755)  # whatever the umask: writable by its owner only, or it would not be loaded
        os.replace(out, target)  # atomic: another worker sees the old state or the whole file
    return target


def kernel_path(simd: bool | None = None) -> Path:
    """Where the kernel for `simd` (None: this CPU's) is kept: named by a hash of source and flags."""
    flags = _flags(_cpu_has_avx2() if simd is None else simd)
    digest = hashlib.sha256((SOURCE + " ".join(flags)).encode()).hexdigest()[:16]
    return kernel_dir() / f"lstm_step_{digest}.so"


def kernel_dir() -> Path:
    """Where compiled kernels are kept: CHARRNN_KERNEL_DIR, else ~/.cache/charrnn/kernels."""
    return Path(os.environ.get("CHARRNN_KERNEL_DIR") or Path.home() / ".cache" / "charrnn" / "kernels")


def _make_dir(cache: Path, mode: int) -> None:
    """Create `cache` with `mode` (its parents as usual); an existing one must be trusted."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        cache.mkdir(mode=mode)
        os.chmod(cache, mode)  # the umask may have taken bits from 0755
    except FileExistsError:
        pass
    fd = _open_no_follow(cache, os.O_DIRECTORY)
    try:
        _check_trusted(os.fstat(fd), cache, "directory")
    finally:
        os.close(fd)


KERNEL_FUNCTIONS = ("charrnn_lstm_step", "charrnn_draw", "charrnn_draw_rows", "charrnn_half_to_float")


def _bind(lib: ctypes.CDLL, path: Path) -> ctypes.CDLL:
    """`lib` with the kernel functions' signatures set; RuntimeError if it lacks any of them."""
    missing = [name for name in KERNEL_FUNCTIONS if not hasattr(lib, name)]
    if missing:
        raise RuntimeError(f"{path} is not this kernel: it lacks {', '.join(missing)}")
    lib.charrnn_lstm_step.argtypes = [ctypes.POINTER(Net), ctypes.c_int, ctypes.c_void_p]
    lib.charrnn_lstm_step.restype = None
    lib.charrnn_draw.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_float,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_float),
    ]
    lib.charrnn_draw.restype = ctypes.c_int64
    lib.charrnn_draw_rows.argtypes = [ctypes.c_int, ctypes.c_int, *[ctypes.c_void_p] * 5]
    lib.charrnn_draw_rows.restype = None
    lib.charrnn_half_to_float.argtypes = [ctypes.c_uint16]
    lib.charrnn_half_to_float.restype = ctypes.c_float
    return lib
