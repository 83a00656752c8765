"""The garbage collector of a serving process (service/engine/collector.py), tried in a child process: freezing
is for the rest of a process's life, and this one runs the other tests."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.helpers import REPO

CHILD = textwrap.dedent(
    """
    import gc, weakref
    from charrnn.service.engine.collector import YOUNG_THRESHOLD, settle_for_serving
    from tests.helpers import tiny_model

    class Node:
        pass

    kept = [Node() for _ in range(1000)]
    loaded = [tiny_model()]  # a model served from the start, replaced later (hot reload)
    settle_for_serving()
    assert gc.get_freeze_count() > len(kept)  # what existed is frozen: no longer walked by the collector
    assert not any(isinstance(thing, Node) for thing in gc.get_objects())
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD and gc.isenabled()
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle made after: still collected
    gone = weakref.ref(a)
    del a, b
    assert gone() is not None
    gc.collect()
    assert gone() is None
    replaced = weakref.ref(loaded[0].model)
    loaded[0] = tiny_model(seed=1)
    gc.collect()
    assert replaced() is None  # frozen, and still freed once nothing holds it
    print("ok")
    """
)


def test_a_serving_process_freezes_what_it_has_built_and_still_collects_new_cycles() -> None:
    result = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
