"""deploy/stack.yml under load: a rolling update, a scale from 3 replicas to 5 and back, and a replica whose
processes are stopped (SIGSTOP) lose no request that the proxy accepted. Prints, per change, the requests
sent and failed and the p99 to the first character before and during it, and the hung replica's
replacement time.

A stream that a replica was already answering when its processes froze is the one loss no proxy can undo
(its first bytes have reached the client): those are counted apart, and the tier fails on any other.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable

import pytest
import requests

from tests.docker.tools import REPO, docker, run
from tests.helpers import wait_until
from tests.stack.conftest import REPLICAS, Stack
from tests.stack.load import Load, Outcome, p99

pytestmark = pytest.mark.stack

SLOT_PORT = "181{:02d}"  # deploy/stack.yml: CHARRNN_PORT of task slot N


def slot_answers(slot: int) -> bool:
    """Whether the replica of task slot `slot` answers /health with 200."""
    try:
        return requests.get(f"http://127.0.0.1:{SLOT_PORT.format(slot)}/health", timeout=10).status_code == 200
    except requests.RequestException:
        return False


def running_slots(stack: Stack) -> dict[int, str]:
    """Task slot -> container id of the app's running tasks."""
    lines = docker(
        "ps",
        "--filter",
        f"label=com.docker.swarm.service.name={stack.app}",
        "--format",
        '{{.ID}} {{.Label "com.docker.swarm.task.name"}}',
    ).stdout.split("\n")
    slots = {}
    for line in filter(None, lines):
        container, task = line.split()
        slots[int(task.split(".")[1])] = container
    return slots


def converged(stack: Stack, replicas: int) -> Callable[[], bool]:
    """A condition: `replicas` tasks run, each one's slot answers /health."""

    def done() -> bool:
        slots = running_slots(stack)
        return len(slots) == replicas and all(slot_answers(slot) for slot in slots)

    return done


def service(stack: Stack, *args: str, timeout: float = 400) -> None:
    """`docker service ARGS` on the app service, waiting until it has converged."""
    run(["docker", "service", *args, "--detach=false", stack.app], timeout=timeout, cwd=REPO)


def freeze(container: str) -> list[str]:
    """SIGSTOP every process of a container (the host's pids, from `docker top`); the pids."""
    pids = docker("top", container, "-eo", "pid").stdout.split()[1:]
    run(["kill", "-STOP", *pids])
    return pids


def report(outcomes: list[Outcome], phases: list[str], frozen_at: float | None) -> tuple[list[str], int, int]:
    """Table lines per phase, the failures the tier fails on, and the streams cut by the freeze."""
    lines = [f"{'phase':<22}{'sent':>6}{'failed':>8}{'p99 first char (stream)':>26}{'p99 answer (plain)':>21}"]
    failed, cut = 0, 0
    for phase in phases:
        done = [o for o in outcomes if o.phase == phase]
        cut_here = [o for o in done if o.error and frozen_at and cut_by_the_freeze(o, frozen_at)]
        failed_here = [o for o in done if o.error and o not in cut_here]
        failed, cut = failed + len(failed_here), cut + len(cut_here)
        stream = p99([o.first_char for o in done if o.kind == "stream" and o.first_char is not None])
        plain = p99([o.first_char for o in done if o.kind == "plain" and o.first_char is not None])
        lines.append(
            f"{phase:<22}{len(done):>6}{len(failed_here):>8}{seconds(stream):>26}{seconds(plain):>21}"
            + (f"  ({len(cut_here)} streams already answering from the frozen replica, cut)" if cut_here else "")
        )
    return lines, failed, cut


def cut_by_the_freeze(outcome: Outcome, frozen_at: float) -> bool:
    """Whether a failed request may be a stream the frozen replica was answering: a stream that had characters,
    sent before the freeze took hold (a replica frozen since cannot have answered it; when its answer reached
    the client says less: on busy cores the client may read it a tenth of a second late) and still running then."""
    ended = outcome.ended_at if outcome.ended_at is not None else float("inf")
    return outcome.kind == "stream" and outcome.chars > 0 and outcome.start < frozen_at <= ended


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def rolling_update(stack: Stack) -> None:
    service(stack, "update", "--force")
    wait_until(converged(stack, REPLICAS), 120, "3 replicas after the update")


def scale(replicas: int) -> Callable[[Stack], None]:
    def change(stack: Stack) -> None:
        service(stack, "update", "--replicas", str(replicas))
        wait_until(converged(stack, replicas), 120, f"{replicas} replicas")

    return change


FROZEN: dict[str, float] = {}  # when the hung replica's processes were all stopped (monotonic s)


def hang_one(stack: Stack) -> None:
    """SIGSTOP a replica's processes; return once a new replica answers in its slot."""
    slot, container = sorted(running_slots(stack).items())[0]
    freeze(container)
    FROZEN["at"] = time.monotonic()
    wait_until(
        lambda: running_slots(stack).get(slot, container) != container and slot_answers(slot),
        150,
        f"a new replica in slot {slot} (the hung one, {container}, replaced)",
    )
    wait_until(converged(stack, REPLICAS), 120, "3 replicas after the replacement")


CHANGES = [
    ("rolling update", rolling_update),
    ("scale 3 -> 5", scale(5)),
    ("scale 5 -> 3", scale(REPLICAS)),
    ("hung replica", hang_one),
]


@pytest.mark.timeout(900)
def test_no_request_lost_while_replicas_change(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    wait_until(converged(stack, REPLICAS), 120, "3 replicas answering")
    load = Load(stack.url).start()
    began, took = {}, {}
    try:
        time.sleep(15)
        for phase, change in CHANGES:
            load.phase = phase
            began[phase] = time.monotonic()
            change(stack)
            took[phase] = time.monotonic() - began[phase]
        load.phase = "after"
        time.sleep(10)
    finally:
        outcomes = load.stop()
    phases = ["before", *began, "after"]
    # A stream answered before the freeze took hold may have been on the frozen replica: cut, not lost.
    lines, failed, cut = report(outcomes, phases, FROZEN.get("at"))
    t0 = outcomes[0].start if outcomes else 0.0
    with capsys.disabled():
        print("\nstack tier: streaming and non-streaming load through the proxy (deploy/stack.yml, 3 replicas)")
        for line in lines:
            print("  " + line)
        for phase, duration in took.items():
            print(f"  {phase}: {duration:.1f} s, from {began[phase] - t0:.1f} s")
        if "hung replica" in took:
            print(
                f"  hung replica replaced (SIGSTOP to a new replica answering /health) in {took['hung replica']:.1f} s"
            )
        print(f"  sent {len(outcomes)}, failed {failed}, cut by the freeze {cut}")
        for o in [o for o in outcomes if o.error][:5]:
            answered = "-" if o.answered_at is None else f"{o.answered_at - t0:.1f} s"
            print(
                f"  {o.kind} request of phase {o.phase!r}: sent at {o.start - t0:.1f} s, answered at {answered},"
                f" ended at {o.ended_at - t0:.1f} s after {o.chars} characters: {o.error}"
            )
    assert failed == 0, [o.error for o in outcomes if o.error][:5]
    assert took["hung replica"] < 120


def test_prometheus_scrapes_every_replica_and_records_the_rules(stack: Stack) -> None:
    def query(expression: str) -> list[dict]:
        answer = requests.get(stack.prometheus + "/api/v1/query", params={"query": expression}, timeout=10).json()
        return answer["data"]["result"]

    wait_until(lambda: bool(query("charrnn:replicas_up:sum")), 60, "the recording rules evaluated")
    requests.post(stack.url + "/generate", json={"prompt": "ROMEO:", "max_new_chars": 20}, timeout=60)
    up = {r["metric"]["instance"] for r in query('up{job="charrnn"} == 1')}
    slots = running_slots(stack)
    wait_until(lambda: len(query('up{job="charrnn"} == 1')) == len(slots), 60, "every replica scraped")
    assert {f"127.0.0.1:{SLOT_PORT.format(slot)}" for slot in slots} <= {
        r["metric"]["instance"] for r in query('up{job="charrnn"} == 1')
    }, up
    assert float(query("charrnn:replicas_up:sum")[0]["value"][1]) == len(slots)
    image = stack.env.get("CHARRNN_PROMETHEUS_IMAGE", "charrnn-prometheus:latest")
    rules = run(
        ["docker", "run", "--rm", "--entrypoint", "promtool", image, "check", "rules", "/etc/charrnn/rules.yml"]
    )
    assert "SUCCESS" in rules.stdout + rules.stderr
    for name in re.findall(r"record: (\S+)", (REPO / "deploy" / "prometheus" / "rules.yml").read_text()):
        wait_until(lambda name=name: bool(query(name)), 60, f"the recorded series {name}")
    json.loads((REPO / "deploy" / "grafana" / "charrnn-dashboard.json").read_text())


def test_what_the_proxy_and_prometheus_cost(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    """The same short requests straight to a replica and through nginx, one at a time; the two containers' use."""
    slot = min(running_slots(stack))
    direct, proxied = f"http://127.0.0.1:{SLOT_PORT.format(slot)}", stack.url
    times: dict[str, list[float]] = {direct: [], proxied: []}
    session = requests.Session()
    for i in range(400):  # alternating, so that both see the same neighbours
        url = (direct, proxied)[i % 2]
        started = time.monotonic()
        answer = session.post(url + "/generate", json={"prompt": "ROMEO:", "max_new_chars": 1, "seed": i}, timeout=60)
        times[url].append(time.monotonic() - started)
        assert answer.status_code == 200, answer.text
    usage = docker(
        "stats",
        "--no-stream",
        "--format",
        "{{.Name}} {{.CPUPerc}} {{.MemUsage}}",
        *[
            line
            for line in docker("ps", "-q", "--filter", f"label=com.docker.stack.namespace={stack.name}").stdout.split()
        ],
    ).stdout
    with capsys.disabled():
        median = {url: sorted(values)[len(values) // 2] for url, values in times.items()}
        print("\nstack tier: 200 one-character requests each, one at a time")
        print(f"  straight to a replica: median {median[direct] * 1000:.1f} ms, p99 {p99(times[direct]) * 1000:.1f} ms")
        print(
            f"  through nginx:         median {median[proxied] * 1000:.1f} ms, p99 {p99(times[proxied]) * 1000:.1f} ms"
        )
        print("  containers (name, CPU, memory), idle after the load:")
        for line in sorted(usage.splitlines()):
            print("    " + line)
