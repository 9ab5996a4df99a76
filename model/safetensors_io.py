"""safetensors files read and written in numpy, without torch or pickle (used by `model.hf`).

Format (github.com/huggingface/safetensors, README "Format"): u64 little-endian
header size N, N bytes of JSON {name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {str: str}}, then the raw little-endian tensor
bytes; offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np


class HFFormatError(ValueError):
    """A Hugging Face checkpoint or config that herd cannot read, or params it cannot write."""


# BF16 is read as raw little-endian bits, then viewed as ml_dtypes.bfloat16 after a native-order copy.
_ST_DTYPES: dict[str, np.dtype] = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
# The reference implementation refuses headers over 100 MB (safetensors/src/tensor.rs, MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000
_WRITE_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16"}


def read_safetensors_header(file: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The tensor entries (dtype, shape, absolute byte range) and the `__metadata__` of one file."""
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise HFFormatError(f"{file}: too short to be a safetensors file")
        n = int.from_bytes(raw, "little")
        if n > size - 8:
            raise HFFormatError(f"{file}: header length {n} runs past the end of the file ({size} bytes)")
        if n > MAX_HEADER_BYTES:
            raise HFFormatError(f"{file}: header length {n} exceeds the format's limit of {MAX_HEADER_BYTES} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HFFormatError(f"{file}: safetensors header is not valid JSON ({e})") from None
        except RecursionError:  # e.g. [[[[...]]]] nested deeper than Python's parser recurses
            raise HFFormatError(f"{file}: safetensors header nests too deeply to be a tensor table") from None
    if not isinstance(header, dict):
        raise HFFormatError(f"{file}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    entries = {}
    for name, e in header.items():
        try:
            dtype, shape, (begin, end) = e["dtype"], tuple(int(s) for s in e["shape"]), map(int, e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise HFFormatError(f"{file}: tensor {name!r} has a malformed header entry {e!r}") from None
        if not 0 <= begin <= end <= size - 8 - n:
            raise HFFormatError(f"{file}: tensor {name!r} byte range [{begin}, {end}) lies outside the file")
        need = math.prod(shape) * _ST_DTYPES[dtype].itemsize if dtype in _ST_DTYPES else end - begin
        if end - begin != need:
            raise HFFormatError(f"{file}: tensor {name!r} has {end - begin} bytes; {dtype} {list(shape)} needs {need}")
        entries[name] = dict(file=file, dtype=dtype, shape=shape, begin=8 + n + begin, end=8 + n + end)
    return entries, metadata


def read_entry(entry: dict[str, Any], name: str, mmaps: dict[Path, np.memmap]) -> np.ndarray:
    """One tensor as a numpy array (F32/F16 are zero-copy views of a memory map)."""
    if entry["dtype"] not in _ST_DTYPES:
        raise HFFormatError(
            f"{entry['file']}: tensor {name!r} has dtype {entry['dtype']}; supported: {', '.join(_ST_DTYPES)}"
        )
    if entry["file"] not in mmaps:
        mmaps[entry["file"]] = np.memmap(entry["file"], dtype=np.uint8, mode="r")
    raw = mmaps[entry["file"]][entry["begin"] : entry["end"]]
    x = raw.view(_ST_DTYPES[entry["dtype"]]).reshape(entry["shape"])
    if entry["dtype"] == "BF16":
        x = x.astype(np.uint16).view(ml_dtypes.bfloat16)
    return x


def read_safetensors(file: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file, as read-only numpy arrays."""
    entries, _ = read_safetensors_header(file)
    mmaps: dict[Path, np.memmap] = {}
    return {name: read_entry(e, name, mmaps) for name, e in entries.items()}


def write_safetensors(
    file: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Writes `tensors` (float32, float16 or bfloat16 numpy arrays) as one safetensors file."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, x in tensors.items():
        if x.dtype not in _WRITE_DTYPES:
            raise HFFormatError(f"{file}: tensor {name!r} has dtype {x.dtype}; writable: float32, float16, bfloat16")
        header[name] = dict(dtype=_WRITE_DTYPES[x.dtype], shape=list(x.shape), data_offsets=[offset, offset + x.nbytes])
        offset += x.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned, as the reference writer does
    tmp = Path(f"{file}.tmp")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for x in tensors.values():
            # Raw bits as little-endian integers, so bfloat16 needs no byte-order support of its own.
            f.write(np.ascontiguousarray(x).view(f"u{x.dtype.itemsize}").astype(f"<u{x.dtype.itemsize}").tobytes())
    os.replace(tmp, file)
