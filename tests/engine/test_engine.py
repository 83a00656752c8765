"""The generation engine: batched text equals `model.generation.generate`, whatever shares the batch.

Every engine here computes in float32 (precision="fp32"), which is what matches `generate`; the
kernel's bfloat16 arithmetic (precision "bf16" on a CPU with AVX512-BF16) is checked for what it
promises instead, a text independent of its batch, in test_bf16_texts_do_not_depend_on_the_batch (and the
int8 arithmetic in tests/engine/test_kernel_builds.py)."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Iterator

import pytest

import charrnn.model.generation as generation
from charrnn.model import decoding
from charrnn.model.decoding import SamplingError, SamplingParams, Token
from charrnn.model.generation import generate
from charrnn.service.engine.batch import describe_batch
from charrnn.service.engine.loading import LoadedModel
from charrnn.service.engine.scheduler import (
    STEPS_PER_CALL,
    Engine,
    EngineClosedError,
    JobSpec,
    QueueFullError,
    fill_holes,
)
from tests.helpers import MIXED_PARAMS, tiny_model

LONG = 1_000_000  # max_new_chars for a job that is stopped some other way


@pytest.fixture(scope="module", params=["lstm", "gru", "rnn"])
def loaded(request: pytest.FixtureRequest) -> LoadedModel:
    return tiny_model(request.param)


@pytest.fixture
def engine(loaded: LoadedModel) -> Iterator[Engine]:
    engine = Engine({loaded.name: loaded}, precision="fp32", max_batch=8, max_queue=64)
    engine.start()
    yield engine
    engine.close(timeout=5)


def spec(loaded: LoadedModel, prompt: str = "the fox", n: int = 60, seed: int = 1, **kw: object) -> JobSpec:
    params = kw.pop("params", SamplingParams(temperature=1.0))
    return JobSpec(loaded.name, tuple(loaded.vocab.encode(prompt)), n, params, seed, **kw)  # type: ignore[arg-type]


def reference(loaded: LoadedModel, job: JobSpec) -> tuple[list[Token], str]:
    """What `charrnn sample` gives for the same spec."""
    gen = generate(
        loaded.model,
        loaded.vocab,
        loaded.vocab.decode(job.prompt_ids),
        job.max_new_chars,
        job.params,
        job.seed,
        job.stop,
        top_logprobs=job.top_logprobs,
    )
    tokens = list(gen)
    return tokens, gen.finish_reason  # type: ignore[return-value]


def assert_same(got: list[Token], want: list[Token]) -> None:
    """Same characters; log-probabilities equal up to float rounding (a batch sums in another order)."""
    assert "".join(t.char for t in got) == "".join(t.char for t in want)
    assert [t.logprob for t in got] == pytest.approx([t.logprob for t in want], abs=1e-4)
    assert [t.top and [c for c, _ in t.top] for t in got] == [t.top and [c for c, _ in t.top] for t in want]


def mixed_specs(loaded: LoadedModel, count: int) -> list[JobSpec]:
    """Jobs of different prompts, lengths, seeds and sampling settings."""
    prompts = ["", "a", "the quick brown fox", "hello, world. ", "zz"]
    params = [MIXED_PARAMS[i % len(MIXED_PARAMS)] for i in range(count)]
    return [
        spec(loaded, prompts[i % 5], n=5 + 17 * i % 80, seed=100 + i, params=params[i], top_logprobs=i % 3)
        for i in range(count)
    ]


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("batching", [True, False], ids=["batched", "unbatched"])
def test_jobs_give_the_same_text_as_generate(
    loaded: LoadedModel, batching: bool, native: bool, request: pytest.FixtureRequest
) -> None:
    if native and loaded.name == "lstm":  # the C kernel's case: it must be there (in CI) to be compared
        request.getfixturevalue("native_kernel")
    engine = Engine({loaded.name: loaded}, precision="fp32", max_batch=6, batching=batching, native=native)
    engine.start()
    specs = mixed_specs(loaded, 15)
    jobs = [engine.submit(s) for s in specs]  # more jobs than slots: some wait, then join mid-batch
    for job, s in zip(jobs, specs, strict=True):
        tokens, reason = job.result(timeout=60)
        want, want_reason = reference(loaded, s)
        assert_same(tokens, want)
        assert reason == want_reason == "length"
        assert job.generated_chars == s.max_new_chars
    engine.close()


def test_plain_rows_stepped_several_at_a_call_give_the_same_text_as_generate(
    native_kernel: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain rows are drawn and stepped STEPS_PER_CALL steps a kernel call: rows that end within a call (lengths
    that are no multiple of it, stop strings) and rows whose noise block runs out within one (blocks of 10
    rows here) give what `charrnn sample` gives."""
    loaded = tiny_model("lstm")
    monkeypatch.setattr(decoding, "NOISE_FLOATS", 10 * len(loaded.vocab))  # a block of 10 rows of noise
    plain = SamplingParams(temperature=0.9)
    specs = [spec(loaded, "the", n=n, seed=n, params=plain) for n in (1, 2, 3, 5, 6, 7, 9, 13)]
    specs += [spec(loaded, "a", n=37, seed=5, params=plain), spec(loaded, "", n=40, seed=3, stop=("e",))]
    engine = Engine({loaded.name: loaded}, precision="fp32", max_batch=16)
    jobs = [engine.submit(s) for s in specs]  # queued before the start: one batch from the first step
    engine.start()
    try:
        for job, s in zip(jobs, specs, strict=True):
            tokens, reason = job.result(timeout=120)
            want, want_reason = reference(loaded, s)
            assert_same(tokens, want)
            assert reason == want_reason
    finally:
        engine.close()
    assert STEPS_PER_CALL > 1


def test_the_first_token_is_bitwise_equal_to_generate(loaded: LoadedModel) -> None:
    engine = Engine({loaded.name: loaded}, precision="fp32", batching=False)
    engine.start()
    s = spec(loaded, n=80, top_logprobs=3)
    tokens, want = engine.submit(s).result(timeout=60)[0], reference(loaded, s)[0]
    assert tokens[0] == want[0]  # the same prefill call, the same draw
    assert_same(tokens, want)
    engine.close()


def test_a_job_that_joins_a_running_batch_is_unaffected(engine: Engine, loaded: LoadedModel) -> None:
    first = engine.submit(spec(loaded, n=300, seed=7))
    next(first.chunks())  # the first job is running before the others arrive
    later = [engine.submit(spec(loaded, "abc", n=20 + i, seed=i)) for i in range(5)]
    for job in [first, *later]:
        assert_same(job.result(timeout=60)[0], reference(loaded, job.spec)[0])


def test_chunks_stream_every_token_once(engine: Engine, loaded: LoadedModel) -> None:
    job = engine.submit(spec(loaded, n=50))
    streamed = [t for chunk in job.chunks() for t in chunk]
    assert streamed == job.result()[0]
    assert len(streamed) == 50


def test_cancel_frees_the_slot(engine: Engine, loaded: LoadedModel) -> None:
    job = engine.submit(spec(loaded, n=LONG))
    next(job.chunks())
    job.cancel()
    job.cancel()  # idempotent
    tokens, reason = job.result(timeout=60)
    assert reason == "cancelled"
    assert 0 < len(tokens) < LONG
    after = engine.submit(spec(loaded, n=3))
    after.result(timeout=60)
    assert engine.active == 0


def test_cancel_a_queued_job(loaded: LoadedModel) -> None:
    engine = Engine({loaded.name: loaded}, precision="fp32", batching=False)
    engine.start()
    running = engine.submit(spec(loaded, n=LONG))
    queued = engine.submit(spec(loaded, n=10))
    queued.cancel()
    assert queued.result(timeout=60) == ([], "cancelled")
    running.cancel()
    assert running.result(timeout=60)[1] == "cancelled"
    engine.close()


def test_deadline_ends_a_job(engine: Engine, loaded: LoadedModel) -> None:
    job = engine.submit(spec(loaded, n=LONG, timeout=0.05))
    tokens, reason = job.result(timeout=60)
    assert reason == "deadline"
    assert len(tokens) < LONG


def test_deadline_while_queued(loaded: LoadedModel) -> None:
    engine = Engine({loaded.name: loaded}, precision="fp32", batching=False)
    engine.start()
    running = engine.submit(spec(loaded, n=LONG))
    queued = engine.submit(spec(loaded, n=10, timeout=0.01))
    assert queued.result(timeout=60) == ([], "deadline")
    running.cancel()
    engine.close()


def test_full_queue_refuses_with_retry_after(loaded: LoadedModel) -> None:
    engine = Engine({loaded.name: loaded}, precision="fp32", max_queue=2)  # not started: nothing leaves the queue
    jobs = [engine.submit(spec(loaded)) for _ in range(2)]
    assert engine.queue_depth == 2
    with pytest.raises(QueueFullError) as info:
        engine.submit(spec(loaded))
    assert info.value.retry_after >= 1
    engine.close()
    assert [j.result(timeout=5)[1] for j in jobs] == ["cancelled", "cancelled"]


def test_closed_engine_refuses_jobs(loaded: LoadedModel) -> None:
    engine = Engine({loaded.name: loaded}, precision="fp32")
    engine.start()
    engine.close()
    with pytest.raises(EngineClosedError):
        engine.submit(spec(loaded))


def test_close_lets_running_jobs_finish(loaded: LoadedModel) -> None:
    engine = Engine({loaded.name: loaded}, precision="fp32")
    engine.start()
    jobs = [engine.submit(spec(loaded, n=200, seed=s)) for s in range(3)]
    engine.close(timeout=60)
    assert [j.finish_reason for j in jobs] == ["length"] * 3


@pytest.mark.parametrize(
    "bad",
    [
        {"model": "nope"},
        {"max_new_chars": 0},
        {"stop": ("",)},
        {"prompt_ids": (999,)},
    ],
)
def test_bad_specs_fail_at_submit(engine: Engine, loaded: LoadedModel, bad: dict) -> None:
    fields = spec(loaded).__dict__ | bad
    with pytest.raises(KeyError if "model" in bad else SamplingError):
        engine.submit(JobSpec(**fields))


def test_stop_strings_straddling_chunks_are_cut(engine: Engine, loaded: LoadedModel) -> None:
    plain = reference(loaded, spec(loaded, n=200, seed=3))[0]
    text = "".join(t.char for t in plain)
    stop = text[40:44]  # each character arrives in its own chunk, so the stop spans four
    s = spec(loaded, n=200, seed=3, stop=("never there", stop))
    job = engine.submit(s)
    streamed = "".join(t.char for chunk in job.chunks() for t in chunk)
    assert streamed == text[: text.index(stop)]
    assert job.finish_reason == "stop"
    assert_same(job.result()[0], reference(loaded, s)[0])


def test_held_back_stop_prefix_is_released_at_the_end(engine: Engine, loaded: LoadedModel) -> None:
    plain = reference(loaded, spec(loaded, n=30, seed=4))[0]
    text = "".join(t.char for t in plain)
    s = spec(loaded, n=30, seed=4, stop=(text[-2:] + "#",))  # its start is the text's end, never whole
    tokens, reason = engine.submit(s).result(timeout=60)
    assert ("".join(t.char for t in tokens), reason) == (text, "length")


def test_prompt_cache_hit_gives_the_same_text(engine: Engine, loaded: LoadedModel) -> None:
    s = spec(loaded, "a prompt seen twice", n=40, seed=9)
    first = engine.submit(s).result(timeout=60)
    hits = engine.prompt_cache.hits
    second = engine.submit(s).result(timeout=60)
    assert engine.prompt_cache.hits == hits + 1
    assert first == second


def test_a_burst_of_one_prompt_reads_it_once(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs waiting to read the same prompt all join when the first has read it, even with no prompt cache; each
    gives its own seed's text, and one cancelled while the prompt was read ends cancelled, not counted as done."""
    reads: list[tuple[int, ...]] = []
    reading = generation.prefill_chunks

    def counted(model, ids, state=None):
        reads.append(tuple(ids))
        jobs[2].cancel()  # admitted with the others, waiting for this read
        yield from reading(model, ids, state)

    monkeypatch.setattr("charrnn.service.engine.scheduler.prefill_chunks", counted)
    engine = Engine({loaded.name: loaded}, precision="fp32", max_batch=8, prompt_cache_bytes=0)
    specs = [spec(loaded, "one prompt for all", n=30, seed=i) for i in range(6)]
    jobs = [engine.submit(s) for s in specs]  # queued before the scheduler starts: admitted together
    engine.start()
    try:
        for i, (job, s) in enumerate(zip(jobs, specs, strict=True)):
            tokens, reason = job.result(timeout=60)
            if i == 2:
                assert reason == "cancelled"
            else:
                assert_same(tokens, reference(loaded, s)[0])
        assert len(reads) == 1
        assert engine.completed == 5
    finally:
        engine.close(timeout=5)


def test_result_waiters_sleep_until_the_end(loaded: LoadedModel) -> None:
    """A thread in result() is woken once, at the end, not at each publish of tokens (as a chunks() reader is)."""
    engine = Engine({loaded.name: loaded}, precision="fp32")  # not started: the test publishes itself
    job = engine.submit(spec(loaded))
    wakes = []

    class Counting(threading.Condition):
        def wait(self, timeout: float | None = None) -> bool:
            woken = super().wait(timeout)
            wakes.append(woken)
            return woken

    job._finished = Counting(job._lock)
    waiter = threading.Thread(target=job.result, args=(30,))
    waiter.start()
    while not job._waiting_end:
        time.sleep(0.001)
    for _ in range(50):
        job.publish([Token("a", -1.0)], interval=0.0)
    job.publish([], "length")
    waiter.join(30)
    assert not waiter.is_alive() and wakes == [True]
    engine.close()


def test_a_running_stream_is_read_a_piece_at_a_time(engine: Engine, loaded: LoadedModel) -> None:
    """A reader of a long job gets piece after piece while it runs (the kernel's path and torch's), not its
    first tokens and then nothing until the end."""
    job = engine.submit(spec(loaded, n=LONG))
    chunks: queue.Queue[list[Token]] = queue.Queue()
    reader = threading.Thread(target=lambda: [chunks.put(chunk) for chunk in job.chunks()])
    reader.start()
    try:
        pieces = [chunks.get(timeout=30) for _ in range(4)]
        assert all(pieces) and job.finish_reason is None
    finally:
        job.cancel()
        reader.join(30)


def test_prompt_cache_stays_within_its_bytes(loaded: LoadedModel) -> None:
    engine = Engine({loaded.name: loaded}, precision="fp32", prompt_cache_bytes=4096)
    engine.start()
    for i in range(20):
        engine.submit(spec(loaded, "prompt " + "abcdefghij"[i % 10] * (i + 1), n=2)).result(timeout=60)
    assert 0 < len(engine.prompt_cache) < 20
    assert engine.prompt_cache.bytes <= 4096
    engine.close()


def test_heartbeat_yields_empty_chunks_while_waiting(loaded: LoadedModel) -> None:
    engine = Engine({loaded.name: loaded}, precision="fp32")  # not started: the job waits in the queue
    job = engine.submit(spec(loaded))
    assert next(job.chunks(heartbeat=0.01)) == []
    job.cancel()
    engine.close()
    assert job.finish_reason == "cancelled"


def test_many_threads_submit_and_read_at_once(loaded: LoadedModel) -> None:
    engine = Engine({loaded.name: loaded}, precision="fp32", max_batch=16)
    engine.start()
    specs = mixed_specs(loaded, 24)
    results: dict[int, list[Token]] = {}

    def client(i: int) -> None:
        results[i] = [t for chunk in engine.submit(specs[i]).chunks() for t in chunk]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(specs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, s in enumerate(specs):
        assert_same(results[i], reference(loaded, s)[0])
    engine.close()


def test_two_models_are_batched_apart() -> None:
    a, b = tiny_model("lstm", seed=1), tiny_model("gru", seed=2)
    engine = Engine({a.name: a, b.name: b}, precision="fp32")
    engine.start()
    specs = [spec(m, n=30, seed=i) for i in range(4) for m in (a, b)]
    jobs = [engine.submit(s) for s in specs]
    for job, s in zip(jobs, specs, strict=True):
        assert_same(job.result(timeout=60)[0], reference(a if s.model == a.name else b, s)[0])
    engine.close()


# -- long prompts are read in chunks between batch steps -------------------------------------------------


def test_a_prompt_longer_than_a_chunk_gives_the_samplers_text(engine: Engine, loaded: LoadedModel) -> None:
    from charrnn.model.generation import PREFILL_CHUNK

    prompt = ("the quick brown fox jumps over the lazy dog. " * 20)[: 2 * PREFILL_CHUNK + 37]
    job = spec(loaded, prompt, n=40, seed=9)
    tokens, reason = engine.submit(job).result(timeout=60)
    want, want_reason = reference(loaded, job)
    assert_same(tokens, want)
    assert reason == want_reason


def test_streams_keep_stepping_while_a_long_prompt_is_read(loaded: LoadedModel, monkeypatch) -> None:
    """Between two chunks of a long prompt, a running stream gets characters: the prompt does not stall it."""
    import charrnn.model.generation as generation

    monkeypatch.setattr(generation, "PREFILL_CHUNK", 8)
    monkeypatch.setattr("charrnn.service.engine.scheduler.PREFILL_CHUNK", 8)
    engine = Engine({loaded.name: loaded}, precision="fp32", max_batch=4, max_queue=8)
    engine.start()
    try:
        stream = engine.submit(spec(loaded, "a", n=LONG))
        chunks = stream.chunks()
        next(chunks)  # the stream is running
        seen: list[int] = []  # the stream's characters so far, at each chunk of the long prompt
        reading = generation.prefill_chunks

        def watched(model, ids, state=None):
            for out in reading(model, ids, state):
                seen.append(stream.generated_chars)
                yield out

        monkeypatch.setattr("charrnn.service.engine.scheduler.prefill_chunks", watched)
        long_prompt = "the lazy dog sleeps. " * 10  # 210 characters: 27 chunks of 8
        tokens, reason = engine.submit(spec(loaded, long_prompt, n=5)).result(timeout=60)
        assert reason == "length" and len(tokens) == 5
        assert len(seen) == 27
        assert all(b > a for a, b in itertools.pairwise(seen))  # a step between every two chunks
        stream.cancel()
    finally:
        engine.close(timeout=5)


def test_bf16_texts_do_not_depend_on_the_batch(bf16_kernel: object) -> None:
    """With the kernel's bfloat16 arithmetic (precision "bf16" on this CPU), a seeded job gives the same
    text alone as among other jobs of every kind, joining mid-batch or not."""
    loaded = tiny_model("lstm")
    engine = Engine({loaded.name: loaded}, max_batch=16, max_queue=64, precision="bf16")
    engine.start()
    try:
        specs = mixed_specs(loaded, 12)
        alone = [engine.submit(s).result(timeout=60)[0] for s in specs]
        assert "bfloat16" in describe_batch(engine._batches[loaded.key])
        crowd = [engine.submit(s) for s in specs + mixed_specs(loaded, 20)[::-1]]
        for job, want in zip(crowd, alone, strict=False):
            assert job.result(timeout=60)[0] == want  # the same characters and the same logprob bits
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("running", "order"),
    [
        ([0, 1, 2], [0, 1, 2]),  # nobody left
        ([0, 1], [0, 1]),  # the last row left: nothing moves
        ([0, 2, 3], [0, 3, 2]),  # row 1 left: the last row takes its place
        ([1, 3, 4, 6], [4, 1, 6, 3]),  # rows 0, 2 and 5 left: 4 and 6 fill places 0 and 2
        ([], []),
    ],
)
def test_rows_that_stay_keep_their_place_and_the_last_fill_the_holes(running: list[int], order: list[int]) -> None:
    assert fill_holes(running) == order
    assert sorted(order) == running
    assert all(order[place] == row for place, row in enumerate(order) if row < len(running))
