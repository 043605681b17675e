"""Memory-mapped safetensors reading and streaming writing, with bfloat16 and clear corruption errors.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
data_offsets), then the raw bytes. We parse it ourselves so that tensors are zero-copy views of a
memory map (no second copy of the checkpoint in host memory) and bfloat16 needs no torch.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from loopus_jax.errors import LoopusError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One `.safetensors` file; `get(name)` is a read-only view into a memory map."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        bad = f"{self.path} is truncated or corrupt"
        if size < 8:
            raise LoopusError(f"{bad}: {size} bytes, shorter than the 8-byte header length")
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER or 8 + n > size:
                raise LoopusError(f"{bad}: header length {n} does not fit in {size} bytes")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise LoopusError(f"{bad}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise LoopusError(f"{bad}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_len = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype = DTYPES[e["dtype"]]
                shape = tuple(int(s) for s in e["shape"])
                start, end = (int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise LoopusError(f"{bad}: tensor {name!r} has a malformed header entry {e!r}") from None
            if end > data_len:
                raise LoopusError(f"{bad}: tensor {name!r} ends at byte {end} but the data is {data_len} bytes")
            if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or start < 0:
                raise LoopusError(f"{bad}: tensor {name!r} byte range does not match its shape {shape}")
            self._entries[name] = (dtype, shape, start, end)
        self._mm: mmap.mmap | None = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        dtype, shape, start, end = self._entries[name]
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        n = end - start
        buf = np.frombuffer(self._mm, dtype=np.uint8, count=n, offset=self._data_start + start)
        return buf.view(dtype).reshape(shape)

    def release(self) -> None:
        """Drop the mapped pages from this process's resident set (they stay valid: re-read on access)."""
        if self._mm is not None and hasattr(self._mm, "madvise"):
            self._mm.madvise(mmap.MADV_DONTNEED)


class SafetensorsDir:
    """All tensors of an HF checkpoint directory: `model.safetensors`, or shards with an index."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        self._where: dict[str, SafetensorsFile] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise LoopusError(f"{index} is corrupt: {e!r}") from None
            files = {f: None for f in weight_map.values()}
            for f in files:
                if not (self.path / f).exists():
                    raise LoopusError(f"{index} names shard {f}, which is missing from {self.path}")
                files[f] = SafetensorsFile(self.path / f)
            for name, f in weight_map.items():
                if name not in files[f]:
                    raise LoopusError(f"{index} puts {name} in {f}, but that shard has no such tensor")
                self._where[name] = files[f]
        else:
            shards = sorted(self.path.glob("*.safetensors"))
            if not shards:
                raise LoopusError(f"no *.safetensors files in {self.path}")
            for s in shards:
                sf = SafetensorsFile(s)
                for name in sf.keys():
                    self._where[name] = sf

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._where[name].dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)

    def release(self) -> None:
        for f in set(self._where.values()):
            f.release()


# A tensor to write: name, shape, dtype, and a function producing its array when its turn comes.
PendingTensor = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


def write_safetensors(path: str | os.PathLike, tensors: Iterable[PendingTensor], metadata: dict | None = None) -> int:
    """Write tensors one at a time (each produced just before it is written); returns bytes of data."""
    tensors = list(tensors)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in tensors:
        dtype = np.dtype(dtype)
        if dtype not in CODES:
            raise LoopusError(f"cannot write tensor {name}: dtype {dtype} has no safetensors code")
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype, produce in tensors:
            arr = np.ascontiguousarray(produce())
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise AssertionError(f"{name}: produced {arr.shape} {arr.dtype}, declared {shape} {dtype}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
    os.replace(tmp, path)
    return offset


def plan_shards(sizes: Iterator[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Group tensor names in order into shards of at most `max_bytes` (a bigger tensor sits alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes:
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards
