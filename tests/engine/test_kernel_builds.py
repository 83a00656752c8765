"""The kernel's builds (AMX, AVX512-BF16, AVX2/FMA, portable C), chosen at run time: every build this CPU
runs is checked against PyTorch's float32 step and against the others, each keeps the seeded-batch
contract in each precision, and a build that crashes or is refused on its first step is skipped, in a
child process, without taking the service down."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from charrnn.model.decoding import Decoder, SamplingParams
from charrnn.service.config import ConfigError
from charrnn.service.engine import lstm_kernel
from charrnn.service.engine.batch import FastLSTMBatch, NativeLSTMBatch, bf16_capable, int8_capable
from charrnn.service.engine.scheduler import Engine, JobSpec
from tests.helpers import tiny_model

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the kernel with")

BUILDS_HERE = lstm_kernel.cpu_variants()
POOL = 64  # rows of random state a test batch takes its rows from


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """`chosen()` forgets what it chose before (and after)."""
    monkeypatch.setattr(lstm_kernel, "_loaded", {})


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One kernel directory for the module: each build compiled and checked once."""
    return tmp_path_factory.mktemp("kernels")


def logits_after(batch: object, rows: int, steps: int) -> torch.Tensor:
    """The logits of `rows` rows (at most POOL) after `steps` steps: row r starts from the same random state
    and reads the same random ids whatever `rows` is."""
    generator = torch.Generator().manual_seed(3)
    model = batch.model
    layers, hidden = model.config.layers, model.config.hidden
    h, c = torch.randn(2, layers, POOL, hidden, generator=generator)
    ids = torch.randint(0, model.config.vocab_size, (steps, POOL), generator=generator)
    for row in range(rows):
        batch.add(row, torch.zeros(model.config.vocab_size), (h[:, row : row + 1], c[:, row : row + 1]))
    for step in ids:
        batch.step(step[:rows].tolist())
    return batch.logits.clone()


@pytest.mark.parametrize("build", BUILDS_HERE)
def test_every_build_this_cpu_runs_is_chosen_by_name_and_matches_pytorch(
    build: str, kernels: Path, fresh: None
) -> None:
    choice = lstm_kernel.chosen(directory=kernels, build=build)
    assert choice.build == build and choice.library.charrnn_build().decode() == build
    loaded = tiny_model(hidden=48)  # 4H = 192: whole bfloat16 panels; K = 48: a k-tail for AMX tiles
    with torch.inference_mode():
        reference = logits_after(FastLSTMBatch(loaded.model, 13), 13, 5)
        fp32 = logits_after(NativeLSTMBatch(loaded.model, 13, choice.library), 13, 5)
        assert torch.allclose(fp32, reference, atol=1e-4, rtol=0)
        if bf16_capable(loaded.model, choice.library):
            bf16 = logits_after(NativeLSTMBatch(loaded.model, 13, choice.library, bf16=True), 13, 5)
            assert torch.allclose(bf16, reference, atol=0.1, rtol=0) and not torch.equal(bf16, fp32)
        if int8_capable(loaded.model, choice.library):
            int8 = logits_after(NativeLSTMBatch(loaded.model, 13, choice.library, int8=True), 13, 5)
            assert torch.allclose(int8, reference, atol=0.1, rtol=0) and not torch.equal(int8, fp32)


@pytest.mark.parametrize("rows", [9, 21])  # 21: the gates and the head shared between threads too
def test_the_float32_builds_with_avx2_agree_bit_for_bit(rows: int, kernels: Path, fresh: None) -> None:
    """AVX2 and the bfloat16 builds share the float32 code: the same fold, the same bits, the same text
    (the bfloat16 build's gates sixteen units at a time, AVX2's eight: the same operations lane by lane)."""
    fast = [build for build in BUILDS_HERE if build != "portable"]
    if len(fast) < 2:
        pytest.skip(f"this CPU runs only {BUILDS_HERE}")
    loaded = tiny_model(hidden=48)
    with torch.inference_mode():
        libraries = [lstm_kernel.chosen(directory=kernels, build=b).library for b in fast]
        results = [logits_after(NativeLSTMBatch(loaded.model, rows, library), rows, 4) for library in libraries]
    assert all(torch.equal(results[0], other) for other in results[1:])


@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16", "int8"])
@pytest.mark.parametrize("build", BUILDS_HERE)
def test_a_seeded_job_is_the_same_text_alone_and_in_any_batch_per_build(
    build: str, precision: str, kernels: Path, monkeypatch: pytest.MonkeyPatch, fresh: None
) -> None:
    monkeypatch.setenv("CHARRNN_KERNEL_BUILD", build)
    loaded = tiny_model(hidden=48)
    prompt = tuple(loaded.vocab.encode("ab"))

    def texts(seeds: list[int]) -> list[str]:
        engine = Engine({loaded.name: loaded}, max_batch=32, kernel_dir=kernels, precision=precision)
        specs = [JobSpec(loaded.name, prompt, 60, SamplingParams(temperature=1.0), seed) for seed in seeds]
        jobs = [engine.submit(spec) for spec in specs]  # queued before the start: stepped together from the first
        engine.start()
        try:
            return ["".join(t.char for t in job.result(timeout=60)[0]) for job in jobs]
        finally:
            engine.close()

    alone = texts([5])[0]
    assert texts([100, 101, 102, 5, 103, 104, 105, 106])[3] == alone  # among 7 others
    assert texts([*range(200, 215), 5, *range(300, 316)])[15] == alone  # among 31 others
    assert lstm_kernel.chosen(directory=kernels).build == build


def test_a_build_that_crashes_on_its_first_step_is_skipped_and_the_next_one_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh: None, caplog: pytest.LogCaptureFixture
) -> None:
    """What an untested build (AMX, on a machine that never ran it) may do: die of SIGILL. The check runs
    it in a child process first, so this process lives on with the next build."""
    best = BUILDS_HERE[0]
    if best == "portable":
        pytest.skip("only the portable build runs here, and it is never skipped")
    monkeypatch.setitem(lstm_kernel.VARIANTS, best, [*lstm_kernel.VARIANTS[best], "-DCHARRNN_TEST_TRAP"])
    with caplog.at_level(logging.INFO, logger="charrnn.service.engine.lstm_kernel"):
        choice = lstm_kernel.chosen(directory=tmp_path)
    assert choice.build == BUILDS_HERE[1] and choice.library is not None
    assert f"{best} skipped: its check was killed by SIGILL" in choice.describe()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"the {best} kernel build is not used: its check was killed by SIGILL" in logged
    assert f"native LSTM kernel: {BUILDS_HERE[1]}" in logged  # which build, and why, at start-up
    assert not list(tmp_path.glob(f"{lstm_kernel.kernel_path(best, tmp_path).name}.checked-*"))


def test_a_build_this_cpu_lacks_asked_for_by_name_gives_way_safely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh: None
) -> None:
    missing = [build for build in lstm_kernel.VARIANTS if build not in BUILDS_HERE]
    if not missing:
        pytest.skip("this CPU runs every build")
    monkeypatch.setenv("CHARRNN_KERNEL_BUILD", missing[0])
    choice = lstm_kernel.chosen(directory=tmp_path)
    assert choice.build in BUILDS_HERE and choice.library is not None
    assert f"{missing[0]} asked for although this CPU has no" in choice.describe()
    assert f"{missing[0]} skipped" in choice.describe() or f"{missing[0]} did not build" in choice.describe()


def test_a_passed_check_is_remembered_beside_the_library(tmp_path: Path, fresh: None) -> None:
    best = BUILDS_HERE[0]
    if best == "portable":
        pytest.skip("the portable build is never checked")
    lstm_kernel.chosen(directory=tmp_path)
    (marker,) = tmp_path.glob("*.checked-*")
    assert marker.name.startswith(lstm_kernel.kernel_path(best, tmp_path).name)
    assert lstm_kernel.check_build(lstm_kernel.kernel_path(best, tmp_path)) is None


def test_an_unknown_build_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch, fresh: None) -> None:
    monkeypatch.setenv("CHARRNN_KERNEL_BUILD", "sse2")
    with pytest.raises(ConfigError, match="CHARRNN_KERNEL_BUILD"):
        lstm_kernel.chosen()


@pytest.fixture
def emulated_amx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh: None) -> object:
    """The AMX build's tile code compiled with the tile instructions done in C (-DCHARRNN_AMX_EMULATE), as
    "amx" on a CPU said to have AMX: what this project can check of that code without AMX hardware."""
    if "bf16" not in BUILDS_HERE:
        pytest.skip("the emulated tiles need the bfloat16 build (AVX512-BF16)")
    monkeypatch.setitem(lstm_kernel.VARIANTS, "amx", [*lstm_kernel.VARIANTS["bf16"], "-DCHARRNN_AMX_EMULATE"])
    monkeypatch.setattr(lstm_kernel, "_cpu_has_amx", lambda: True)
    choice = lstm_kernel.chosen(directory=tmp_path)
    assert choice.build == "amx" and choice.library.charrnn_build() == b"amx-emulated"  # it passed its check
    return choice.library


def test_the_amx_tile_code_matches_the_bfloat16_build(emulated_amx: object, kernels: Path) -> None:
    bf16 = lstm_kernel.chosen(directory=kernels, build="bf16").library
    for hidden in (48, 64):  # K = 48: a k-tail of 16 after one whole tile; 64: whole tiles only
        loaded = tiny_model(hidden=hidden)
        with torch.inference_mode():
            reference = logits_after(FastLSTMBatch(loaded.model, 37), 37, 3)
            tiles = logits_after(NativeLSTMBatch(loaded.model, 37, emulated_amx, bf16=True), 37, 3)
            vdp = logits_after(NativeLSTMBatch(loaded.model, 37, bf16, bf16=True), 37, 3)
        assert torch.allclose(tiles, vdp, atol=1e-4, rtol=0)  # the same bfloat16 products, summed in other orders
        assert torch.allclose(tiles, reference, atol=0.1, rtol=0)


def test_the_amx_tile_code_keeps_a_rows_result_whatever_its_batch(emulated_amx: object) -> None:
    """Groups of 16 rows per tile, the last one partial: row 0 alone and among 21 and 37 rows; row 20 among
    21 (a group of 5) and among 37 (a whole group)."""
    loaded = tiny_model(hidden=48)
    with torch.inference_mode():
        one, some, many = (
            logits_after(NativeLSTMBatch(loaded.model, n, emulated_amx, bf16=True), n, 3) for n in (1, 21, 37)
        )
    assert torch.equal(one[0], some[0]) and torch.equal(one[0], many[0])
    assert torch.equal(some[20], many[20])


def int8_by_tiles_and_by_vpdpbusd(lib: object) -> None:
    """The AMX build's int8 products by tiles (every product, from 1 row) give the bits of its vpdpbusd code
    (no product by tiles), whole tiles of k or not, in groups of 16 and 32 rows or not."""
    before = lib.charrnn_set_int8_tile_rows(1)
    try:
        for hidden in (48, 64, 80):  # K = 48: a k-tail only; 64 and 128: whole tiles only; 96, 80, 160: both
            loaded = tiny_model(hidden=hidden)
            for rows in (1, 9, 21, 37):
                with torch.inference_mode():
                    lib.charrnn_set_int8_tile_rows(1)
                    tiles = logits_after(NativeLSTMBatch(loaded.model, rows, lib, int8=True), rows, 3)
                    lib.charrnn_set_int8_tile_rows(0)
                    vnni = logits_after(NativeLSTMBatch(loaded.model, rows, lib, int8=True), rows, 3)
                assert torch.equal(tiles, vnni), (hidden, rows)
    finally:
        lib.charrnn_set_int8_tile_rows(before)


@pytest.mark.skipif("amx" not in BUILDS_HERE, reason="this CPU has no AMX tiles")
def test_the_amx_int8_tiles_give_the_bits_of_vpdpbusd(kernels: Path, fresh: None) -> None:
    int8_by_tiles_and_by_vpdpbusd(lstm_kernel.chosen(directory=kernels, build="amx").library)


def test_the_amx_int8_tile_code_gives_the_bits_of_vpdpbusd(emulated_amx: object) -> None:
    int8_by_tiles_and_by_vpdpbusd(emulated_amx)


@pytest.mark.parametrize("rows", [1, 9, 21, 37])
def test_the_int8_builds_agree_bit_for_bit(rows: int, kernels: Path, fresh: None) -> None:
    """AVX2's int8 (vpmaddwd on int16), the bfloat16 build's (vpdpbusd on bytes) and the AMX build's (tiles
    from 8 rows) sum the same integers exactly and finish with the same float operations: the same bits, so
    int8 text is one text on each."""
    fast = [build for build in BUILDS_HERE if build in ("avx2", "bf16", "amx")]
    if len(fast) < 2:
        pytest.skip(f"this CPU runs only {BUILDS_HERE}")
    loaded = tiny_model(hidden=48)
    with torch.inference_mode():
        libraries = [lstm_kernel.chosen(directory=kernels, build=b).library for b in fast]
        assert all(int8_capable(loaded.model, library) for library in libraries)
        results = [logits_after(NativeLSTMBatch(loaded.model, rows, lib, int8=True), rows, 4) for lib in libraries]
    assert all(torch.equal(results[0], other) for other in results[1:])


def test_int8_rows_are_exact_sums_the_same_in_any_batch_and_on_any_thread(kernels: Path, fresh: None) -> None:
    """int8 products are exact int32 sums: a row's logits are the same bits alone, among 9 or 37 rows, on
    one thread or two."""
    lib = lstm_kernel.chosen(directory=kernels).library
    loaded = tiny_model(hidden=48)
    if not int8_capable(loaded.model, lib):
        pytest.skip("this CPU or build has no int8 step (AVX512-VNNI or AVX2)")
    results = []
    with torch.inference_mode():
        for threads in (1, 2):
            lib.charrnn_set_threads(threads)
            for n in (1, 9, 37):
                batch = NativeLSTMBatch(loaded.model, n, lib, int8=True)
                lib.charrnn_set_threads(threads)  # the batch set torch's number; this test sets its own
                results.append(logits_after(batch, n, 4)[0])
    assert all(torch.equal(results[0], other) for other in results[1:])


def test_one_row_shares_its_products_only_as_measured_and_the_bits_stay(kernels: Path, fresh: None) -> None:
    """Products of 1-3 rows (int8 and bfloat16, 1M multiply-adds or more) are shared with the helper thread
    or not as the kernel measured on this CPU; whichever way each step took (both, in runs, while the trials
    last), a row alone gives the bits of the same row among 5, whose products are always shared. The
    choice is made once per process: a test run earlier may have made it."""
    lib = lstm_kernel.chosen(directory=kernels).library
    if lib.charrnn_build().decode() == "portable":
        pytest.skip("the portable build has no helper threads")
    loaded = tiny_model(hidden=512)  # layer 0's product: 512 x 2048, 1M multiply-adds a row
    arithmetics = [{"int8": True}] if int8_capable(loaded.model, lib) else []
    arithmetics += [{"bf16": True}] if bf16_capable(loaded.model, lib) else []
    if not arithmetics:
        pytest.skip("float32 products of 1-3 rows are one unit: nothing to share")
    lib.charrnn_set_threads(2)  # a helper, whatever torch's threads are here (a batch asking for fewer keeps it)
    with torch.inference_mode():
        for options in arithmetics:
            alone = logits_after(NativeLSTMBatch(loaded.model, 1, lib, **options), 1, 80)  # 160 products
            among = logits_after(NativeLSTMBatch(loaded.model, 5, lib, **options), 5, 80)
            assert torch.equal(alone[0], among[0])
    assert lib.charrnn_small_products_shared() in (0, 1)


def test_small_products_are_timed_again_after_a_while(kernels: Path, fresh: None) -> None:
    """A trial the OS spoiled must not hold for the process's life: after a number of products taken the chosen
    way (2^15; 200 here), the kernel times both ways again and decides anew, and the bits never change."""
    lib = lstm_kernel.chosen(directory=kernels).library
    loaded = tiny_model(hidden=512)  # layer 0's product: 512 x 2048, 1M multiply-adds a row: timed
    options = {"int8": True} if int8_capable(loaded.model, lib) else {"bf16": True}
    if lib.charrnn_build().decode() == "portable" or not (options.get("int8") or bf16_capable(loaded.model, lib)):
        pytest.skip("this build has no products of 1-3 rows to share")
    lib.charrnn_set_threads(2)
    before = lib.charrnn_set_small_retrial(200)
    try:
        decided = lib.charrnn_small_trials()
        with torch.inference_mode():
            alone = logits_after(NativeLSTMBatch(loaded.model, 1, lib, **options), 1, 600)  # 1,200 products
        assert lib.charrnn_small_trials() >= decided + 2  # at most 128 + 200 + 128 + 200 + 128 products for 3
        lib.charrnn_set_small_retrial(1 << 30)
        with torch.inference_mode():
            again = logits_after(NativeLSTMBatch(loaded.model, 1, lib, **options), 1, 600)
    finally:
        lib.charrnn_set_small_retrial(before)
    assert torch.equal(alone, again) and lib.charrnn_small_products_shared() in (0, 1)


def test_the_engine_logs_once_how_the_kernel_takes_products_of_a_few_rows(
    kernels: Path, fresh: None, caplog: pytest.LogCaptureFixture
) -> None:
    """The kernel times products of 1-3 rows alone and shared, then keeps the faster way for the process: one
    stream's speed turns on it, so the log says which it is, once (at once where an earlier test decided)."""
    lib = lstm_kernel.chosen(directory=kernels).library
    if lib.charrnn_build().decode() == "portable":
        pytest.skip("the portable build has no helper threads")
    loaded = tiny_model(hidden=512)  # 1M multiply-adds a row in layer 0: products that are timed
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a helper to share with (the batch gives the kernel torch's threads)
    try:
        with caplog.at_level(logging.INFO, logger="charrnn.service.engine.scheduler"):
            engine = Engine({loaded.name: loaded}, max_batch=4, kernel_dir=kernels)
            engine.start()
            try:
                for seed in (1, 2):  # 2 x 80 steps: more than the 128 products the trial times
                    spec = JobSpec(loaded.name, tuple(loaded.vocab.encode("ab")), 80, SamplingParams(), seed)
                    engine.submit(spec).result(timeout=120)
            finally:
                engine.close()
    finally:
        torch.set_num_threads(threads)
    told = [r.getMessage() for r in caplog.records if r.getMessage().startswith("C kernel: products of 1-3 rows")]
    way = "shared with the kernel's helper threads" if lib.charrnn_small_products_shared() else "the calling thread"
    assert len(told) == 1 and way in told[0]


def test_the_engine_names_each_models_arithmetic(kernels: Path, fresh: None, caplog: pytest.LogCaptureFixture) -> None:
    lib = lstm_kernel.chosen(directory=kernels).library
    loaded = tiny_model(hidden=48)
    expected = {"fp32": "float32", "bf16": "bfloat16" if bf16_capable(loaded.model, lib) else "float32"}
    expected["int8"] = "int8" if int8_capable(loaded.model, lib) else expected["bf16"]
    expected["auto"] = expected["int8"]  # int8 wherever the build has it (AVX2, VNNI, AMX tiles: precision_flags)
    for precision, arithmetic in expected.items():
        engine = Engine({loaded.name: loaded}, max_batch=4, kernel_dir=kernels, precision=precision)
        engine.start()
        with caplog.at_level(logging.INFO, logger="charrnn.service.engine.scheduler"):
            spec = JobSpec(loaded.name, tuple(loaded.vocab.encode("ab")), 5, SamplingParams(temperature=1.0), 1)
            engine.submit(spec).result(timeout=60)
        engine.close()
        build = lib.charrnn_build().decode()
        assert f"steps with the C kernel ({build} build), {arithmetic} arithmetic" in caplog.text
        caplog.clear()


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("rows", [1, 6])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_drawing_and_stepping_in_one_call_is_the_draw_then_the_step(
    precision: str, rows: int, steps: int, kernels: Path, fresh: None
) -> None:
    """A batch whose rows all draw plainly is drawn and stepped by one kernel call, one step or several (the
    engine's usual step): the same ids, log-probabilities, logits and state, bit for bit, as the decoder's draw
    and then the step, step after step; rows with top alternatives or steering are not such rows."""
    lib = lstm_kernel.chosen(directory=kernels).library
    loaded = tiny_model(hidden=64)
    if precision == "int8" and not int8_capable(loaded.model, lib):
        pytest.skip(f"the {lib.charrnn_build().decode()} build has no int8 products")
    options = {"int8": True} if precision == "int8" else {}
    decoder = Decoder(loaded.vocab, lstm_kernel.KernelDraw(lib, len(loaded.vocab)))

    def batch_and_rows() -> tuple[NativeLSTMBatch, list]:
        batch = NativeLSTMBatch(loaded.model, 8, lib, **options)
        logits_after(batch, rows, 3)  # rows of random state
        temperatures = (0.5, 0.8, 1.0, 1.3, 0.8, 2.0)[:rows]
        samples = [decoder.new_sample(SamplingParams(temperature=t), 40 + i, 21) for i, t in enumerate(temperatures)]
        return batch, samples

    with torch.inference_mode():
        apart, apart_rows = batch_and_rows()
        fused, fused_rows = batch_and_rows()
        for _ in range(63 // steps):  # refills of the noise blocks too (sized to the samples' 21 characters)
            assert min(row.noise.available() for row in fused_rows) >= steps
            fused_ids, logprobs = fused.draw_and_step(fused_rows, steps)
            fused_tokens = decoder.plain_tokens(fused_ids, logprobs)
            for step in range(steps):
                ids, tokens = decoder.draw(apart.logits, apart_rows)
                apart.step(ids)
                assert fused_ids[step * rows : (step + 1) * rows] == ids
                assert fused_tokens[step * rows : (step + 1) * rows] == tokens
            assert torch.equal(fused.logits, apart.logits) and torch.equal(fused.hs, apart.hs)
    assert all(row.draws_plainly for row in fused_rows)
    assert not decoder.new_sample(SamplingParams(temperature=0.8), 1, 10, top_logprobs=2).draws_plainly
    assert not decoder.new_sample(SamplingParams(temperature=0.8, presence_penalty=0.5), 1, 10).draws_plainly
    assert not decoder.new_sample(SamplingParams(temperature=0.0), 1, 10).draws_plainly
