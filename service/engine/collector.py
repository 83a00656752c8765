"""Python's garbage collector in a process that serves.

The cycle collector walks every object it tracks in its oldest generation once in a while, and a serving
process tracks ~300,000 of them before its first request (torch, Flask, the models). Measured on an Intel
Xeon with AMX (2 cores, the default model, 128 jobs on the engine alone): the collector took ~10 % of the
process's CPU (gc_collect_main, visit_decref, visit_reachable in perf), and freezing what exists once the
service is built, with the youngest generation collected every 10,000 allocations instead of 700, served
1.12x the characters a second (docs/BENCHMARKS.md). What is frozen still goes by reference counting, as
every model does when hot reload replaces it; only a cycle among frozen objects would outlive its use,
and the service builds none after start-up that it later drops.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000  # allocations less deallocations of tracked objects between two young collections


def settle_for_serving() -> None:
    """Collect once, freeze every object that exists now (gc.freeze: never walked again) and collect the
    youngest generation less often. For a process that has built what it serves with: a Gunicorn worker once
    its app is built (service/web/gunicorn_conf.py), a benchmark's engine."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
