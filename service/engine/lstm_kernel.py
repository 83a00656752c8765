"""A small C kernel for the LSTM step and the draw of one character, for batches of any size.

Why: one stream's step is a handful of matrix-vector products and some gate arithmetic; in PyTorch
each of its ~25 operations costs microseconds of Python and dispatcher overhead, which for one row
is as much as the arithmetic itself, and MKL's one-row sgemm reads the weights slower than the
machine can. One C call does a whole step (and one the draw), with the GIL released.

The source is service/engine/kernels/lstm_step.c with its header lstm_step.h (the layouts and the
functions this module binds), shipped as package data. It is compiled on first use with the system's C
compiler (`cc`, -O3; AVX2/FMA/F16C when the CPU has them (float32, and int8 by vpmaddwd), AVX512-BF16
and AVX512-VNNI when it has those too, and AMX tiles on top where it has AMX: see `VARIANTS` and
`cpu_variants`) into a cache directory, keyed by a hash of the source files' bytes and the flags; a
kernel already there is used without a compiler (the Docker image's, built in its build stage).
`chosen()` picks the build (the CHARRNN_KERNEL_BUILD setting, or the fastest this CPU's flags allow),
runs its self test in a child process before this process first steps with it (`check_build`: a build
that crashes or answers wrong there gives way to the next), and logs which build and why. If there is
none, or `CHARRNN_NATIVE=0`, `load()` returns None and the engine uses its PyTorch step; a compiler that
fails has its command and output logged as a warning.

Loading a shared library runs its code, and the cache path is computable by anyone, so a kernel is
loaded only from what this user (or root) could have written: the directory and the file must be
owned by this user or root and writable by no one else, neither may be a symbolic link, and what is
loaded is the very file checked (opened once without following links, checked with fstat, loaded
through /proc/self/fd). The cache directory is created 0700 (`build_all`'s, for an image's other
users, 0755). Anything else, or a library without the kernel's functions or built for another
layout, means a warning and the PyTorch step.

Weights stored as float16 (a checkpoint written by `charrnn export --half`, like the shipped default
model) are read as float16: every such weight converts back to the same float32, so nothing changes
but the bytes read per step, which halve. One stream's step is matrix-vector products, bound by
reading the weights (at hidden 512, 12 MB of float32 per character), so this is what makes it faster.
Arithmetic is float32 (see docs/ENGINE_INTERFACE.md on what rounding means for the text), except in the
bfloat16 build, where a batch may multiply its recurrent layers in bfloat16 (service/engine/batch.py, `bf16`;
the engine's `precision` setting): half the bytes again, and twice the products per instruction.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import platform
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# Every network's layer limit is the kernel's: the C side gets it as -DCHARRNN_MAX_LAYERS and reports it back.
from charrnn.model.config import MAX_LAYERS
from charrnn.model.cpu import cpu_flags, has_bf16_dot, has_int8_dot
from charrnn.model.decoding import Sample
from charrnn.service import config

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent / "kernels"
SOURCE_FILES = ("lstm_step.h", "lstm_step.c")  # every file the build reads; lstm_step.c is compiled
COMPILE_TIMEOUT_S = 120


class Net(ctypes.Structure):
    """Mirror of the C struct Net (service/engine/kernels/lstm_step.h): shapes and every buffer's address."""

    _fields_ = [
        ("layers", ctypes.c_int),
        ("hidden", ctypes.c_int),
        ("vocab", ctypes.c_int),
        ("capacity", ctypes.c_int),
        ("table", ctypes.c_void_p),
        ("head_w", ctypes.c_void_p),
        ("head_b", ctypes.c_void_p),
        ("w", ctypes.c_void_p * MAX_LAYERS),
        ("b", ctypes.c_void_p * MAX_LAYERS),
        ("hs", ctypes.c_void_p),
        ("cs", ctypes.c_void_p),
        ("gates", ctypes.c_void_p),
        ("logits", ctypes.c_void_p),
        ("wh", ctypes.c_void_p * MAX_LAYERS),
        ("panels", ctypes.c_void_p * MAX_LAYERS),
        ("bpanels", ctypes.c_void_p * MAX_LAYERS),
        ("xb", ctypes.c_void_p),
        ("qpanels", ctypes.c_void_p * MAX_LAYERS),
        ("qscale", ctypes.c_void_p * MAX_LAYERS),
        ("qcorr", ctypes.c_void_p * MAX_LAYERS),
        ("xq", ctypes.c_void_p),
    ]


class KernelDraw:
    """charrnn.model.decoding's plain draw made by the kernel (`charrnn_draw_rows`): every plain row of a batch
    in one call, without the GIL (a `model.decoding.FastDraw`)."""

    def __init__(self, lib: ctypes.CDLL, vocab_size: int):
        self.lib = lib
        self.vocab_size = vocab_size
        self._spare = torch.ones(vocab_size)  # the noise of steps after a row's end (see fill)
        self._spare_address = self._spare.data_ptr()
        self._grow(8)

    def _grow(self, capacity: int) -> None:
        self.capacity = capacity
        self.temperatures = torch.zeros(capacity)  # > 0 marks the rows the kernel draws
        self._temperatures = self.temperatures.numpy()
        self.noise = (ctypes.c_void_p * capacity)()
        self.ids = torch.zeros(capacity, dtype=torch.long)
        self.logprobs = torch.zeros(capacity)
        # read back through numpy: a torch slice is a tensor made and freed, and each lets the GIL go (batch.py)
        self._ids = self.ids.numpy()
        self._logprobs = self.logprobs.numpy()

    def fill(self, rows: Sequence[Sample], steps: int = 1) -> int:
        """Each row's temperature and its next `steps` noise rows (a plain row's; step s's at s * n + r) into the
        buffers the kernel reads; how many rows. A row with fewer characters `left` than `steps` gets noise for
        those, and a spare row of noise for the steps after its end (what they draw is never used); the others
        must have the noise `available` (a refill in between would overwrite the rows handed out before it)."""
        n = len(rows)
        if steps * n > self.capacity:
            self._grow(max(steps * n, 2 * self.capacity))
        for r, row in enumerate(rows):
            self._temperatures[r] = row.temperature
            if row.noise is not None:
                drawn = min(steps, row.left) if steps > 1 else 1  # one step: always the row's own noise
                for s in range(drawn):
                    self.noise[s * n + r] = row.noise.pointer()
                for s in range(drawn, steps):
                    self.noise[s * n + r] = self._spare_address
        return n

    def draw(self, logits: torch.Tensor, rows: Sequence[Sample]) -> tuple[list[int], list[float]]:
        n = self.fill(rows)
        logits = logits if logits.dtype == torch.float32 and logits.is_contiguous() else logits.float().contiguous()
        self.lib.charrnn_draw_rows(
            n,
            self.vocab_size,
            logits.data_ptr(),
            self.temperatures.data_ptr(),
            self.noise,
            self.ids.data_ptr(),
            self.logprobs.data_ptr(),
        )
        return self.drawn_ids(n), self.drawn_logprobs(n)

    def drawn_ids(self, n: int) -> list[int]:
        """The characters the last call drew for its first n rows (or n steps x rows)."""
        return self._ids[:n].tolist()

    def drawn_logprobs(self, n: int) -> list[float]:
        """The log-probabilities of the characters the last call drew for its first n rows (or n steps x rows)."""
        return self._logprobs[:n].tolist()


@dataclass(frozen=True)
class Choice:
    """The kernel build a process steps with, and why: what `chosen` found and logs at start-up."""

    build: str | None  # a key of VARIANTS; None: no kernel (the engine steps with PyTorch)
    library: ctypes.CDLL | None
    reasons: tuple[str, ...]  # a line per build looked at, the fastest first

    def describe(self) -> str:
        """One line for the log: the build, what it does, and each build looked at on the way."""
        head = f"{self.build} ({BUILD_NAMES[self.build]})" if self.build else "none (the PyTorch step)"
        return f"{head}; {'; '.join(self.reasons)}" if self.reasons else head


_loaded: dict[tuple[Path, str], Choice] = {}  # chosen()'s answers, per kernel directory and build asked for
_held_fds: list[int] = []  # the descriptors kernels were loaded through (see open_checked)


class UntrustedKernel(RuntimeError):
    """A kernel (or its directory) that someone other than this user or root could have written."""


class KernelBuildError(RuntimeError):
    """The compiler failed (its command and output are logged as a warning)."""


def native_enabled(value: str | bool | None = None) -> bool:
    """Whether the kernel may be used: `value` if given (a bool, or text as CHARRNN_NATIVE takes it),
    else the `native` setting (service/config.py)."""
    if isinstance(value, bool):
        return value
    return bool(config.setting("native", text=value))


def kernel_dir(value: str | os.PathLike[str] | None = None) -> Path:
    """Where compiled kernels are kept: `value`, else the `kernel_dir` setting, else ~/.cache/charrnn/kernels."""
    chosen = value or config.setting("kernel_dir")
    return Path(chosen) if chosen else Path.home() / ".cache" / "charrnn" / "kernels"


def load(native: str | bool | None = None, directory: str | os.PathLike[str] | None = None) -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), or None where it is off or cannot be built or trusted.

    `native` and `directory` as for `native_enabled` and `kernel_dir`; the build is `chosen`'s.
    """
    return chosen(native, directory).library


def chosen(
    native: str | bool | None = None, directory: str | os.PathLike[str] | None = None, build: str | None = None
) -> Choice:
    """The kernel build this process steps with, and why (logged once at info, or as a warning where
    there is none): `build` (else the `kernel_build` setting, CHARRNN_KERNEL_BUILD) where it is named,
    else the fastest this CPU runs. Before its first use here, a build other than the portable one runs a
    small step in a child process (`check_build`): one that crashes there (SIGILL, an instruction this CPU
    lacks) or answers wrong is skipped, and the next one is tried. A named build that fails gives way to
    the slower ones the same way. The check is a child process with no torch in it, milliseconds long.

    The answer is kept for the process, per directory and build asked for: a failed build is not retried
    (its warning is logged once), and another directory is looked at afresh.
    """
    if not native_enabled(native):
        return Choice(None, None, ("the native kernel is off (CHARRNN_NATIVE)",))
    wanted = build or config.setting("kernel_build")
    key = (kernel_dir(directory).absolute(), wanted)
    if key not in _loaded:
        try:
            choice = _choose(key[0], wanted)
            log.info("native LSTM kernel: %s", choice.describe())
        except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
            log.warning("native LSTM kernel unavailable, using the PyTorch step: %s", exc)
            choice = Choice(None, None, (str(exc),))
        _loaded[key] = choice
    return _loaded[key]


def _choose(where: Path, wanted: str) -> Choice:
    """chosen()'s search: the builds from `wanted` (or the fastest, for "auto") down to the portable one.

    Raises (OSError, RuntimeError, subprocess.SubprocessError) where none can be built, trusted and run.
    """
    if wanted != "auto" and wanted not in VARIANTS:
        raise ValueError(f"no kernel build {wanted!r}; there are {', '.join(VARIANTS)}")
    names = list(VARIANTS)
    candidates = names if wanted == "auto" else names[names.index(wanted) :]
    reasons: list[str] = []
    for build in candidates:
        lacks = _cpu_lacks(build)
        if lacks and build != wanted:
            reasons.append(f"{build} skipped: {lacks}")
            continue
        if lacks:  # asked for by name: tried all the same, safely (the check runs it in a child first)
            reasons.append(f"{build} asked for although this CPU has {lacks}")
        try:
            path = _build(build, directory=where)
        except KernelBuildError as exc:
            reasons.append(f"{build} did not build ({exc})")
            continue
        library = _bind(open_checked(path), path)
        failure = None if build == "portable" else check_build(path, _held_fds[-1])
        if failure is None and not library.charrnn_init():
            failure = "the operating system refused what it needs (for AMX: arch_prctl ARCH_REQ_XCOMP_PERM)"
        if failure is not None:
            reasons.append(f"{build} skipped: {failure}")
            log.warning("the %s kernel build is not used: %s", build, failure)
            continue
        reasons.append(f"{build} {'asked for (CHARRNN_KERNEL_BUILD)' if build == wanted else 'chosen'}")
        return Choice(build, library, tuple(reasons))
    raise RuntimeError("no build of the kernel runs here: " + "; ".join(reasons))


CHECK_TIMEOUT_S = 60
# The child of check_build: Python without site or environment (it starts in milliseconds, no torch), loading
# the very file the parent checked (an inherited descriptor) and running its self test.
CHECK_CHILD = """
import ctypes, sys
library = ctypes.CDLL(sys.argv[1])
library.charrnn_self_test.restype = ctypes.c_char_p
problem = library.charrnn_self_test()
sys.exit(problem.decode() if problem else 0)
"""


def check_build(path: Path, fd: int | None = None) -> str | None:
    """None if the kernel build at `path` passes its self test (`charrnn_self_test`: its products in each
    arithmetic it has against a float64 reference, a row alone against the same row in a batch, whole
    steps) in a child process; else what went wrong there (a signal such as SIGILL, what the test found,
    a timeout). `fd`, an open descriptor of that file (`open_checked`'s), is what the child loads. A pass
    is remembered beside the library, per CPU, where the directory is ours to write: the next process
    skips the child."""
    marker = path.with_name(f"{path.name}.checked-{_cpu_key()}")
    if marker.exists():
        return None
    target, fds = (
        (f"/proc/self/fd/{fd}", (fd,)) if fd is not None and os.path.exists("/proc/self/fd") else (str(path), ())
    )
    command = [sys.executable, "-I", "-S", "-c", CHECK_CHILD, target]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, pass_fds=fds)
    except subprocess.TimeoutExpired:
        return f"its check gave no answer in {CHECK_TIMEOUT_S} s"
    if result.returncode < 0:
        return f"its check was killed by {signal.Signals(-result.returncode).name}"
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return f"its check failed: {lines[-1] if lines else f'exit status {result.returncode}'}"
    with contextlib.suppress(OSError):  # a directory of someone else's (an image's): checked again next time
        marker.write_text("passed\n")
    return None


def _cpu_key() -> str:
    """A short hash of this CPU's model name and flags: a check passed on one CPU says nothing of another."""
    try:
        models = {line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")}
    except OSError:
        models = set()
    return hashlib.sha256(repr((sorted(models), sorted(cpu_flags()))).encode()).hexdigest()[:12]


def open_kernel(simd: bool | str | None = None, directory: str | os.PathLike[str] | None = None) -> ctypes.CDLL:
    """The kernel build `simd` (see `_variant`; None: this CPU's best), built into `directory` if not
    there yet, loaded and bound. With None, a build the compiler refuses (an old compiler without
    -mavx512bf16) gives way to the next one this CPU runs.

    Raises (OSError, RuntimeError, subprocess.SubprocessError) where it cannot be built or trusted;
    `load()` is the forgiving, cached form of this.
    """
    variants = cpu_variants() if simd is None else [_variant(simd)]
    for variant in variants[:-1]:
        try:
            path = _build(variant, directory=directory)
        except KernelBuildError as exc:
            log.warning("the %s kernel did not build (%s); trying the next one this CPU runs", variant, exc)
            continue
        return _init(_bind(open_checked(path), path), path)
    path = _build(variants[-1], directory=directory)
    return _init(_bind(open_checked(path), path), path)


def _init(library: ctypes.CDLL, path: Path) -> ctypes.CDLL:
    """`library` once it has what it needs from the OS (`charrnn_init`); RuntimeError if refused."""
    if not library.charrnn_init():
        raise RuntimeError(f"{path}: the operating system refused what this build needs (AMX tile state)")
    return library


def build_all(directory: str | os.PathLike[str] | None = None) -> list[Path]:
    """Compile every build this architecture has (bf16, AVX2/FMA/F16C and portable) into the cache.

    For an image built on one machine and run on others (the Dockerfile's build stage): a runtime CPU
    finds the build it runs (a CPU without AVX2 its portable kernel, one with AVX512-BF16 the bfloat16
    one) instead of falling back to the PyTorch step. The directory, if this creates it, is readable by
    every user (0755): the image runs as another user.
    """
    variants = list(VARIANTS) if platform.machine().lower() in ("x86_64", "amd64") else ["portable"]
    built = []
    for variant in variants:
        try:
            built.append(_build(variant, dir_mode=0o755, directory=directory))
        except KernelBuildError:
            if variant != "amx":  # an older compiler without -mamx-tile: AMX CPUs use the bfloat16 build
                raise
    return built


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


# The kernel's builds, from the most capable: what each asks of the CPU is what its flags let the compiler use.
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
# + bfloat16 dot products (vdpbf16ps) and int8 ones (vpdpbusd): every CPU with AVX512-BF16 has AVX512-VNNI
_BF16 = [*_AVX2, "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512bf16", "-mavx512vnni"]
VARIANTS = {
    # the bfloat16 and int8 products of many rows by AMX tiles (_tile_dpbf16ps, _tile_dpbusd)
    "amx": [*_BF16, "-mamx-tile", "-mamx-bf16", "-mamx-int8"],
    "bf16": _BF16,
    "avx2": _AVX2,
    "portable": [],
}
# What each build does, for the log.
BUILD_NAMES = {
    "amx": "AMX tiles for bfloat16 and int8 products",
    "bf16": "AVX512-BF16 dot products",
    "avx2": "AVX2/FMA: float32, int8 by vpmaddwd",
    "portable": "portable C, float32",
}


def _cpu_has_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _cpu_has_amx() -> bool:
    """AMX tiles with bfloat16 and int8 (amx_tile, amx_bf16, amx_int8 in /proc/cpuinfo); Linux must still grant
    the tile state."""
    return {"amx_tile", "amx_bf16", "amx_int8"} <= cpu_flags()


def cpu_variants() -> list[str]:
    """The builds this CPU runs, the fastest first (a build the compiler refuses falls to the next)."""
    return [build for build in VARIANTS if _cpu_lacks(build) is None]


def _cpu_lacks(build: str) -> str | None:
    """Why this CPU cannot run `build`, or None if it can."""
    if build == "portable":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"this is {platform.machine()}, not x86-64"
    if not _cpu_has_avx2():
        return "no AVX2/FMA"
    if build != "avx2" and not has_bf16_dot():
        return "no AVX512-BF16 (avx512_bf16 in /proc/cpuinfo)"
    if build != "avx2" and not has_int8_dot():
        return "no AVX512-VNNI (avx512_vnni in /proc/cpuinfo)"
    if build == "amx" and not _cpu_has_amx():
        return "no AMX tiles (amx_tile, amx_bf16, amx_int8 in /proc/cpuinfo)"
    return None


def _variant(simd: bool | str | None) -> str:
    """A build's name from `simd`: None, this CPU's best; True, AVX2; False, portable; or the name itself."""
    if simd is None:
        return cpu_variants()[0]
    if isinstance(simd, bool):
        return "avx2" if simd else "portable"
    if simd not in VARIANTS:
        raise ValueError(f"no kernel build {simd!r}; there are {', '.join(VARIANTS)}")
    return simd


def _flags(simd: bool | str | None) -> list[str]:
    return [
        "-O3",
        "-fPIC",
        "-shared",
        "-pthread",  # the helper threads that share a step's products
        "-fno-math-errno",
        f"-DCHARRNN_MAX_LAYERS={MAX_LAYERS}",
        *VARIANTS[_variant(simd)],
    ]


def sources() -> dict[str, bytes]:
    """The kernel's source files, name -> bytes, as shipped in service/engine/kernels."""
    return {name: (SOURCE_DIR / name).read_bytes() for name in SOURCE_FILES}


def _build(
    simd: bool | str | None = None, dir_mode: int = 0o700, directory: str | os.PathLike[str] | None = None
) -> Path:
    """Compile the sources into the cache (once per source and flags); concurrent builders are harmless.

    `simd` as for `_variant` (None: the best build this CPU runs, see `cpu_variants`). The cache
    directory is created with `dir_mode`, and an existing one must be trusted (see `open_checked`).
    What is compiled is a copy of the very bytes the cache key was computed from.
    """
    flags = _flags(simd)
    code = sources()
    target = _kernel_path(flags, code, directory)
    if os.path.lexists(target):  # built earlier, maybe elsewhere (the Docker image's build stage): no compiler needed
        return target  # checked when it is opened
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise RuntimeError("no C compiler (cc) on PATH")
    _make_dir(target.parent, dir_mode)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        for name, data in code.items():
            (Path(tmp) / name).write_bytes(data)
        out = Path(tmp) / target.name
        _compile([compiler, *flags, "-o", str(out), str(Path(tmp) / "lstm_step.c"), "-lm"])
        out.chmod(0o755)  # whatever the umask: writable by its owner only, or it would not be loaded
        os.replace(out, target)  # atomic: another worker sees the old state or the whole file
    return target


def _compile(command: list[str]) -> None:
    """Run the compiler; on failure log its command and output (warning) and raise KernelBuildError."""
    shown = shlex.join(command)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.warning("compiling the native kernel took over %d s, given up: %s", COMPILE_TIMEOUT_S, shown)
        raise KernelBuildError(f"the compiler ran over {COMPILE_TIMEOUT_S} s") from None
    output = (result.stderr + result.stdout).strip()
    if result.returncode != 0:
        log.warning(
            "compiling the native kernel (a copy of %s) failed with exit status %d: %s\n%s",
            SOURCE_DIR / "lstm_step.c",
            result.returncode,
            shown,
            output or "(no output)",
        )
        raise KernelBuildError(f"the compiler failed with exit status {result.returncode} (its output is logged above)")
    if output:
        log.debug("the compiler's output for the native kernel: %s\n%s", shown, output)


def kernel_path(simd: bool | str | None = None, directory: str | os.PathLike[str] | None = None) -> Path:
    """Where the kernel build `simd` (None: this CPU's best) is kept: named by a hash of the sources and flags."""
    return _kernel_path(_flags(simd), sources(), directory)


def _kernel_path(flags: list[str], code: dict[str, bytes], directory: str | os.PathLike[str] | None) -> Path:
    """The kernel's file in `directory`, named by a hash of every source file (name and bytes) and the flags."""
    digest = hashlib.sha256()
    for name, data in code.items():
        digest.update(b"%s\0%d\0" % (name.encode(), len(data)) + data)
    digest.update(" ".join(flags).encode())
    return kernel_dir(directory) / f"lstm_step_{digest.hexdigest()[:16]}.so"


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


KERNEL_FUNCTIONS = (
    "charrnn_lstm_step",
    "charrnn_draw",
    "charrnn_draw_rows",
    "charrnn_draw_step",
    "charrnn_half_to_float",
    "charrnn_has_bf16",
    "charrnn_max_layers",
    "charrnn_set_threads",
    "charrnn_net_size",
    "charrnn_build",
    "charrnn_init",
    "charrnn_has_int8",
    "charrnn_set_int8_tile_rows",
    "charrnn_self_test",
    "charrnn_small_products_shared",
    "charrnn_small_trials",
    "charrnn_set_small_retrial",
    "charrnn_join_board",
    "charrnn_board_share",
    "charrnn_board_idle",
    "charrnn_helper_products",
)


def _bind(lib: ctypes.CDLL, path: Path) -> ctypes.CDLL:
    """`lib` with the kernel functions' signatures set; RuntimeError if it lacks any or has another layout."""
    missing = [name for name in KERNEL_FUNCTIONS if not hasattr(lib, name)]
    if missing:
        raise RuntimeError(f"{path} is not this kernel: it lacks {', '.join(missing)}")
    lib.charrnn_max_layers.argtypes = []
    lib.charrnn_max_layers.restype = ctypes.c_int
    lib.charrnn_net_size.argtypes = []
    lib.charrnn_net_size.restype = ctypes.c_size_t
    layout = (lib.charrnn_max_layers(), lib.charrnn_net_size())
    if layout != (MAX_LAYERS, ctypes.sizeof(Net)):
        raise RuntimeError(
            f"{path} was built for another layout (up to {layout[0]} layers, a {layout[1]}-byte Net;"
            f" this code has {MAX_LAYERS} and {ctypes.sizeof(Net)})"
        )
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
    lib.charrnn_draw_step.argtypes = [ctypes.POINTER(Net), ctypes.c_int, ctypes.c_int, *[ctypes.c_void_p] * 4]
    lib.charrnn_draw_step.restype = None
    lib.charrnn_half_to_float.argtypes = [ctypes.c_uint16]
    lib.charrnn_half_to_float.restype = ctypes.c_float
    lib.charrnn_has_bf16.argtypes = []
    lib.charrnn_has_bf16.restype = ctypes.c_int
    lib.charrnn_build.argtypes = []
    lib.charrnn_build.restype = ctypes.c_char_p
    lib.charrnn_init.argtypes = []
    lib.charrnn_init.restype = ctypes.c_int
    lib.charrnn_has_int8.argtypes = []
    lib.charrnn_has_int8.restype = ctypes.c_int
    lib.charrnn_set_int8_tile_rows.argtypes = [ctypes.c_int]
    lib.charrnn_set_int8_tile_rows.restype = ctypes.c_int
    lib.charrnn_self_test.argtypes = []
    lib.charrnn_self_test.restype = ctypes.c_char_p
    lib.charrnn_set_threads.argtypes = [ctypes.c_int]
    lib.charrnn_set_threads.restype = ctypes.c_int
    lib.charrnn_small_products_shared.argtypes = []
    lib.charrnn_small_products_shared.restype = ctypes.c_int
    lib.charrnn_small_trials.argtypes = []
    lib.charrnn_small_trials.restype = ctypes.c_int
    lib.charrnn_set_small_retrial.argtypes = [ctypes.c_long]
    lib.charrnn_set_small_retrial.restype = ctypes.c_long
    lib.charrnn_join_board.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.charrnn_join_board.restype = ctypes.c_int
    lib.charrnn_board_share.argtypes = []
    lib.charrnn_board_share.restype = ctypes.c_int
    lib.charrnn_board_idle.argtypes = []
    lib.charrnn_board_idle.restype = None
    lib.charrnn_helper_products.argtypes = [ctypes.c_int]
    lib.charrnn_helper_products.restype = ctypes.c_long
    return lib
