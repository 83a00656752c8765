"""Ranks on different machines, each with its own disk: every rank resumes from rank 0's checkpoint whatever its
own disk holds (`Distributed.rank0_file`), and a rank whose corpus differs is refused before training. Two gloo
processes on this machine, each with a folder of its own standing for its own disk. The whole run on two
"machines" (two network namespaces) is tests/cli/test_torchrun_two_nodes.py."""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import free_port, make_text

pytestmark = pytest.mark.slow

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


def as_rank(work: Callable[[int, int, Path], dict], rank: int, port: int, folder: str) -> None:
    """Run `work` as this rank (in a spawned process) and keep its answer in FOLDER/answer.json."""
    Path(folder, "answer.json").write_text(json.dumps(work(rank, port, Path(folder))))


def run_two_ranks(work: Callable[[int, int, Path], dict], folders: list[Path]) -> list[dict]:
    """`work` in two processes, ranks 0 and 1 of a gloo group on 127.0.0.1, each with its own folder."""
    spawn, port = multiprocessing.get_context("spawn"), free_port()
    ranks = [spawn.Process(target=as_rank, args=(work, r, port, str(folders[r]))) for r in (0, 1)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(120)
        if process.exitcode is None:
            process.kill()
        assert process.exitcode == 0
    return [json.loads((folder / "answer.json").read_text()) for folder in folders]


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
