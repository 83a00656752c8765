"""Ranks on different machines, each with its own disk: every rank resumes from rank 0's checkpoint whatever its
own disk holds (`Distributed.rank0_file`), a fine-tuned run included (its vocabulary is the checkpoint's), a
rank whose corpus differs is refused before training, and a check that fails on one machine only stops every
rank with its message. Two gloo processes on this machine, each with a folder of its own standing for its own
disk. The whole run on two "machines" (two network namespaces) is tests/cli/test_torchrun_two_nodes.py."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import free_port, make_text

pytestmark = pytest.mark.slow

TINY = {"batch": 4, "seq_len": 32, "eval_every": 100, "eval_max_chars": 1024, "sample_chars": 0, "device": "cpu"}
NEW_CHARACTERS = "Section 42 (b) #7: 100% [see 3.1]\n"  # characters make_text never writes
PARENTS_OWN = "~^@ ~^@\n"  # characters only the parent's text holds

# name -> what rank 0's folder and rank 1's folder hold under that name (None: no such file)
FILES = {
    "last.safetensors": (b"rank 0's checkpoint", b"a stale checkpoint on rank 1's disk"),
    "only-on-rank-1.safetensors": (None, b"rank 1's own"),
    "empty.safetensors": (b"", b"not empty"),
}


def join(rank: int, port: int) -> None:
    """The environment torchrun gives rank `rank` of 2 on this machine."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
    )


def read_files(rank: int, port: int, folder: Path) -> dict:
    """What rank0_file gives this rank for each of FILES: its bytes, and whether it is this rank's own file."""
    from charrnn.model.distributed import Distributed

    join(rank, port)
    group, seen = Distributed.from_environment("cpu"), {}
    for name in FILES:
        with group.rank0_file(folder / name) as path:
            seen[name] = path and {"bytes": path.read_bytes().decode(), "own": path.parent == folder}
    group.close()
    return seen


def start_training(rank: int, port: int, folder: Path) -> dict:
    """Build a Trainer on this rank's own corpus.txt: what it raised, if anything."""
    from charrnn.model.data import load_corpus
    from charrnn.model.train import Trainer, TrainingError
    from tests.helpers import tiny_configs

    join(rank, port)
    corpus = load_corpus(folder / "corpus.txt", cache_dir=folder / "cache")
    model_cfg, cfg = tiny_configs(len(corpus.vocab), device="cpu")
    try:
        Trainer(model_cfg, cfg, corpus, folder / "run", progress=False)
    except TrainingError as exc:
        return {"error": str(exc)}
    return {"error": None}


def plan_and_train(rank: int, port: int, folder: Path) -> dict:
    """`charrnn train`'s path (plan_run, then a Trainer) as FOLDER/job.json says, on this rank's own folder:
    what it raised, or the vocabulary, step and weights digest it ended with."""
    from charrnn.model.distributed import weights_digest
    from charrnn.model.run_plan import plan_run
    from charrnn.model.train import Trainer

    join(rank, port)
    job = json.loads((folder / "job.json").read_text())
    overrides = {**TINY, "max_steps": job["max_steps"]}
    try:
        plan = plan_run(
            folder / "corpus.txt",
            None,
            folder / "run",
            "tiny",
            overrides,
            job["resume"],
            job.get("init_from") and folder / job["init_from"],
            folder / "cache",
        )
        trainer = Trainer(
            plan.model_config,
            plan.train_config,
            plan.corpus,
            folder / "run",
            job["resume"],
            progress=False,
            preset="tiny",
            init_from=plan.parent,
        )
        result = trainer.run()
    except Exception as exc:  # what each rank raised is the point
        return {"error": f"{type(exc).__name__}: {exc}"}
    digest = weights_digest(trainer.model.state_dict())
    return {"error": None, "vocab": len(plan.corpus.vocab), "step": result.step, "digest": digest}


def as_rank(work: Callable[[int, int, Path], dict], rank: int, port: int, folder: str) -> None:
    """Run `work` as this rank (in a spawned process) and keep its answer in FOLDER/answer.json."""
    Path(folder, "answer.json").write_text(json.dumps(work(rank, port, Path(folder))))


def run_two_ranks(work: Callable[[int, int, Path], dict], folders: list[Path]) -> list[dict]:
    """`work` in two processes, ranks 0 and 1 of a gloo group on 127.0.0.1, each with its own folder."""
    spawn, port = multiprocessing.get_context("spawn"), free_port()
    ranks = [spawn.Process(target=as_rank, args=(work, r, port, str(folders[r]))) for r in (0, 1)]
    for folder in folders:
        (folder / "answer.json").unlink(missing_ok=True)  # a launch before this one's
    for process in ranks:
        process.start()
    for process, folder in zip(ranks, folders, strict=True):
        process.join(120)
        if process.exitcode is None:
            process.kill()
        # A rank that wrote its answer is done; now and then torch's teardown of the gloo group at interpreter
        # exit aborts it afterwards ("terminate called without an active exception", seen with every kind of
        # work here): that abort is not what these tests check, a rank that hung or failed before answering is.
        aborted_after = process.exitcode == -signal.SIGABRT and (folder / "answer.json").exists()
        assert process.exitcode == 0 or aborted_after, f"rank exited {process.exitcode} without an answer"
    return [json.loads((folder / "answer.json").read_text()) for folder in folders]


def give_job(folders: list[Path], **job: object) -> None:
    for folder in folders:
        (folder / "job.json").write_text(json.dumps(job))


def disks(tmp_path: Path) -> list[Path]:
    """A folder for each rank, standing for its machine's own disk."""
    made = [tmp_path / "rank0", tmp_path / "rank1"]
    for folder in made:
        folder.mkdir()
    return made


def test_every_rank_reads_rank_0s_file_whatever_its_own_disk_holds(tmp_path: Path) -> None:
    folders = disks(tmp_path)
    for rank, folder in enumerate(folders):
        for name, contents in FILES.items():
            if contents[rank] is not None:
                (folder / name).write_bytes(contents[rank])
    rank0, rank1 = run_two_ranks(read_files, folders)
    assert rank0["last.safetensors"] == {"bytes": "rank 0's checkpoint", "own": True}
    assert rank1["last.safetensors"] == {"bytes": "rank 0's checkpoint", "own": False}  # a copy, not its stale file
    assert rank0["only-on-rank-1.safetensors"] is None and rank1["only-on-rank-1.safetensors"] is None
    assert rank1["empty.safetensors"] == {"bytes": "", "own": False}


def test_ranks_whose_corpora_differ_are_refused_before_training(tmp_path: Path) -> None:
    folders, text = disks(tmp_path), make_text(20_000)
    (folders[0] / "corpus.txt").write_text(text, encoding="utf-8")
    (folders[1] / "corpus.txt").write_text(text[::-1], encoding="utf-8")  # the same characters: the same model
    for answer in run_two_ranks(start_training, folders):
        assert "the ranks read different corpora (rank 0: 20,000 characters" in answer["error"]
        assert "give every machine the same --corpus text" in answer["error"]
    assert not (folders[0] / "run").exists()


@pytest.fixture
def fine_tuning_disks(tmp_path: Path) -> list[Path]:
    """Each machine's folder: a copy of the parent (a tiny run on a text with characters the new one lacks)
    and the new text, with characters the parent lacks."""
    from charrnn.model.data import load_corpus
    from tests.helpers import train_tiny

    (tmp_path / "parent.txt").write_text(PARENTS_OWN * 20 + make_text(8_000), encoding="utf-8")
    corpus = load_corpus(tmp_path / "parent.txt", cache_dir=tmp_path / "cache")
    parent = train_tiny(corpus, tmp_path / "parent", max_steps=4, **TINY)
    folders = disks(tmp_path)
    for folder in folders:
        (folder / "parent.safetensors").write_bytes((parent / "last.safetensors").read_bytes())
        (folder / "corpus.txt").write_text(NEW_CHARACTERS * 20 + make_text(20_000, seed=1), encoding="utf-8")
    return folders


def test_a_fine_tuned_run_resumes_on_two_machines_from_rank_0s_checkpoint_alone(fine_tuning_disks: list[Path]) -> None:
    folders = fine_tuning_disks
    give_job(folders, init_from="parent.safetensors", resume=False, max_steps=4)
    started = run_two_ranks(plan_and_train, folders)
    assert [answer["error"] for answer in started] == [None, None]
    text = set((folders[1] / "corpus.txt").read_text(encoding="utf-8"))
    assert started[0]["vocab"] == len(text | set(PARENTS_OWN))  # the text's characters and the parent's
    assert not (folders[1] / "run").exists()  # node 1's disk holds no checkpoint to resume from
    give_job(folders, resume=True, max_steps=8)  # docs/TRAINING.md's resume: without --init-from
    rank0, rank1 = run_two_ranks(plan_and_train, folders)
    assert rank0 == rank1 == {**rank0, "error": None, "step": 8}  # the same vocabulary and bit-identical weights
    assert rank0["vocab"] == started[0]["vocab"]  # the parent's characters kept, on rank 1 too


def test_a_check_that_fails_on_one_machine_stops_every_rank_with_its_message(fine_tuning_disks: list[Path]) -> None:
    folders = fine_tuning_disks
    (folders[1] / "parent.safetensors").unlink()  # --init-from names a file node 1 lacks
    give_job(folders, init_from="parent.safetensors", resume=False, max_steps=4)
    rank0, rank1 = run_two_ranks(plan_and_train, folders)
    missing = f"--init-from {folders[1] / 'parent.safetensors'}: does not exist"
    assert rank1["error"] == f"InitFromError: {missing}"
    assert rank0["error"] == f"RankFailedError: rank 1 of 2 failed before training, so every rank stops: {missing}"
    assert not (folders[0] / "run").exists()


def test_a_run_in_rank_0s_out_alone_stops_every_rank_and_node_1s_out_is_never_read(
    fine_tuning_disks: list[Path],
) -> None:
    folders = fine_tuning_disks
    (folders[0] / "run").mkdir()
    (folders[0] / "run" / "last.safetensors").write_bytes(b"a run")  # refused before it is read
    give_job(folders, resume=False, max_steps=4)
    rank0, rank1 = run_two_ranks(plan_and_train, folders)
    held = f"{folders[0] / 'run'} already holds a training run"
    assert rank0["error"].startswith(f"TrainingError: {held}")
    assert rank1["error"].startswith(
        f"RankFailedError: rank 0 of 2 failed before training, so every rank stops: {held}"
    )
    (folders[0] / "run" / "last.safetensors").rename(folders[1] / "stale.safetensors")
    (folders[0] / "run").rmdir()
    (folders[1] / "run").mkdir()  # now only node 1's --out holds a run: rank 1 never writes there, so it trains
    (folders[1] / "stale.safetensors").rename(folders[1] / "run" / "last.safetensors")
    rank0, rank1 = run_two_ranks(plan_and_train, folders)
    assert rank0 == rank1 == {**rank0, "error": None, "step": 4}
    assert (folders[1] / "run" / "last.safetensors").read_bytes() == b"a run"
