"""Checkpoint files forged for the tests that a loader must refuse: the safetensors header edited (a newer
format version, a vocabulary that disagrees with the weights, overlapping or duplicate tensors, hostile
shapes, metadata fields set to raw JSON). Used by tests/model/test_checkpoint.py and the service's tests."""

from __future__ import annotations

import json
import struct


def with_header(data: bytes, edit) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    new = edit(header)
    raw = new if isinstance(new, bytes) else json.dumps(new).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def set_version(header: dict) -> dict:
    meta = json.loads(header["__metadata__"]["charrnn"])
    meta["format_version"] = 99
    header["__metadata__"]["charrnn"] = json.dumps(meta)
    return header


def vocab_mismatch(header: dict) -> dict:
    meta = json.loads(header["__metadata__"]["charrnn"])
    meta["vocab"] = meta["vocab"][:-1]
    header["__metadata__"]["charrnn"] = json.dumps(meta)
    return header


def wrong_hidden(header: dict) -> dict:
    meta = json.loads(header["__metadata__"]["charrnn"])
    meta["model_config"]["hidden"] = 17
    header["__metadata__"]["charrnn"] = json.dumps(meta)
    return header


def overlap(header: dict) -> dict:
    names = sorted(k for k in header if k != "__metadata__")
    a, b = header[names[0]], header[names[1]]
    if a["data_offsets"][1] - a["data_offsets"][0] == b["data_offsets"][1] - b["data_offsets"][0]:
        b["data_offsets"] = list(a["data_offsets"])
    else:
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + b["data_offsets"][1] - b["data_offsets"][0]]
    return header


def duplicate(header: dict) -> bytes:
    name = next(k for k in header if k != "__metadata__")
    text = json.dumps(header)
    entry = json.dumps({name: header[name]})[1:-1]
    return (text[:-1] + ", " + entry + "}").encode()


def many_keys_header(keys: int, duplicate_last: bool = True) -> bytes:
    """A file whose header is one flat object of `keys` short names, the last one repeated.

    The shape of header that made the old duplicate check quadratic (`keys.count(k)` for every key
    before the repeated one, and names of one length compare slowly): 60,000 names, 840 KB, cost it
    about a minute.
    """
    names = [f"k{i:08}" for i in range(keys)] + ([f"k{keys - 1:08}"] if duplicate_last else [])
    raw = ("{" + ",".join(f'"{n}":0' for n in names) + "}").encode()
    return struct.pack("<Q", len(raw)) + raw


RAW = "__raw_json__"


def with_meta(data: bytes, field: str, raw_json: str) -> bytes:
    """`data` with metadata field `field` (dotted: corpus.name) set to the JSON text `raw_json`."""

    def edit(header: dict) -> dict:
        meta = json.loads(header["__metadata__"]["charrnn"])
        *parents, last = field.split(".")
        target = meta
        for name in parents:
            target = target.setdefault(name, {})
        target[last] = RAW
        header["__metadata__"]["charrnn"] = json.dumps(meta).replace(json.dumps(RAW), raw_json)
        return header

    return with_header(data, edit)
