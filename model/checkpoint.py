"""Self-describing checkpoints: weights in safetensors, metadata as JSON in the same file.

One file holds everything a sampler needs (model config, vocabulary, weights) and what a resumed
run needs (optimizer moments, RNG states, the carried recurrent state). Loading never unpickles:
the header is checked here, byte by byte, before safetensors reads the tensors, and every tensor is
checked against the shapes the checkpoint's own config implies.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from charrnn.model.atomic import atomic_write
from charrnn.model.config import ModelConfig
from charrnn.model.network import CharRNN
from charrnn.model.strict_json import loads_strict
from charrnn.model.vocab import Vocab

FORMAT = "charrnn-checkpoint"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"
# The two checkpoints a training run keeps in its directory: `best`, the weights with the lowest validation
# loss (what a run directory means to `charrnn sample`, the API's `load` and the service), and `last`, the
# latest weights with the optimizer's and RNG's state, which --resume continues from.
BEST = "best" + SUFFIX
LAST = "last" + SUFFIX
# A header of ours is tens of KB (one entry per tensor, a few hundred tensors with the optimizer's, and
# the vocabulary); the reference parser allows 100 MB. Every check below is linear in the header, and
# these caps bound it, so a hostile file is refused in milliseconds, well inside a worker's boot timeout.
MAX_HEADER_BYTES = 16 << 20
MAX_TENSORS = 4096
MAX_RANK = 8
MAX_FILE_BYTES = 4 << 30
MODEL_PREFIX = "model."

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_WEIGHT_DTYPES = {"F32", "F16", "BF16"}


class CheckpointError(ValueError):
    """A file is not a valid checkpoint; the message says what is wrong with it."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: not a valid checkpoint: {problem}")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read and validated: its metadata, config, vocabulary and tensors."""

    path: Path
    meta: dict[str, Any]
    config: ModelConfig
    vocab: Vocab
    weights: dict[str, torch.Tensor]  # the model's state dict, float32
    extra: dict[str, torch.Tensor]  # training state (optimizer, RNG, carried state); empty in `best`

    def build_model(self, device: torch.device | str = "cpu") -> CharRNN:
        """A model in eval mode holding these weights."""
        model = CharRNN(self.config)
        model.load_state_dict(self.weights)
        return model.to(device).eval()


def run_checkpoint(path: str | Path) -> Path:
    """The checkpoint `path` names: the file itself, or a run directory's best checkpoint (BEST)."""
    path = Path(path)
    return path / BEST if path.is_dir() else path


def save_checkpoint(
    path: str | Path,
    model: CharRNN,
    vocab: Vocab,
    meta: dict[str, Any],
    extra: dict[str, torch.Tensor] | None = None,
    half: bool = False,
) -> None:
    """Write a checkpoint atomically: the previous file at `path` survives any failure."""
    if len(vocab) != model.config.vocab_size:
        raise ValueError("vocabulary size disagrees with the model config")
    weights = {
        MODEL_PREFIX + k: v.detach().to("cpu", torch.float16 if half else torch.float32).contiguous()
        for k, v in model.state_dict().items()
    }
    tensors = weights | {k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()}
    header = dict(
        meta,
        format_version=FORMAT_VERSION,
        model_config=model.config.to_dict(),
        vocab=vocab.to_json(),
        torch_version=torch.__version__,
    )
    blob = st_save(tensors, metadata={"format": FORMAT, "charrnn": json.dumps(header, allow_nan=False)})
    with atomic_write(path) as fh:
        fh.write(blob)


def load_checkpoint(path: str | Path, with_training_state: bool = False) -> Checkpoint:
    """Read and validate a checkpoint; any problem raises CheckpointError saying what it is."""
    path = Path(path)
    data, meta, config, vocab = _read_checked(path)
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types; all mean "bad file"
        raise CheckpointError(path, f"safetensors could not read the tensors ({exc})") from None
    weights = {k[len(MODEL_PREFIX) :]: v.float() for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    if not all(torch.isfinite(w).all() for w in weights.values()):
        raise CheckpointError(path, "weights contain NaN or infinity")
    extra = {k: v for k, v in tensors.items() if not k.startswith(MODEL_PREFIX)} if with_training_state else {}
    return Checkpoint(path, meta, config, vocab, weights, extra)


def check_checkpoint(path: str | Path) -> ModelConfig:
    """Read a checkpoint and check all but its tensors' values (header, metadata, weight names and shapes),
    computing nothing (shapes come from the meta device): what Gunicorn's master may do before it forks
    (service/web/warm_start.py); CheckpointError as load_checkpoint raises it."""
    return _read_checked(Path(path))[2]


def _read_checked(path: Path) -> tuple[bytes, dict[str, Any], ModelConfig, Vocab]:
    """The file's bytes, its metadata, config and vocabulary, all checked with its tensor header; no tensor is
    decoded (the file is read whole, which leaves it in the page cache for a worker's load after a warm start)."""
    data, header = _read(path)
    meta = _parse_meta(path, header.pop("__metadata__", None))
    try:
        config = ModelConfig.from_dict(_typed_model_config(meta["model_config"]))
        vocab = Vocab.from_json(meta["vocab"])
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(path, f"bad metadata: {exc}") from None
    if len(vocab) != config.vocab_size:
        raise CheckpointError(path, f"vocabulary has {len(vocab)} characters but the config says {config.vocab_size}")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in vocab.chars):
        raise CheckpointError(path, "bad metadata: vocab holds a lone surrogate, which is not a character")
    _check_weight_entries(path, header, config)
    return data, meta, config, vocab


def _read(path: Path) -> tuple[bytes, dict[str, Any]]:
    """The file's bytes and its checked header; the header is checked before the tensors are read."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise CheckpointError(path, f"file is {size} bytes, more than the {MAX_FILE_BYTES}-byte limit")
            head = fh.read(8)
            if len(head) == 8 and struct.unpack("<Q", head)[0] <= MAX_HEADER_BYTES:
                head += fh.read(struct.unpack("<Q", head)[0])
            header = _parse_header(path, head, size)
            fh.seek(0)
            data = fh.read()
    except OSError as exc:
        raise CheckpointError(path, f"cannot read it ({exc.strerror or exc})") from None
    if not data.startswith(head):
        raise CheckpointError(path, "the file changed while it was read")
    return data, header


def _parse_header(path: Path, data: bytes, size: int) -> dict[str, Any]:
    """The safetensors JSON header (`data`: the file's first bytes, `size`: its length), checked for
    every structural problem before any tensor is read."""
    if data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or data[:4] == b"PK\x03\x04":
        raise CheckpointError(path, "it is a pickle / torch.save file; those can run code and are never loaded")
    if len(data) < 8:
        raise CheckpointError(path, f"file is {len(data)} bytes, too short for a safetensors header (truncated?)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointError(path, f"header claims {header_len} bytes, more than the {MAX_HEADER_BYTES}-byte limit")
    if 8 + header_len > size:
        raise CheckpointError(path, f"header claims {header_len} bytes but the file has {size - 8} (truncated?)")
    header = _json(path, "header", data[8 : 8 + header_len])
    if not isinstance(header, dict):
        raise CheckpointError(path, "header is not a JSON object")
    if len(header) > MAX_TENSORS + 1:
        raise CheckpointError(path, f"header lists {len(header) - 1} tensors, more than the limit of {MAX_TENSORS}")
    _check_offsets(path, header, size - 8 - header_len)
    return header


def _json(path: Path, what: str, text: bytes | str) -> Any:
    """`text` parsed strictly (duplicate keys, NaN and Infinity refused; each check linear in the text)."""
    try:
        return loads_strict(text)
    except (ValueError, TypeError, RecursionError) as exc:
        raise CheckpointError(path, f"{what} is not valid JSON ({exc})") from None


def _check_offsets(path: Path, header: dict[str, Any], data_len: int) -> None:
    """Every tensor's byte range must lie in the file, match its dtype and shape, and not overlap."""
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            # every dimension at most the file's length: math.prod of huge ones would be big-int work
            valid = dtype in _DTYPE_BYTES and isinstance(shape, list) and len(shape) <= MAX_RANK
            valid = valid and all(_is_int(d) and 0 <= d <= data_len for d in shape)
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(path, f"tensor {name!r} has a malformed header entry") from None
        if not valid or not (_is_int(begin) and _is_int(end)):
            raise CheckpointError(path, f"tensor {name!r} has an unknown dtype or a bad shape")
        numel = math.prod(shape)
        if not 0 <= begin <= end <= data_len:
            raise CheckpointError(path, f"tensor {name!r} lies outside the file (bytes {begin}..{end} of {data_len})")
        if end - begin != numel * _DTYPE_BYTES[dtype]:
            raise CheckpointError(path, f"tensor {name!r}: {end - begin} bytes do not fit shape {shape} of {dtype}")
        spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in itertools.pairwise(spans):
        if begin_b < end_a:
            raise CheckpointError(path, f"tensors {a!r} and {b!r} overlap")


def _is_int(value: object) -> bool:
    return type(value) is int  # not bool, which JSON's true would be


def _parse_meta(path: Path, metadata: object) -> dict[str, Any]:
    if (
        not isinstance(metadata, dict)
        or metadata.get("format") != FORMAT
        or not isinstance(metadata.get("charrnn"), str)
    ):
        raise CheckpointError(path, "a safetensors file without charrnn metadata (not written by this project)")
    meta = _json(path, "metadata", metadata["charrnn"])
    if not isinstance(meta, dict):
        raise CheckpointError(path, "metadata is not a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(path, f"format version {version!r}; this program reads version {FORMAT_VERSION}")
    problem = _schema_problem(meta, META_SCHEMA, "") or _non_finite(meta)
    if problem:
        raise CheckpointError(path, f"bad metadata: {problem}")
    return meta


# -- the metadata's schema --------------------------------------------------------------------------
# What each field a checkpoint's metadata may carry must hold, as (check, what it must be). All are
# optional (a checkpoint saved with `meta={}` is valid); a field that holds anything else refuses the
# file, naming the field, so that nothing downstream (GET /models, --resume, export) meets a "12k"
# step or a numeric corpus name. Fields not listed are kept as written, but must be finite too.

Check = Callable[[object], bool]
MAX_TEXT = 4096  # characters in a name, a hash or a timestamp


def _whole(low: int) -> Check:
    return lambda v: _is_int(v) and low <= v < 1 << 63


def _finite(v: object) -> bool:
    return type(v) in (int, float) and math.isfinite(v)  # type: ignore[arg-type]


def _text(v: object) -> bool:
    return type(v) is str and len(v) <= MAX_TEXT


def _or_null(check: Check) -> Check:
    return lambda v: v is None or check(v)


def _file_entries(v: object) -> bool:
    """[[path, bytes], ...]: a corpus's files as data.Corpus.files records them."""
    return isinstance(v, list) and all(
        isinstance(e, list) and len(e) == 2 and _text(e[0]) and _whole(0)(e[1]) for e in v
    )


CORPUS_SCHEMA: dict[str, tuple[Check, str]] = {
    "name": (_text, "a string"),
    "sha256": (_text, "a string"),
    "chars": (_whole(0), "a whole number >= 0"),
    "files": (_file_entries, "a list of [path, bytes] pairs"),
}
# The model a run was fine-tuned from (--init-from): model/finetune.py's Parent.record.
PARENT_SCHEMA: dict[str, tuple[Check, str]] = {
    "name": (_text, "a string"),
    "sha256": (_text, "a string"),
    "file": (_text, "a string"),
    "corpus": (_or_null(lambda v: isinstance(v, dict)), "an object or null"),
    "steps": (_or_null(_whole(0)), "a whole number >= 0 or null"),
}
META_SCHEMA: dict[str, tuple[Check, str]] = {
    "kind": (_text, "a string"),
    "step": (_whole(0), "a whole number >= 0"),
    "train_loss": (_or_null(_finite), "a finite number or null"),
    "val_loss": (_or_null(_finite), "a finite number or null"),
    "best_val_loss": (_or_null(_finite), "a finite number or null"),
    "elapsed_s": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "corpus": (lambda v: isinstance(v, dict), "an object"),
    "train_config": (lambda v: isinstance(v, dict), "an object"),
    "preset": (_or_null(_text), "a string or null"),
    "world_size": (_whole(1), "a whole number >= 1"),
    "started_at": (_text, "a string (a timestamp)"),
    "saved_at": (_text, "a string (a timestamp)"),
    "exported_from": (_text, "a string"),
    "half": (lambda v: type(v) is bool, "true or false"),
    "torch_version": (_text, "a string"),
    "model_config": (lambda v: isinstance(v, dict), "an object"),
    "vocab": (lambda v: isinstance(v, list), "a list of characters"),
    "parent": (lambda v: isinstance(v, dict), "an object"),
    "earlier_corpora": (lambda v: isinstance(v, list) and all(isinstance(c, dict) for c in v), "a list of objects"),
    "tokenisation": (_text, "a string"),
}
_NESTED = {"corpus": CORPUS_SCHEMA, "parent": PARENT_SCHEMA}


def _schema_problem(data: dict[str, Any], schema: dict[str, tuple[Check, str]], prefix: str) -> str | None:
    """What is wrong with the first field of `data` that breaks `schema`, naming it; None if none."""
    for key, (check, what) in schema.items():
        if key in data and not check(data[key]):
            return f"{prefix}{key} must be {what}, not {_short(data[key])}"
        if key in _NESTED and isinstance(data.get(key), dict):
            problem = _schema_problem(data[key], _NESTED[key], f"{prefix}{key}.")
            if problem:
                return problem
    return None


def _non_finite(meta: dict[str, Any]) -> str | None:
    """The first field holding NaN or an infinity (JSON's 1e999 parses as one), anywhere; None if none."""
    stack: list[tuple[str, object]] = [(k, v) for k, v in meta.items()]
    while stack:  # iterative: the parser allows nesting as deep as the recursion limit
        name, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return f"{name} must be a finite number, not {value}"
        if isinstance(value, dict):
            stack.extend((f"{name}.{k}", v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{name}[{i}]", v) for i, v in enumerate(value))
    return None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _typed_model_config(data: object) -> object:
    """`data` if each ModelConfig field it holds has that field's JSON type (ModelConfig checks ranges)."""
    if not isinstance(data, dict):
        return data  # ModelConfig.from_dict says what is wrong
    for field in dataclasses.fields(ModelConfig):
        value = data.get(field.name)
        if field.name not in data:
            continue
        ok = {"int": _is_int, "float": _finite, "str": lambda v: type(v) is str}[field.type](value)
        if not ok:
            raise ValueError(f"model_config.{field.name} must be of type {field.type}, not {_short(value)}")
    return data


def _check_weight_entries(path: Path, header: dict[str, Any], config: ModelConfig) -> None:
    """The weight tensors must be exactly those the config implies, with the same shapes."""
    with torch.device("meta"):
        expected = {MODEL_PREFIX + k: list(v.shape) for k, v in CharRNN(config).state_dict().items()}
    found = {k: v for k, v in header.items() if k.startswith(MODEL_PREFIX)}
    missing, unexpected = expected.keys() - found.keys(), found.keys() - expected.keys()
    if missing or unexpected:
        detail = f"missing {sorted(missing)}" if missing else f"unexpected {sorted(unexpected)}"
        raise CheckpointError(path, f"weights do not match the config: {detail}")
    for name, shape in expected.items():
        if found[name]["shape"] != shape:
            raise CheckpointError(path, f"{name} has shape {found[name]['shape']} but the config implies {shape}")
        if found[name]["dtype"] not in _WEIGHT_DTYPES:
            raise CheckpointError(path, f"{name} has dtype {found[name]['dtype']}, not a float type")
