"""`charrnn train` on two machines: two network namespaces joined by a veth pair stand for two hosts, and each
runs `torchrun --nnodes 2 --nproc_per_node 1` with the c10d rendezvous, exactly as docs/TRAINING.md's two-node
commands do. Each node has its own copy of the corpus, its own cache and its own --out directory (a folder
the other never reads), so nothing is shared but the network.

The checks: both ranks end at the same step with bit-identical weights, by steps and by a time budget (rank 0
logs every rank's step and weights digest, and that digest is the digest of the checkpoint it saved); only the
node of rank 0 holds checkpoints; a resume continues across the two nodes (node 1 has no checkpoint of its
own) and ends bit-identical to an unbroken run; a fine-tuned run (--init-from) resumed without --init-from keeps,
on both ranks, the vocabulary of rank 0's checkpoint (the parent's characters included).

Needs root (skipped otherwise) and `ip netns` from iproute2 (without it: skipped, or failed in CI, CI=true).
Run with `-s` for the figures.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from tests.helpers import make_text, wait_until

pytestmark = pytest.mark.slow

RENDEZVOUS_PORT = 29500
# The tiny preset, with a shorter window so that a step is quick, one thread per node (2 cores for 2 nodes);
# every step logged, so that the interrupt can land from the first step on, long before the 200th.
FLAGS = "--preset tiny --seq-len 16 --eval-every 50 --log-every 1 --no-progress --threads 1 --seed 5".split()
STEPS = ("--max-steps", "200")
ENDS = re.compile(r"all 2 ranks end at step (\d+) with identical weights \(sha256 ([0-9a-f]{64})\)")


@dataclass(frozen=True)
class Node:
    """One "machine": a network namespace with one end of the veth pair, and a folder only it uses."""

    namespace: str
    interface: str
    address: str
    home: Path

    @property
    def corpus(self) -> Path:
        return self.home / "corpus.txt"

    def out(self, run: str) -> Path:
        return self.home / "runs" / run


def netns_unavailable(reason: str) -> NoReturn:
    """Where two namespaces cannot be made: a failure in CI (CI=true), else a skip that says why."""
    if os.environ.get("CI", "").strip().lower() in ("true", "1"):
        pytest.fail(f"the two-node test needs network namespaces in CI (CI=true): {reason}", pytrace=False)
    pytest.skip(reason)


def ip(*argv: str) -> None:
    """Run `ip argv...`; a failure raises CalledProcessError with ip's own message."""
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, Node]]:
    """Namespaces charrnn-<pid>-0/1 joined by a veth pair, 10.77.0.1/24 and 10.77.0.2/24, removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("two network namespaces need root (ip netns add); run as root for the two-node test")
    if shutil.which("ip") is None:
        netns_unavailable("no `ip` command (Debian's iproute2) to make network namespaces with")
    tag = os.getpid() % 100_000  # other test sessions on this machine make their own
    text = make_text(40_000)
    nodes = tuple(
        Node(f"charrnn-{tag}-{i}", f"crn{tag}n{i}", f"10.77.0.{i + 1}", tmp_path_factory.mktemp(f"node{i}"))
        for i in (0, 1)
    )
    made: list[str] = []
    try:
        for node in nodes:
            ip("netns", "add", node.namespace)
            made.append(node.namespace)
        ip("link", "add", nodes[0].interface, "type", "veth", "peer", "name", nodes[1].interface)
        for node in nodes:
            ip("link", "set", node.interface, "netns", node.namespace)
            ip("-n", node.namespace, "addr", "add", f"{node.address}/24", "dev", node.interface)
            ip("-n", node.namespace, "link", "set", node.interface, "up")
            ip("-n", node.namespace, "link", "set", "lo", "up")
            ip("netns", "exec", node.namespace, "true")  # it also mounts a /sys of its own: not allowed everywhere
            node.corpus.write_text(text, encoding="utf-8")
    except subprocess.CalledProcessError as exc:
        remove(made, nodes[0].interface)
        netns_unavailable(f"`{' '.join(exc.cmd)}` failed: {exc.stderr.strip()}")
    try:
        yield nodes
    finally:
        remove(made, nodes[0].interface)


def remove(namespaces: list[str], interface: str) -> None:
    """Delete the namespaces (which deletes the veth pair in them) and the pair if it never left this one."""
    for namespace in namespaces:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
    subprocess.run(["ip", "link", "del", interface], capture_output=True, timeout=30)


@dataclass
class Run:
    """What a two-node launch printed and how long it took."""

    outputs: tuple[str, str]  # node 0's and node 1's stdout and stderr
    seconds: float

    def ends(self) -> tuple[int, str]:
        """The step and weights digest rank 0 (node 0) logged as every rank's, failing if the ranks ended apart."""
        found = ENDS.search(self.outputs[0])
        assert found, f"no rank reported how the ranks ended:\n{self.outputs[0][-3000:]}"
        return int(found[1]), found[2]


def torchrun_command(node: Node, is_host: bool, run_id: str, port: int, argv: list[str], corpus: str) -> list[str]:
    """docs/TRAINING.md's command for this node, run in its namespace with its interface for gloo."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    return [
        *("ip", "netns", "exec", node.namespace),
        *("env", f"GLOO_SOCKET_IFNAME={node.interface}"),
        torchrun,
        *("--nnodes", "2", "--nproc_per_node", "1"),
        *("--rdzv_backend", "c10d", "--rdzv_endpoint", f"10.77.0.1:{port}", "--rdzv_id", run_id),
        *("--rdzv_conf", f"is_host={int(is_host)}", "--local-addr", node.address),
        *("-m", "charrnn.cli", "train", "--corpus", str(node.home / corpus)),
        *argv,
    ]


LAUNCHES = iter(range(1000))  # a fresh rendezvous id and port for every launch in this module


def start_on_two_nodes(nodes: tuple[Node, Node], run: str, *flags: str, corpus: str = "corpus.txt") -> Launch:
    """`charrnn train --corpus <node's own folder>/CORPUS --out <node's own folder>/runs/RUN FLAGS` on both nodes
    at once."""
    launch = next(LAUNCHES)
    processes = []
    for i, node in enumerate(nodes):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CHARRNN_CACHE_DIR": str(node.home / "cache")}
        argv = ["--out", str(node.out(run)), *FLAGS, *flags]
        command = torchrun_command(node, i == 0, f"{run}-{launch}", RENDEZVOUS_PORT + launch, argv, corpus)
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        processes.append(process)
    return Launch(processes[0], processes[1], time.perf_counter())


@dataclass
class Launch:
    """The torchrun of each node (each the leader of its own process group), started at `started`."""

    node0: subprocess.Popen
    node1: subprocess.Popen
    started: float

    def worker(self, node: int) -> int:
        """The pid of the training process (torchrun's one child) on that node."""
        workers = children((self.node0, self.node1)[node].pid)
        assert len(workers) == 1, f"torchrun has children {workers}"
        return workers[0]

    def kill(self) -> None:
        """SIGKILL both launches: each torchrun's group and its workers (torchrun gives each a session of its own)."""
        for process in (self.node0, self.node1):
            if process.poll() is None:
                for worker in children(process.pid):
                    os.kill(worker, signal.SIGKILL)
                os.killpg(process.pid, signal.SIGKILL)

    def finish(self, timeout: float = 120) -> Run:
        """Wait for both nodes (killing both launches after `timeout` s); both must exit 0."""
        outputs = []
        for process in (self.node0, self.node1):
            try:
                outputs.append(process.communicate(timeout=max(self.started + timeout - time.perf_counter(), 1))[0])
            except subprocess.TimeoutExpired:
                self.kill()
                texts = outputs + [p.communicate()[0] for p in (self.node0, self.node1)[len(outputs) :]]
                pytest.fail(f"a two-node launch did not finish in {timeout} s:\n" + "\n".join(t[-3000:] for t in texts))
        seconds = time.perf_counter() - self.started
        for i, process in enumerate((self.node0, self.node1)):
            assert process.returncode == 0, f"node {i} exited {process.returncode}:\n{outputs[i][-4000:]}"
        return Run((outputs[0], outputs[1]), seconds)


def children(pid: int) -> list[int]:
    """The pids of a process's children (Linux)."""
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:  # it has exited
        return []


def train_on_two_nodes(nodes: tuple[Node, Node], run: str, *flags: str, corpus: str = "corpus.txt") -> Run:
    """A two-node launch to its end."""
    return start_on_two_nodes(nodes, run, *flags, corpus=corpus).finish()


def checkpoint_digest(path: Path) -> tuple[int, str]:
    """The step and weights digest of a saved checkpoint, as the trainer digests a model's weights."""
    from charrnn.model.checkpoint import load_checkpoint
    from charrnn.model.distributed import weights_digest

    ckpt = load_checkpoint(path)
    return ckpt.meta["step"], weights_digest(ckpt.weights)


def logged_steps(run: Path) -> list[int]:
    if not (run / "metrics.jsonl").exists():
        return []
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "train_loss" in r]


def report(label: str, run: Run, out: Path) -> None:
    """The figures: the launch's wall time (torchrun's start, the rendezvous and the final evaluation
    included), the training time the run's checkpoint recorded, steps, and that the ranks ended with
    identical weights (`Run.ends` failed otherwise)."""
    from charrnn.model.checkpoint import load_checkpoint

    meta = load_checkpoint(out / "last.safetensors").meta
    print(
        f"\ntwo nodes, {label}: {run.seconds:.1f} s wall, {meta['elapsed_s']:.1f} s training, "
        f"{meta['step']} steps, identical weights on both ranks: yes"
    )


@pytest.fixture(scope="module")
def unbroken(two_nodes: tuple[Node, Node]) -> Run:
    """A two-node run of STEPS steps from start to end."""
    return train_on_two_nodes(two_nodes, "whole", *STEPS)


def test_two_nodes_by_steps_end_together_and_only_rank_0_writes(two_nodes: tuple[Node, Node], unbroken: Run) -> None:
    node0, node1 = two_nodes
    step, digest = unbroken.ends()
    assert step == 200
    assert checkpoint_digest(node0.out("whole") / "last.safetensors") == (200, digest)
    assert not node1.out("whole").exists()  # rank 1 writes nothing, on its own disk either
    assert "stopped by max_steps at step 200" in unbroken.outputs[0]
    report("by steps", unbroken, node0.out("whole"))


def test_two_nodes_with_a_time_budget_stop_at_the_same_step(two_nodes: tuple[Node, Node]) -> None:
    node0, _ = two_nodes
    run = train_on_two_nodes(two_nodes, "budget", "--time-budget", "2", "--max-steps", "1000000")
    step, digest = run.ends()
    assert step > 0
    assert checkpoint_digest(node0.out("budget") / "last.safetensors") == (step, digest)
    assert f"stopped by time_budget at step {step}" in run.outputs[0]
    report("time budget 2 s", run, node0.out("budget"))


def test_an_interrupted_run_resumed_on_two_nodes_ends_as_the_unbroken_one(
    two_nodes: tuple[Node, Node], unbroken: Run
) -> None:
    node0, node1 = two_nodes
    launch = start_on_two_nodes(two_nodes, "broken", *STEPS)
    try:
        wait_until(lambda: logged_steps(node0.out("broken")), 120, "the first logged step")
        os.kill(launch.worker(1), signal.SIGINT)  # Ctrl-C to node 1's rank: every rank stops, rank 0 saves
    except BaseException:
        launch.kill()
        raise
    stopped = re.search(r"stopped by interrupt at step (\d+)", launch.finish().outputs[0])
    assert stopped and 0 < int(stopped[1]) < 200
    assert not node1.out("broken").exists()  # node 1 resumes from node 0's checkpoint, sent over the network
    resumed = train_on_two_nodes(two_nodes, "broken", *STEPS, "--resume")
    assert f"at step {stopped[1]}" in resumed.outputs[0]
    assert resumed.ends() == unbroken.ends()  # the same step, bit-identical weights on both ranks
    report(f"interrupted at step {stopped[1]}, resumed", resumed, node0.out("broken"))


def test_a_fine_tuned_run_resumed_on_two_nodes_keeps_the_vocabulary_of_rank_0s_checkpoint(
    two_nodes: tuple[Node, Node], unbroken: Run
) -> None:
    from charrnn.model.checkpoint import load_checkpoint

    node0, node1 = two_nodes
    parent = (node0.out("whole") / "last.safetensors").read_bytes()  # each node has its own copy of the parent
    new_text = node0.corpus.read_text(encoding="utf-8").replace("z", "") + "Section 42 [b] #7\n" * 40
    for node in two_nodes:
        (node.home / "parent.safetensors").write_bytes(parent)
        (node.home / "letters.txt").write_text(new_text, encoding="utf-8")
    tuned = ("--init-from", str(node0.home / "parent.safetensors"))  # the same path on both nodes
    train_on_two_nodes(two_nodes, "tuned", "--max-steps", "20", *tuned, corpus="letters.txt")
    assert not node1.out("tuned").exists()
    # docs/TRAINING.md's resume, without --init-from: node 1 has no checkpoint, so only rank 0's holds the 'z'
    resumed = train_on_two_nodes(two_nodes, "tuned", "--max-steps", "40", "--resume", corpus="letters.txt")
    step, digest = resumed.ends()  # both ranks: the same step, bit-identical weights
    assert checkpoint_digest(node0.out("tuned") / "last.safetensors") == (step, digest) and step == 40
    vocab = load_checkpoint(node0.out("tuned") / "last.safetensors").vocab
    assert "z" in vocab and "#" in vocab  # the parent's characters and the new text's
