"""Read and write the safetensors format with numpy only (no torch), tensor by tensor.

The format is an 8-byte little-endian header length, a JSON header of name -> dtype/shape/byte offsets, then the
raw little-endian data. Reading hands out one tensor at a time with positioned reads (no memory map: mapped pages
stay resident once touched, so a map of every shard would grow to the whole model), so converting a 6B
checkpoint never holds more than the tensor at hand. bfloat16 has no numpy dtype; it is carried as
`ml_dtypes.bfloat16`, bit for bit.
"""
import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from glm_tune.errors import GlmTuneError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
TAGS = {np.dtype(v): k for k, v in DTYPES.items()}


class SafetensorsError(GlmTuneError):
    """A safetensors file that is truncated or not safetensors; the message names the file and the tensor."""


class SafetensorsReader:
    def __init__(self, path):
        self.path = Path(path)
        size = self.path.stat().st_size
        advice = "the file is truncated or damaged; download it again"
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{self.path} has {size} bytes, too few for a safetensors header; {advice}")
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                raise SafetensorsError(f"{self.path}: its header claims {length} bytes but the file has {size}; "
                                       f"{advice}")
            try:
                header = json.loads(f.read(length))
                self.metadata = header.pop("__metadata__", {}) or {}
            except (ValueError, AttributeError) as err:
                raise SafetensorsError(f"{self.path} is not a safetensors file (header: {err}); {advice}") from None
        self.header = header
        self.data_start = 8 + length
        present = size - self.data_start
        for name, info in header.items():
            try:
                start, end = info["data_offsets"]
                DTYPES[info["dtype"]]
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: tensor {name} has a malformed header entry; {advice}") from None
            if end > present or start > end:
                raise SafetensorsError(f"{self.path}: tensor {name} needs bytes {start}..{end} of the data but "
                                       f"only {present} are present; {advice}")
        self._file = open(self.path, "rb")

    def keys(self):
        return list(self.header)

    def shape(self, name):
        return list(self.header[name]["shape"])

    def dtype(self, name) -> str:
        return self.header[name]["dtype"]

    def get(self, name) -> np.ndarray:
        info = self.header[name]
        start, end = info["data_offsets"]
        raw = bytearray(end - start)
        view, done = memoryview(raw), 0
        while done < len(raw):
            read = os.preadv(self._file.fileno(), [view[done:]], self.data_start + start + done)
            if read == 0:  # the file shrank since it was opened
                raise SafetensorsError(f"{self.path}: tensor {name} ends after {done} of {len(raw)} bytes; "
                                       "the file is truncated; download it again")
            done += read
        return np.frombuffer(raw, dtype=DTYPES[info["dtype"]]).reshape(info["shape"])

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a dtype name ("float32", "float16", "bfloat16" as ml_dtypes.bfloat16, ...)."""
    return np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)


def tensor_nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _layout(specs, metadata: dict = None):
    """Where everything goes in a file holding `specs` (name, shape, numpy dtype) in that order: (its
    length-prefixed JSON header, name -> (file offset of the tensor's data, shape, dtype), the file's size)."""
    header, places, offset = {}, {}, 0
    for name, shape, dtype in specs:
        nbytes = tensor_nbytes(shape, dtype)
        header[name] = {"dtype": TAGS[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        places[name] = (offset, tuple(shape), np.dtype(dtype))
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    head = struct.pack("<Q", len(raw)) + raw
    at_data = {name: (len(head) + start, shape, dtype) for name, (start, shape, dtype) in places.items()}
    return head, at_data, len(head) + offset


_WRITE_ROWS_BYTES = 64 << 20  # a non-contiguous tensor (a transpose) is copied and written this many bytes at a time


class SafetensorsFileWriter:
    """One safetensors file whose tensors are known before any is written: the header goes first, then each
    tensor is written at its own offset when it arrives, in any order, so nothing but the tensor at hand is held
    (a transposed view is written row block by row block). `close()` refuses a file with a tensor missing."""

    def __init__(self, path, specs, metadata: dict = None):
        self.path = Path(path)
        head, self._places, size = _layout(specs, metadata)
        self._missing = set(self._places)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._write_at(memoryview(head), 0)
        os.ftruncate(self._fd, size)

    def _write_at(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):  # pwrite may write less than asked (Linux: at most ~2 GB a call)
            done += os.pwrite(self._fd, view[done:], offset + done)

    def write(self, name: str, array: np.ndarray) -> None:
        offset, shape, dtype = self._places[name]
        if tuple(array.shape) != shape or array.dtype != dtype:
            raise SafetensorsError(f"{self.path}: tensor {name} was planned as {dtype} {list(shape)} but arrived "
                                   f"as {array.dtype} {list(array.shape)}")
        if name not in self._missing:
            raise SafetensorsError(f"{self.path}: tensor {name} was written twice")
        if array.ndim == 0 or array.flags.c_contiguous:
            self._write_at(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)), offset)
        else:
            rows = max(1, _WRITE_ROWS_BYTES // max(1, array[0].nbytes))
            for start in range(0, array.shape[0], rows):
                block = np.ascontiguousarray(array[start:start + rows])
                self._write_at(memoryview(block.reshape(-1).view(np.uint8)), offset)
                offset += block.nbytes
        self._missing.discard(name)

    def close(self) -> None:
        os.close(self._fd)
        if self._missing:
            raise SafetensorsError(f"{self.path}: tensors never written: {sorted(self._missing)}")


def write_safetensors(path, tensors: dict, metadata: dict = None) -> None:
    """Write name -> numpy array (any dtype in DTYPES, bfloat16 as ml_dtypes.bfloat16)."""
    writer = SafetensorsFileWriter(path, [(n, a.shape, a.dtype) for n, a in tensors.items()], metadata)
    for name, array in tensors.items():
        writer.write(name, array)
    writer.close()
