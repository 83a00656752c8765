"""Hot reload in the engine: models swapped under running generations, and the model directory's checks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from charrnn.model.checkpoint import save_checkpoint
from charrnn.model.decoding import SamplingParams
from charrnn.service.engine import reloading
from charrnn.service.engine.loading import LoadedModel, load_models
from charrnn.service.engine.reloading import ModelDirectory, Watcher
from charrnn.service.engine.scheduler import Engine, JobSpec
from charrnn.service.reload_signal import make_signal_file
from tests.helpers import publish, tiny_model, wait_until

LONG = 20_000  # characters: a generation still running when the test swaps its model (seconds here)


def run_alone(loaded: LoadedModel, spec: JobSpec) -> list[str]:
    """The characters `spec` gives on an engine serving only `loaded`."""
    engine = Engine({loaded.name: loaded}, native=False)
    engine.start()
    try:
        tokens, reason = engine.submit(spec).result(timeout=120)
    finally:
        engine.close()
    assert reason == "length"
    return [t.char for t in tokens]


@pytest.fixture
def engine() -> Iterator[Engine]:
    engine = Engine({}, native=False)
    engine.start()
    yield engine
    engine.close(timeout=5)


def test_a_generation_in_flight_finishes_on_the_model_it_started_with(engine: Engine) -> None:
    old, new = tiny_model(seed=0), tiny_model(seed=1)
    engine.replace_models({"lstm": old})
    spec = JobSpec("lstm", (), LONG, SamplingParams(temperature=1.0), seed=3)
    job = engine.submit(spec)
    next(job.chunks())  # it has started
    engine.replace_models({"lstm": new})
    assert job.finish_reason is None, "the generation ended before the swap: make it longer"
    after = engine.submit(JobSpec("lstm", (), 300, SamplingParams(temperature=1.0), seed=3))
    tokens, reason = job.result(timeout=120)
    assert reason == "length"
    assert [t.char for t in tokens] == run_alone(old, spec)
    assert [t.char for t in after.result(timeout=60)[0]] == run_alone(new, after.spec)


def test_a_job_given_its_model_object_runs_it_even_once_another_is_served(engine: Engine) -> None:
    old, new = tiny_model(seed=0), tiny_model(seed=1)
    engine.replace_models({"lstm": new})
    spec = JobSpec("lstm", (), 200, SamplingParams(temperature=1.0), seed=5, loaded=old)
    assert [t.char for t in engine.submit(spec).result(timeout=60)[0]] == run_alone(old, spec)


def test_the_batch_and_cached_prompts_of_a_model_no_longer_served_are_dropped(engine: Engine) -> None:
    old, new = tiny_model(seed=0), tiny_model(seed=1)
    engine.replace_models({"lstm": old})
    engine.submit(JobSpec("lstm", (1, 2, 3), 20, SamplingParams(temperature=1.0), seed=1)).result(timeout=60)
    assert old.key in engine._batches and len(engine.prompt_cache) == 1
    engine.replace_models({"lstm": new})
    wait_until(lambda: old.key not in engine._batches, 10, "the old model's batch to go")
    assert len(engine.prompt_cache) == 0


def test_a_retired_models_batch_ends_with_its_last_job_and_its_cache_is_cleared_once(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = tiny_model(seed=0), tiny_model(seed=1)
    engine.replace_models({"lstm": old})
    engine.submit(JobSpec("lstm", (1, 2, 3), 20, SamplingParams(temperature=1.0), seed=1)).result(timeout=60)
    scans: list[Callable[[str], bool]] = []
    discard = engine.prompt_cache.discard

    def counted(gone: Callable[[str], bool]) -> None:
        scans.append(gone)
        discard(gone)

    monkeypatch.setattr(engine.prompt_cache, "discard", counted)  # the real discard, counted
    running = engine.submit(JobSpec("lstm", (), LONG, SamplingParams(temperature=1.0), seed=3))
    next(running.chunks())  # it has started
    engine.replace_models({"lstm": new})
    wait_until(lambda: len(engine.prompt_cache) == 0, 30, "the retired model's cached prompts to go")
    assert running.finish_reason is None, "the generation ended before the swap: make it longer"
    assert old.key in engine._batches  # its job still runs
    late = JobSpec("lstm", (4, 5, 6), 5, SamplingParams(temperature=1.0), seed=2, loaded=old)
    assert engine.submit(late).result(timeout=60)[1] == "length"  # joins the retired batch; its prompt is not cached
    running.cancel()
    wait_until(lambda: old.key not in engine._batches, 30, "the retired model's batch to go once its jobs end")
    assert len(scans) == 1  # the cache was scanned once, not at every step of the retired batch
    assert len(engine.prompt_cache) == 0


def test_a_removed_model_is_unknown_to_new_jobs(engine: Engine) -> None:
    engine.replace_models({"lstm": tiny_model()})
    engine.replace_models({})
    with pytest.raises(KeyError):
        engine.submit(JobSpec("lstm", (), 10, SamplingParams(), seed=0))


# -- the model directory ---------------------------------------------------------------------------------


@pytest.fixture
def models(model_dir: Path, tmp_path: Path) -> Path:
    """A model directory of its own holding the tiny checkpoint."""
    directory = tmp_path / "models"
    directory.mkdir()
    shutil.copy(model_dir / "tiny.safetensors", directory / "tiny.safetensors")
    return directory


@pytest.fixture
def served(models: Path, engine: Engine) -> ModelDirectory:
    entries = load_models(models)
    engine.replace_models({e.name: e.loaded for e in entries if e.loaded is not None})
    return ModelDirectory(models, entries, engine)


def changes(directory: ModelDirectory, trigger: str = "watch") -> list[tuple[str, str]]:
    return [(c.name, c.kind) for c in directory.check(trigger).changes]


def test_a_check_adds_replaces_and_removes_models(served: ModelDirectory, models: Path, engine: Engine) -> None:
    assert changes(served) == []
    first = engine.models["tiny"]
    publish(models / "tiny.safetensors", models / "second.safetensors", step=7)
    assert changes(served) == [("second", "added")]
    assert engine.models["tiny"] is first  # an unchanged file is not read again
    assert engine.models["second"].meta["step"] == 7
    publish(models / "tiny.safetensors", models / "second.safetensors", step=8)
    assert changes(served) == [("second", "replaced")]
    assert engine.models["second"].meta["step"] == 8
    (models / "second.safetensors").unlink()
    assert changes(served) == [("second", "removed")]
    assert set(engine.models) == {"tiny"}


def test_a_run_directory_is_served_by_its_name(served: ModelDirectory, models: Path, engine: Engine) -> None:
    (models / "run").mkdir()
    publish(models / "tiny.safetensors", models / "run" / "best.safetensors", step=3)
    assert changes(served) == [("run", "added")]
    assert engine.models["run"].meta["step"] == 3


def test_a_broken_file_never_replaces_a_served_model(served: ModelDirectory, models: Path, engine: Engine) -> None:
    served_before = engine.models["tiny"]
    broken = models / ".tiny.safetensors.tmp-0001"
    broken.write_bytes((models / "tiny.safetensors").read_bytes()[:500])  # a half-written file
    assert changes(served) == []  # a temporary name is never read
    os.replace(broken, models / "tiny.safetensors")
    report = served.check("watch")
    assert [(c.name, c.kind) for c in report.changes] == [("tiny", "failed")]
    assert engine.models["tiny"] is served_before
    (entry,) = served.entries
    assert entry.loaded is served_before and entry.error == report.changes[0].error
    assert "still serving the model loaded earlier" in entry.describe()["error"]
    assert entry.describe()["status"] == "loaded"
    assert changes(served) == []  # the same broken file is not read again
    save_checkpoint(models / "tiny.safetensors", served_before.model, served_before.vocab, {"step": 2})
    assert changes(served) == [("tiny", "replaced")]  # fixed: served again, the error gone
    assert served.entries[0].error is None


def test_a_broken_new_file_is_listed_with_its_error_and_not_served(served: ModelDirectory, models: Path) -> None:
    (models / "junk.safetensors").write_bytes(b"not a checkpoint")
    report = served.check("watch")
    assert [(c.name, c.kind) for c in report.changes] == [("junk", "failed")]
    junk = next(e for e in served.entries if e.name == "junk")
    assert junk.loaded is None and junk.describe()["status"] == "failed"
    assert "junk" not in served.engine.models
    (models / "junk.safetensors").unlink()
    assert changes(served) == []  # nothing served went away
    assert [e.name for e in served.entries] == ["tiny"]


def test_an_unreadable_directory_keeps_what_is_served(served: ModelDirectory, models: Path, engine: Engine) -> None:
    moved = models.with_name("elsewhere")
    models.rename(moved)
    report = served.check("watch")
    assert report.error is not None and "cannot read the model directory" in report.error
    assert set(engine.models) == {"tiny"}


# -- the watcher -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("events", ["inotify", "poll"])
def test_the_watcher_notices_a_new_checkpoint(
    served: ModelDirectory, models: Path, engine: Engine, events: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if events == "poll":
        monkeypatch.setattr(reloading._Events, "open", classmethod(lambda cls, *args: None))
    watcher = Watcher(served, interval=0.5)
    watcher.start()
    try:
        wait_until(lambda: watcher._thread is not None and (watcher.inotify or events == "poll"), 10, "the watcher")
        publish(models / "tiny.safetensors", models / "new.safetensors", step=1)
        wait_until(lambda: "new" in engine.models, 10, f"the watcher ({events}) to load the new checkpoint")
        (models / "run").mkdir()  # a training run's directory made after the watcher started
        publish(models / "tiny.safetensors", models / "run" / "best.safetensors", step=2)
        wait_until(lambda: "run" in engine.models, 10, f"the watcher ({events}) to load a run's checkpoint")
    finally:
        watcher.stop()


def raise_from_another_process(signal: Path) -> None:
    """Rewrite the signal file from another process, as another worker or Gunicorn's master does."""
    code = (
        "import sys, pathlib; from charrnn.service.reload_signal import raise_signal; "
        "raise_signal(pathlib.Path(sys.argv[1]))"
    )
    subprocess.run([sys.executable, "-c", code, str(signal)], check=True, timeout=120)


def test_another_process_signal_makes_the_watcher_check_and_its_own_does_not(
    served: ModelDirectory, tmp_path: Path
) -> None:
    signal = make_signal_file(str(tmp_path))
    reports: list[str] = []
    served.listeners.append(lambda report: reports.append(report.trigger))
    watcher = Watcher(served, interval=5.0, signal_files=(signal,))
    watcher.start()
    try:
        wait_until(lambda: watcher.inotify, 30, "the watcher to start")
        raise_from_another_process(signal)
        wait_until(lambda: "signal" in reports, 30, "a check asked for by the signal file")
        watcher.signal_others()  # as POST /admin/reload does, once this process has checked
        own = signal.read_bytes()
        wait_until(lambda: watcher._signals[signal] == own, 30, "the watcher to read this process's own signal")
        raise_from_another_process(signal)  # the watcher handles its wakes in order: this one comes after
        wait_until(lambda: reports.count("signal") == 2, 30, "a check asked for by the second signal")
        assert reports == ["signal", "signal"]  # none for its own signal, and no "watch" check for that wake
    finally:
        watcher.stop()


def test_only_an_event_in_the_model_directory_wakes_the_watcher_as_a_change(models: Path, tmp_path: Path) -> None:
    signal = make_signal_file(str(tmp_path))
    wake_r, wake_w = os.pipe()
    events = reloading._Events.open(models, [signal.parent], wake_r)
    if events is None:
        pytest.skip("no inotify here")
    try:
        (signal.parent / "unrelated").write_bytes(b"x")  # what raise_signal does there, without a signal
        assert events.wait(60) is False  # woken, but no change to check for
        (models / "run").mkdir()
        assert events.wait(60) is True
    finally:
        events.close()
        os.close(wake_r)
        os.close(wake_w)


def watch_descriptors() -> set[tuple[str, str]]:
    """This process's open pipes and inotify instances, the kinds of descriptor a Watcher makes."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own descriptor, or another thread's)
            continue
        if target.startswith(("pipe:", "anon_inode:inotify")):
            found.add((fd, target))
    return found


def descriptors_back_to(before: set[tuple[str, str]]) -> bool:
    # Other threads of this process (an engine, torch's) may hold a descriptor for a moment: a leak stays.
    return watch_descriptors() == before


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="lists descriptors through /proc")
def test_a_watcher_leaves_no_descriptor_open(served: ModelDirectory, tmp_path: Path) -> None:
    before = watch_descriptors()
    Watcher(served, interval=5.0).stop()  # made and stopped, never started
    wait_until(lambda: descriptors_back_to(before), 30, lambda: f"{watch_descriptors() - before} left open")
    watcher = Watcher(served, interval=5.0, signal_files=(make_signal_file(str(tmp_path)),))
    watcher.start()
    wait_until(lambda: watcher.inotify, 30, "the watcher to start")
    assert watch_descriptors() - before  # it holds its pipe (and inotify) while it runs
    watcher.stop()
    assert not watcher._thread.is_alive()
    wait_until(lambda: descriptors_back_to(before), 30, lambda: f"{watch_descriptors() - before} left open")


def test_two_files_of_one_name_are_not_reloaded_at_every_check(models: Path, engine: Engine) -> None:
    (models / "tiny").mkdir()
    shutil.copy(models / "tiny.safetensors", models / "tiny" / "best.safetensors")
    entries = load_models(models)
    assert [e.error is None for e in entries] == [True, False]  # the second is listed with its error
    engine.replace_models({e.name: e.loaded for e in entries if e.loaded is not None})
    directory = ModelDirectory(models, entries, engine)
    served = engine.models["tiny"]
    assert changes(directory) == [] and engine.models["tiny"] is served
