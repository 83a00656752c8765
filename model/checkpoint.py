"""Self-describing checkpoints: weights in safetensors, metadata as JSON in the same file.

One file holds everything a sampler needs (model config, vocabulary, weights) and what a resumed
run needs (optimizer moments, RNG states, the carried recurrent state). Loading never unpickles:
the header is checked here, byte by byte, before safetensors reads the tensors, and every tensor is
checked against the shapes the checkpoint's own config implies.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from model.atomic import atomic_write
from model.config import ModelConfig
from model.network import CharRNN
from model.vocab import Vocab

FORMAT = "charrnn-checkpoint"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 100 << 20  # the reference parser's own cap
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
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise CheckpointError(path, f"file is {size} bytes, more than the {MAX_FILE_BYTES}-byte limit")
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(path, f"cannot read it ({exc.strerror or exc})") from None
    header = _parse_header(path, data)
    meta = _parse_meta(path, header.pop("__metadata__", None))
    try:
        config = ModelConfig.from_dict(meta["model_config"])
        vocab = Vocab.from_json(meta["vocab"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(path, f"bad metadata: {exc}") from None
    if len(vocab) != config.vocab_size:
        raise CheckpointError(path, f"vocabulary has {len(vocab)} characters but the config says {config.vocab_size}")
    _check_weight_entries(path, header, config)
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types; all mean "bad file"
        raise CheckpointError(path, f"safetensors could not read the tensors ({exc})") from None
    weights = {k[len(MODEL_PREFIX) :]: v.float() for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    if not all(torch.isfinite(w).all() for w in weights.values()):
        raise CheckpointError(path, "weights contain NaN or infinity")
    extra = {k: v for k, v in tensors.items() if not k.startswith(MODEL_PREFIX)} if with_training_state else {}
    return Checkpoint(path, meta, config, vocab, weights, extra)


def _parse_header(path: Path, data: bytes) -> dict[str, Any]:
    """The safetensors JSON header, checked for every structural problem before any tensor is read."""
    if data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or data[:4] == b"PK\x03\x04":
        raise CheckpointError(path, "it is a pickle / torch.save file; those can run code and are never loaded")
    if len(data) < 8:
        raise CheckpointError(path, f"file is {len(data)} bytes, too short for a safetensors header (truncated?)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointError(path, f"header claims {header_len} bytes, more than the {MAX_HEADER_BYTES}-byte limit")
    if 8 + header_len > len(data):
        raise CheckpointError(path, f"header claims {header_len} bytes but the file has {len(data) - 8} (truncated?)")
    try:
        header = json.loads(data[8 : 8 + header_len], object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(path, f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "header is not a JSON object")
    _check_offsets(path, header, len(data) - 8 - header_len)
    return header


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {dup!r}")
    return dict(pairs)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _check_offsets(path: Path, header: dict[str, Any], data_len: int) -> None:
    """Every tensor's byte range must lie in the file, match its dtype and shape, and not overlap."""
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            numel = math.prod(shape)
            valid = dtype in _DTYPE_BYTES and all(isinstance(d, int) and d >= 0 for d in shape)
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(path, f"tensor {name!r} has a malformed header entry") from None
        if not valid or not (isinstance(begin, int) and isinstance(end, int)):
            raise CheckpointError(path, f"tensor {name!r} has an unknown dtype or a bad shape")
        if not 0 <= begin <= end <= data_len:
            raise CheckpointError(path, f"tensor {name!r} lies outside the file (bytes {begin}..{end} of {data_len})")
        if end - begin != numel * _DTYPE_BYTES[dtype]:
            raise CheckpointError(path, f"tensor {name!r}: {end - begin} bytes do not fit shape {shape} of {dtype}")
        spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in itertools.pairwise(spans):
        if begin_b < end_a:
            raise CheckpointError(path, f"tensors {a!r} and {b!r} overlap")


def _parse_meta(path: Path, metadata: object) -> dict[str, Any]:
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT or "charrnn" not in metadata:
        raise CheckpointError(path, "a safetensors file without charrnn metadata (not written by this project)")
    try:
        meta = json.loads(metadata["charrnn"], parse_constant=_no_constant)
    except (ValueError, TypeError, RecursionError) as exc:
        raise CheckpointError(path, f"metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(path, "metadata is not a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(path, f"format version {version!r}; this program reads version {FORMAT_VERSION}")
    return meta


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
