"""The weights of an exported Paddle program (PREFIX.json + PREFIX.pdiparams), read one tensor at a time.

`paddle.jit.save` writes the parameters into PREFIX.pdiparams one after another, in the sorted order of their
names (as Paddle's loader reads them back), each as a small header (a version, the LoD levels and a
`VarType.TensorDesc` protobuf with the dtype and dims) followed by the raw little-endian data. Reading the headers
only gives every tensor's name, dtype, shape and place in the file, so a 25 GB model is walked without loading
it, and any one tensor is read alone. `write_stand_ins` writes the same parameters with one element each: what
paddle2onnx converts when the real weights would not fit its 2 GB protobuf (the ONNX export attaches the real
tensors afterwards, one at a time).
"""
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np

from glm_tune.errors import GlmTuneError

# paddle VarType codes of a DenseTensor's dtype -> numpy
DTYPES = {0: "bool", 1: "int16", 2: "int32", 3: "int64", 4: "float16", 5: "float32", 6: "float64", 20: "uint8",
          21: "int8", 22: "bfloat16"}


class ParamsFileError(GlmTuneError):
    """PREFIX.pdiparams does not hold what PREFIX.json declares."""


@dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype_code: int
    shape: tuple
    offset: int  # of the raw data in the file
    nbytes: int

    @property
    def dtype(self) -> str:
        return DTYPES[self.dtype_code]


def numpy_dtype(dtype_code: int) -> np.dtype:
    """How the raw data of a tensor of this paddle dtype is read (bfloat16, which numpy lacks, as its bits)."""
    return np.dtype("uint16" if DTYPES[dtype_code] == "bfloat16" else DTYPES[dtype_code])


def program_parameters(graph_json: Path) -> Dict[str, list]:
    """name -> declared shape of every parameter of an exported PIR program."""
    found, stack = {}, [json.loads(Path(graph_json).read_text(encoding="utf-8"))]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            args = node.get("A")
            if node.get("#") == "p" and isinstance(args, list) and len(args) == 4 and isinstance(args[3], str):
                found[args[3]] = list(node["O"]["TT"]["D"][1])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def stored_tensors(prefix: Path) -> List[StoredTensor]:
    """Every parameter of PREFIX.pdiparams with its place in the file, checked against PREFIX.json's
    declarations (names in sorted order, shapes equal, the file read to its end)."""
    prefix = Path(prefix)
    declared = program_parameters(Path(f"{prefix}.json"))
    params_file = Path(f"{prefix}.pdiparams")
    tensors, size = [], params_file.stat().st_size
    with open(params_file, "rb") as f:
        for name in sorted(declared):
            try:
                tensor = _read_header(f, name)
            except (struct.error, KeyError, ValueError) as err:
                raise ParamsFileError(f"{params_file}: the header of {name} cannot be read ({err}); the file is "
                                      "damaged or from another export") from None
            if list(tensor.shape) != declared[name] or tensor.offset + tensor.nbytes > size:
                raise ParamsFileError(f"{params_file}: {name} is {list(tensor.shape)} with "
                                      f"{size - tensor.offset} bytes left, the program declares {declared[name]}; "
                                      "the file is truncated or from another export")
            f.seek(tensor.nbytes, 1)
            tensors.append(tensor)
        if f.tell() != size:
            raise ParamsFileError(f"{params_file}: {size - f.tell()} bytes after the last parameter; the file is "
                                  "from another export")
    return tensors


def read_tensor(params_file: Path, tensor: StoredTensor) -> np.ndarray:
    """One tensor's data (only its bytes are read)."""
    dtype = numpy_dtype(tensor.dtype_code)
    count = tensor.nbytes // dtype.itemsize
    array = np.fromfile(params_file, dtype=dtype, count=count, offset=tensor.offset)
    return array.reshape(tensor.shape)


def write_stand_ins(tensors: List[StoredTensor], params_file: Path) -> None:
    """A .pdiparams holding each parameter with its rank but one element (zero)."""
    with open(params_file, "wb") as f:
        for tensor in tensors:
            desc = b"\x08" + _varint(tensor.dtype_code) + b"".join(b"\x10" + _varint(1) for _ in tensor.shape)
            f.write(struct.pack("<IQIi", 0, 0, 0, len(desc)) + desc + b"\x00" * numpy_dtype(tensor.dtype_code).itemsize)


# ------------------------------------------------------------------------------------------------ format


def _read_header(f, name: str) -> StoredTensor:
    _, lod_levels = struct.unpack("<IQ", f.read(12))  # version, LoD levels
    for _ in range(lod_levels):
        (level_bytes,) = struct.unpack("<Q", f.read(8))
        f.seek(level_bytes, 1)
    _, desc_size = struct.unpack("<Ii", f.read(8))
    dtype_code, shape = _tensor_desc(f.read(desc_size))
    return StoredTensor(name, dtype_code, tuple(shape), f.tell(),
                        int(np.prod(shape, dtype=np.int64)) * numpy_dtype(dtype_code).itemsize)


def _tensor_desc(buf: bytes):
    """(dtype code, dims) of a serialized VarType.TensorDesc (field 1: data_type, field 2: dims)."""
    i, dtype_code, dims = 0, None, []
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if field == 1 and wire == 0:
            dtype_code, i = _read_varint(buf, i)
        elif field == 2 and wire == 0:
            dim, i = _read_varint(buf, i)
            dims.append(dim)
        elif field == 2 and wire == 2:  # packed dims
            length, i = _read_varint(buf, i)
            end = i + length
            while i < end:
                dim, i = _read_varint(buf, i)
                dims.append(dim)
        else:
            raise ValueError(f"unexpected field {field} (wire type {wire})")
    if dtype_code not in DTYPES:
        raise ValueError(f"unknown dtype code {dtype_code}")
    return dtype_code, dims


def _read_varint(buf: bytes, i: int):
    shift = value = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
