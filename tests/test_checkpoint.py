import json
import struct
from pathlib import Path

import pytest
import torch

from model.atomic import TMP_MARKER
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.network import CharRNN
from model.vocab import Vocab

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


def _with_header(data: bytes, edit) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    new = edit(header)
    raw = new if isinstance(new, bytes) else json.dumps(new).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def _set_version(header: dict) -> dict:
    meta = json.loads(header["__metadata__"]["charrnn"])
    meta["format_version"] = 99
    header["__metadata__"]["charrnn"] = json.dumps(meta)
    return header


def _vocab_mismatch(header: dict) -> dict:
    meta = json.loads(header["__metadata__"]["charrnn"])
    meta["vocab"] = meta["vocab"][:-1]
    header["__metadata__"]["charrnn"] = json.dumps(meta)
    return header


def _wrong_hidden(header: dict) -> dict:
    meta = json.loads(header["__metadata__"]["charrnn"])
    meta["model_config"]["hidden"] = 17
    header["__metadata__"]["charrnn"] = json.dumps(meta)
    return header


def _overlap(header: dict) -> dict:
    names = sorted(k for k in header if k != "__metadata__")
    a, b = header[names[0]], header[names[1]]
    if a["data_offsets"][1] - a["data_offsets"][0] == b["data_offsets"][1] - b["data_offsets"][0]:
        b["data_offsets"] = list(a["data_offsets"])
    else:
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + b["data_offsets"][1] - b["data_offsets"][0]]
    return header


def _duplicate(header: dict) -> bytes:
    name = next(k for k in header if k != "__metadata__")
    text = json.dumps(header)
    entry = json.dumps({name: header[name]})[1:-1]
    return (text[:-1] + ", " + entry + "}").encode()


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda d: b"", "too short"),
        (lambda d: d[: len(d) // 2], "outside the file|truncated"),
        (lambda d: d[:100], "truncated"),
        (lambda d: struct.pack("<Q", 10**15) + d[8:], "more than"),
        (lambda d: _with_header(d, _set_version), "format version 99"),
        (lambda d: _with_header(d, _vocab_mismatch), "vocabulary has 9 characters"),
        (lambda d: _with_header(d, _wrong_hidden), "shape"),
        (lambda d: _with_header(d, _overlap), "overlap|do not fit"),
        (lambda d: _with_header(d, _duplicate), "duplicate key"),
        (lambda d: _with_header(d, lambda h: {k: v for k, v in h.items() if k != "__metadata__"}), "without charrnn"),
        (lambda d: _with_header(d, lambda h: b"[" * 100_000), "not valid JSON"),
        (lambda d: _with_header(d, lambda h: json.dumps(h).replace("0", "NaN", 1).encode()), "not valid JSON"),
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
    from model.export import card_path
    from model.sampling import SamplingParams, generate

    shipped = Path(__file__).resolve().parents[1] / "service" / "default_model" / "shakespeare.safetensors"
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
