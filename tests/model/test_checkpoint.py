import json
import struct
from pathlib import Path

import pytest
import torch

from charrnn.model.atomic import TMP_MARKER
from charrnn.model.checkpoint import CheckpointError, check_checkpoint, load_checkpoint, save_checkpoint
from charrnn.model.config import ModelConfig
from charrnn.model.network import CharRNN
from charrnn.model.vocab import Vocab
from tests.forged_checkpoints import (
    duplicate,
    many_keys_header,
    overlap,
    set_version,
    vocab_mismatch,
    with_header,
    with_meta,
    wrong_hidden,
)

VOCAB = Vocab("abcdefgh \n")


def make_model(cell: str = "lstm") -> CharRNN:
    torch.manual_seed(0)
    return CharRNN(ModelConfig(vocab_size=len(VOCAB), cell=cell, hidden=16, embed=4, layers=2)).eval()


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_round_trip_gives_identical_logits(tmp_path: Path, cell: str) -> None:
    model = make_model(cell)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, VOCAB, {"step": 7, "val_loss": 1.5})
    ckpt = load_checkpoint(path)
    assert ckpt.config == model.config and ckpt.vocab == VOCAB
    assert ckpt.meta["step"] == 7 and ckpt.meta["format_version"] == 1
    assert ckpt.meta["torch_version"] == torch.__version__
    ids = torch.randint(0, len(VOCAB), (3, 9))
    assert torch.equal(ckpt.build_model()(ids)[0], model(ids)[0])


def test_half_precision_weights_load_as_float32(tmp_path: Path) -> None:
    model = make_model()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, VOCAB, {}, half=True)
    ckpt = load_checkpoint(path)
    assert all(w.dtype == torch.float32 for w in ckpt.weights.values())
    ids = torch.randint(0, len(VOCAB), (2, 5))
    assert torch.allclose(ckpt.build_model()(ids)[0], model(ids)[0], atol=1e-2)


def test_a_pickle_disguised_as_a_checkpoint_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.safetensors"
    torch.save({"x": Payload()}, path)  # zip-format pickle
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(path)
    import pickle

    path.write_bytes(pickle.dumps(Payload(), protocol=4))  # a bare pickle
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(path)
    assert not marker.exists()


def _valid_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "ok.safetensors"
    save_checkpoint(path, make_model(), VOCAB, {})
    return path.read_bytes()


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda d: b"", "too short"),
        (lambda d: d[: len(d) // 2], "outside the file|truncated"),
        (lambda d: d[:100], "truncated"),
        (lambda d: struct.pack("<Q", 10**15) + d[8:], "more than"),
        (lambda d: with_header(d, set_version), "format version 99"),
        (lambda d: with_header(d, vocab_mismatch), "vocabulary has 9 characters"),
        (lambda d: with_header(d, wrong_hidden), "shape"),
        (lambda d: with_header(d, overlap), "overlap|do not fit"),
        (lambda d: with_header(d, duplicate), "duplicate key"),
        (lambda d: with_header(d, lambda h: {k: v for k, v in h.items() if k != "__metadata__"}), "without charrnn"),
        (lambda d: with_header(d, lambda h: b"[" * 100_000), "not valid JSON"),
        (lambda d: with_header(d, lambda h: json.dumps(h).replace("0", "NaN", 1).encode()), "not valid JSON"),
    ],
    ids=[
        "zero-bytes",
        "truncated-half",
        "truncated-header",
        "absurd-header",
        "wrong-version",
        "vocab-vs-weights",
        "shape-vs-config",
        "overlapping-offsets",
        "duplicate-names",
        "foreign-safetensors",
        "nested-json",
        "nan",
    ],
)
def test_invalid_files_are_refused_with_a_specific_message(tmp_path: Path, corrupt, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(corrupt(_valid_bytes(tmp_path)))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=message):  # all of them header checks: the master's too
        check_checkpoint(path)


def test_the_check_without_tensors_passes_a_good_checkpoint_and_names_its_config(tmp_path: Path) -> None:
    path = tmp_path / "ok.safetensors"
    save_checkpoint(path, make_model(), VOCAB, {})
    assert check_checkpoint(path) == load_checkpoint(path).config


def test_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, make_model(), VOCAB, {"step": 1})
    before = path.read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, make_model("gru"), VOCAB, {"step": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path).meta["step"] == 1
    assert not [p for p in tmp_path.iterdir() if TMP_MARKER in p.name]


def test_unreadable_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_the_shipped_default_model_is_the_one_its_card_describes() -> None:
    from charrnn.model.decoding import SamplingParams
    from charrnn.model.export import card_path
    from charrnn.model.generation import generate

    shipped = Path(__file__).resolve().parents[2] / "service" / "default_model" / "shakespeare.safetensors"
    card = json.loads(card_path(shipped).read_text(encoding="utf-8"))
    ckpt = load_checkpoint(shipped)
    assert ckpt.config == ModelConfig.from_dict(card["model_config"])
    assert sum(t.numel() for t in ckpt.weights.values()) == card["parameters"]
    assert shipped.stat().st_size == card["file_bytes"] <= 16 * 2**20
    assert ckpt.meta["step"] == card["steps"] and ckpt.meta["corpus"] == card["corpus"]
    sample = card["sample"]
    tokens = generate(
        ckpt.build_model(),
        ckpt.vocab,
        sample["prompt"],
        sample["length"],
        SamplingParams(temperature=sample["temperature"]),
        seed=sample["seed"],
    )
    assert sample["prompt"] + "".join(t.char for t in tokens) == sample["text"]


# -- hostile headers: every check linear, every size capped -------------------------------------------


def _tensor_entry(shape: str) -> str:
    return '{"t": {"dtype": "F32", "shape": [' + shape + '], "data_offsets": [0, 0]}}'


class CountingStr(str):
    """A key that counts how often it is compared or hashed: the duplicate check's work."""

    work = 0

    def __eq__(self, other: object) -> bool:
        CountingStr.work += 1
        return str.__eq__(self, other)

    def __hash__(self) -> int:
        CountingStr.work += 1
        return str.__hash__(self)


def _duplicate_check_work(keys: int) -> int:
    from charrnn.model.strict_json import unique_object

    pairs = [(CountingStr(f"k{i}"), 0) for i in range(keys)] + [(CountingStr(f"k{keys - 1}"), 0)]
    CountingStr.work = 0
    with pytest.raises(ValueError, match=f"duplicate key 'k{keys - 1}'"):
        unique_object(pairs)
    return CountingStr.work


def test_the_duplicate_name_check_does_work_linear_in_the_names() -> None:
    small, large = _duplicate_check_work(1_000), _duplicate_check_work(10_000)
    assert large <= 12 * small  # linear: ~10x; the old check's keys.count(k) per key did ~100x
    assert large <= 5 * 10_000


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (many_keys_header(60_000), "duplicate key 'k00059999'"),
        (many_keys_header(60_000, duplicate_last=False), "more than the limit of 4096"),
        (
            _tensor_entry(",".join(["4611686018427387904"] * 50_000)),
            "bad shape",
        ),
        (_tensor_entry(",".join(["1"] * 9)), "bad shape"),
        ('{"t": {"dtype": "F32", "shape": [1e999], "data_offsets": [0, 4]}}', "bad shape"),
        ('{"t": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', "bad shape"),
        ('{"t": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}', "malformed|unknown dtype"),
    ],
    ids=[
        "duplicate-among-60k-names",
        "60k-tensors",
        "huge-dimensions",
        "rank-9",
        "infinite-dimension",
        "boolean-dimension",
        "list-dtype",
    ],
)
def test_hostile_headers_are_refused_by_checks_that_cost_little(tmp_path: Path, header, message: str) -> None:
    if isinstance(header, str):
        raw = header.encode()
        header = struct.pack("<Q", len(raw)) + raw + b"\0" * 4
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(header)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_a_bad_header_is_refused_before_the_tensors_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.safetensors"
    path.write_bytes(with_header(_valid_bytes(tmp_path), duplicate) + b"\0" * (1 << 20))
    reads: list[int] = []
    real_open = open

    def counting_open(*args, **kwargs):
        fh = real_open(*args, **kwargs)
        real_read = fh.read
        fh.read = lambda n=-1: reads.append(n) or real_read(n)  # type: ignore[method-assign]
        return fh

    monkeypatch.setattr("builtins.open", counting_open)
    with pytest.raises(CheckpointError, match="duplicate key"):
        load_checkpoint(path)
    assert reads and -1 not in reads  # the header read, never "the rest of the file"


# -- metadata: a typed schema, checked at load ----------------------------------------------------------

BAD_METADATA = [
    ("step", '"12k"', "step must be a whole number >= 0, not '12k'"),
    ("step", "-1", "step must be a whole number >= 0"),
    ("step", "1.5", "step must be a whole number"),
    ("step", "true", "step must be a whole number"),
    ("step", "1" + "0" * 30, "step must be a whole number"),
    ("corpus.name", "7", "corpus.name must be a string, not 7"),
    ("corpus.chars", '"many"', "corpus.chars must be a whole number"),
    ("corpus", '"tiny"', "corpus must be an object"),
    ("best_val_loss", "1e999", "best_val_loss must be a finite number or null"),
    ("val_loss", '"low"', "val_loss must be a finite number or null"),
    ("train_loss", "-1e999", "train_loss must be a finite number or null"),
    ("elapsed_s", "-3", "elapsed_s must be a finite number >= 0"),
    ("elapsed_s", "null", "elapsed_s must be a finite number >= 0"),
    ("world_size", "0", "world_size must be a whole number >= 1"),
    ("started_at", "5", "started_at must be a string"),
    ("preset", '["tiny"]', "preset must be a string or null"),
    ("kind", '"' + "x" * 5000 + '"', "kind must be a string"),
    ("train_config", "[]", "train_config must be an object"),
    ("notes.deep", "[1, 2, 1e999]", r"notes.deep\[2\] must be a finite number"),
    ("model_config.hidden", "16.5", "model_config.hidden must be of type int"),
    ("model_config.hidden", '"16"', "model_config.hidden must be of type int"),
    ("model_config.dropout", "1e999", "model_config.dropout must be"),
    ("vocab", '["\\n", " ", "a", "b", "c", "d", "e", "f", "g", "\\ud800"]', "lone surrogate"),
]


@pytest.mark.parametrize(
    ("field", "raw_json", "message"), BAD_METADATA, ids=[f"{f}={v[:12]}" for f, v, _ in BAD_METADATA]
)
def test_bad_metadata_is_refused_naming_the_field(tmp_path: Path, field: str, raw_json: str, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(with_meta(_valid_bytes(tmp_path), field, raw_json))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_metadata_a_trainer_writes_is_accepted(tmp_path: Path) -> None:
    meta = {
        "kind": "best", "step": 0, "train_loss": None, "val_loss": 1, "best_val_loss": 1.25, "elapsed_s": 0.5,
        "corpus": {"name": "tiny", "sha256": "ab" * 32, "chars": 100}, "train_config": {"batch": 2},
        "preset": None, "world_size": 2, "started_at": "2026-01-01T00:00:00+00:00", "saved_at": "2026-01-01T01:00",
        "exported_from": "best.safetensors", "half": False, "anything": {"else": [1, "two"]},
    }  # fmt: skip
    path = tmp_path / "ok.safetensors"
    save_checkpoint(path, make_model(), VOCAB, meta)
    assert load_checkpoint(path).meta["corpus"]["name"] == "tiny"
