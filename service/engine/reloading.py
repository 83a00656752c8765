"""Hot reload: the model directory is checked while the engine runs, and what changed is swapped in.

    NAME.safetensors renamed into DIR
        -> the watcher wakes: an inotify event, or its next poll (every `interval` seconds)
        -> ModelDirectory.check(): stat every checkpoint; load the new and changed ones
        -> Engine.replace_models(): new requests get the new model objects; a generation in flight
           keeps the object it started with until it ends (models are swapped, never changed)

Publishing a checkpoint: write it under a temporary name in DIR (a hidden name, or one holding ".tmp-":
never read), then rename it to NAME.safetensors, or RUN/best.safetensors, with os.replace (atomic within
one filesystem; model/atomic.py and `charrnn train` do this). A file that fails to load never replaces
a served model: the old one stays, /models shows the error, and the file is read again when it changes.
A file that is removed stops being served.

With Gunicorn each worker has its own engine, directory and watcher. Whoever asks for a check of every
worker (POST /admin/reload in one worker, SIGHUP to the master) rewrites a shared signal file that every
other watcher also watches (service/reload_signal.py); the file names its writer, so the asker's own
watcher does not check a second time. Nothing here imports the web layer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charrnn.service.engine.loading import (
    Fingerprint,
    ModelEntry,
    find_checkpoints,
    fingerprint,
    fingerprint_or_none,
    load_one,
)
from charrnn.service.engine.scheduler import Engine
from charrnn.service.engine.thread_names import WATCHER_THREAD, name_os_thread
from charrnn.service.reload_signal import raise_signal, read_signal, sender

log = logging.getLogger(__name__)

CHANGES = ("added", "replaced", "removed", "failed")
TRIGGERS = ("watch", "request", "signal")  # a change seen by the watcher; asked of this process; of all
# After an inotify event, wait this long for the events that follow it (a rename and the directory's
# own update, a run directory's files) so that one check sees them all.
SETTLE_SECONDS = 0.1


@dataclass(frozen=True)
class Change:
    """What one check did to one name: added, replaced, removed, or failed (with the file's error)."""

    name: str
    kind: str
    error: str | None = None


@dataclass(frozen=True)
class CheckReport:
    """One check of the model directory: why it ran, what changed, how long it took."""

    trigger: str
    changes: tuple[Change, ...]
    seconds: float
    error: str | None = None  # the directory itself could not be read (nothing changed)

    def describe(self) -> dict[str, Any]:
        """The report as JSON (POST /admin/reload answers it)."""
        changes = [{k: v for k, v in dataclasses.asdict(c).items() if v is not None} for c in self.changes]
        body: dict[str, Any] = {"trigger": self.trigger, "changes": changes, "seconds": round(self.seconds, 4)}
        return body if self.error is None else body | {"error": self.error}


class ModelDirectory:
    """The checkpoints of one directory as the engine serves them; `check()` brings them up to date."""

    def __init__(self, path: Path, entries: list[ModelEntry], engine: Engine):
        self.path = path
        self.entries = list(entries)  # replaced whole by check(), never changed in place: readers need no lock
        self.engine = engine
        self.listeners: list[Callable[[CheckReport], None]] = []  # called after every check (metrics)
        self.checked_at = time.time()
        self._lock = threading.Lock()  # one check at a time

    def check(self, trigger: str) -> CheckReport:
        """Load what was added or changed, drop what was removed, and serve the result; never raises for a bad file."""
        with self._lock:
            started = time.monotonic()
            try:
                entries, changes = self._scan()
                error = None
            except OSError as exc:  # the directory itself: unmounted, renamed, unreadable
                entries, changes, error = self.entries, [], f"cannot read the model directory: {exc.strerror or exc}"
                log.error("model directory %s: %s; still serving what was loaded", self.path, error)
            served = {e.name: e.loaded for e in entries if e.loaded is not None}
            if _identities(served) != _identities(self.engine.models):
                self.engine.replace_models(served)
            self.entries = entries
            self.checked_at = time.time()
            report = CheckReport(trigger, tuple(changes), time.monotonic() - started, error)
        for change in report.changes:
            log.info("model %s: %s%s", change.name, change.kind, f" ({change.error})" if change.error else "")
        for listener in self.listeners:
            listener(report)
        return report

    def fingerprints(self) -> dict[str, Fingerprint | None]:
        """The fingerprint each name's file was read with (the first file of a name, as check() reads them)."""
        found: dict[str, Fingerprint | None] = {}
        for entry in self.entries:
            found.setdefault(entry.name, entry.fingerprint)
        return found

    def _scan(self) -> tuple[list[ModelEntry], list[Change]]:
        old: dict[str, ModelEntry] = {}
        for entry in self.entries:
            old.setdefault(entry.name, entry)  # a second file of one name is listed at start, never served
        entries: list[ModelEntry] = []
        changes: list[Change] = []
        for name, path in find_checkpoints(self.path):
            if any(e.name == name for e in entries):
                continue  # the first of two files with one name is served (load_models says so at start)
            entry, change = self._check_one(name, path, old.get(name))
            if entry is not None:
                entries.append(entry)
            if change is not None:
                changes.append(change)
        kept = {e.name for e in entries}
        changes += [Change(name, "removed") for name, e in old.items() if name not in kept and e.loaded is not None]
        return entries, changes

    def _check_one(self, name: str, path: Path, old: ModelEntry | None) -> tuple[ModelEntry | None, Change | None]:
        """The entry for `name` now, and what changed (None: nothing)."""
        try:
            seen = fingerprint(path)
        except OSError:  # gone between listing and stat: as if it had not been found
            return None, None
        if old is not None and old.path == path and old.fingerprint == seen:
            return old, None
        entry = dataclasses.replace(load_one(name, path), fingerprint=seen)
        if entry.loaded is not None:
            return entry, Change(name, "replaced" if old is not None and old.loaded is not None else "added")
        if old is not None and old.loaded is not None:  # never replace a served model by a broken file
            entry = dataclasses.replace(entry, loaded=old.loaded)
        return entry, Change(name, "failed", entry.error)


class Watcher:
    """A thread that checks a ModelDirectory when it changes: inotify events where the kernel has them,
    and a poll every `interval` seconds in any case (network and bind mounts may send no events), and when
    another process rewrites one of `signal_files` (it asks for a check)."""

    def __init__(self, directory: ModelDirectory, interval: float, signal_files: tuple[Path, ...] = ()):
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.directory = directory
        self.interval = interval
        self.signal_files = signal_files
        self.inotify = False  # whether events wake it (set once the thread has started)
        # what each signal file held when the watcher thread last read it (that thread alone writes it)
        self._signals = {path: read_signal(path) for path in signal_files}
        self._stop = threading.Event()
        self._wake_w: int | None = None  # stop() writes to it: the thread wakes from its wait at once
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start watching (idempotent; a stopped watcher stays stopped)."""
        if self._thread is None and not self._stop.is_set():
            wake_r, self._wake_w = os.pipe()  # made here, so that a watcher never started holds no descriptor
            self._thread = threading.Thread(target=self._run, args=(wake_r,), name=WATCHER_THREAD, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop watching (at once, unless a check is running); idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None and self._wake_w is not None:
            try:
                os.write(self._wake_w, b"x")
            except BrokenPipeError:  # the thread saw the stop on its own, and has closed its end already
                pass
            self._thread.join(self.interval + 1.0)
            os.close(self._wake_w)  # the thread closes its end as it ends

    def signal_others(self) -> None:
        """Ask every other process watching the signal files to check its model directory.

        This process has just checked: the signal names it as the sender, and its own watcher skips it."""
        for path in self.signal_files:
            try:
                raise_signal(path)
            except OSError as exc:
                log.error("could not ask the other workers to check the model directory (%s): %s", path, exc)

    def _run(self, wake_r: int) -> None:
        name_os_thread()
        events = _Events.open(self.directory.path, [p.parent for p in self.signal_files], wake_r)
        self.inotify = events is not None
        log.info(
            "watching the model directory %s (%s, and a check every %g s)",
            self.directory.path,
            "inotify events" if events else "no inotify",
            self.interval,
        )
        while not self._stop.is_set():
            if events:
                woken = events.wait(self.interval)
            else:
                select.select([wake_r], [], [], self.interval)
                woken = False
            if self._stop.is_set():
                break
            try:
                self._check(woken)
            except Exception:  # the watcher must outlive any surprise; the next wake tries again
                log.exception("checking the model directory %s failed", self.directory.path)
            if events:
                events.follow(self.directory.path)
        if events:
            events.close()
        os.close(wake_r)

    def _check(self, woken: bool) -> None:
        """Check when another process asked, or the model directory changed (`woken`: an event from it)."""
        if self._signalled():
            self.directory.check("signal")
        elif woken or self._changed_on_disk():
            self.directory.check("watch")

    def _signalled(self) -> bool:
        """Whether another process rewrote a signal file since the last look (this process's own are skipped)."""
        signalled = False
        for path, seen in self._signals.items():
            now = read_signal(path)
            if now != seen:
                self._signals[path] = now
                signalled |= now is not None and sender(now) != os.getpid()
        return signalled

    def _changed_on_disk(self) -> bool:
        """Whether the directory's checkpoints differ from what was read (stat only: cheap enough to poll)."""
        try:
            found = find_checkpoints(self.directory.path)
        except OSError:
            return False  # reported by the check that notices it first; nothing to reload from
        served = self.directory.fingerprints()
        if {name for name, _ in found} != set(served):
            return True
        return any(fingerprint_or_none(path) != served[name] for name, path in found)


def _identities(models: dict[str, Any]) -> dict[str, int]:
    return {name: id(loaded) for name, loaded in models.items()}


# What inotify reports that can change the checkpoints: a file written, renamed in or out, removed;
# a run directory made or removed; the watched directory itself moved or removed.
_MASK_NAMES = ("CLOSE_WRITE", "MOVED_TO", "MOVED_FROM", "CREATE", "DELETE", "ATTRIB", "DELETE_SELF", "MOVE_SELF")


class _Events:
    """inotify over the model directory and its subdirectories (training runs), and the signal files' folders."""

    def __init__(self, inotify: Any, mask: int, signal_folders: list[Path], wake: int):
        self._inotify = inotify
        self._mask = mask
        self._wake = wake  # a descriptor that becomes readable when the wait must end (stop)
        self._watched: dict[Path, int] = {}  # the model directory and its subdirectories, as `follow` saw them
        self._signal_wds = {wd for wd in map(self._add_watch, signal_folders) if wd is not None}

    @classmethod
    def open(cls, directory: Path, signal_folders: list[Path], wake: int) -> _Events | None:
        """Events for `directory` and `signal_folders`, or None where inotify is missing or refused."""
        try:
            from inotify_simple import INotify, flags
        except ImportError:  # not Linux, or the library is not installed
            return None
        try:
            inotify = INotify()
        except OSError as exc:  # e.g. fs.inotify.max_user_instances reached: polling still works
            log.warning("inotify is not available (%s); the model directory is polled", exc)
            return None
        mask = 0
        for name in _MASK_NAMES:
            mask |= getattr(flags, name)
        events = cls(inotify, mask, signal_folders, wake)
        events.follow(directory)
        return events

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds, or until any event (a signal file's included) or stop; True if the
        model directory changed (events that follow within SETTLE_SECONDS are taken with the first)."""
        ready, _, _ = select.select([self._inotify.fileno(), self._wake], [], [], timeout)
        if self._inotify.fileno() not in ready:
            return False
        time.sleep(SETTLE_SECONDS)  # let the events that follow the first arrive: one check sees them all
        signal_only = self._signal_wds - set(self._watched.values())  # a signal folder may be a model folder too
        # an overflow (wd -1) or a watch the kernel dropped counts as a change: the check finds out what changed
        return any(event.wd not in signal_only for event in self._inotify.read(timeout=0))

    def follow(self, directory: Path) -> None:
        """Watch `directory` and its subdirectories as they are now (run directories come and go)."""
        try:
            folders = {directory} | {p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")}
        except OSError:
            folders = set()
        for folder in folders - set(self._watched):
            wd = self._add_watch(folder)
            if wd is not None:
                self._watched[folder] = wd
        for folder in set(self._watched) - folders:
            if folder.parent == directory:
                self._watched.pop(folder)  # the kernel dropped the watch when the folder went

    def _add_watch(self, folder: Path) -> int | None:
        try:
            return self._inotify.add_watch(os.fspath(folder), self._mask)
        except OSError as exc:  # gone already, or fs.inotify.max_user_watches reached: the poll covers it
            log.debug("no inotify watch on %s: %s", folder, exc)
            return None

    def close(self) -> None:
        """Release the inotify descriptor."""
        self._inotify.close()
