"""What this CPU offers, from the flags Linux lists in /proc/cpuinfo (none elsewhere)."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (avx2, avx512_bf16, ...); empty where /proc/cpuinfo cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def has_bf16_dot() -> bool:
    """Whether the CPU multiplies bfloat16 pairs natively into float32 sums (AVX512-BF16's vdpbf16ps), with
    the AVX-512 subsets the kernel's bfloat16 build is compiled for (-mavx512bf16 implies AVX512BW)."""
    return {"avx512f", "avx512vl", "avx512bw", "avx512_bf16"} <= cpu_flags()


def has_int8_dot() -> bool:
    """Whether the CPU multiplies quads of 8-bit integers into 32-bit sums (AVX512-VNNI's vpdpbusd), as the
    kernel's int8 arithmetic does."""
    return {"avx512f", "avx512bw", "avx512_vnni"} <= cpu_flags()
