"""The step graph for ONNX Runtime: PaddlePaddle's own converter (paddle2onnx) on the exported Paddle graph, and
weight-only int8 / int4 copies made by onnxruntime's MatMulNBits quantizer.

paddle2onnx is called through its C++ entry point: its Python wrapper swallows a conversion error, prints it and
calls sys.exit, and then spends ~10 s in a Polygraphy constant-folding pass that ONNX Runtime's own graph
optimizer repeats at session start anyway. The C++ converter aborts the whole process on an operator it cannot
convert, without naming it, so it runs in a child process and the error names the program's operators that
are neither known to convert here nor in paddle2onnx's own list.

Past protobuf's 2 GB (a 6B model: 25 GB in fp32, ~3.5 GB even in int4) paddle2onnx cannot return the graph at all:
its C++ export serializes the whole model into one message. So it never sees the weights: it converts the program
with one-element stand-ins of every parameter (the graph is the same: its nodes do not depend on the weights'
values, and each weight comes out as an initializer named after its parameter), then the real tensors are attached
one at a time from PREFIX.pdiparams, inline when the graph stays under `inline_limit` bytes, else written to
PREFIX.onnx.data (ONNX external data; offsets aligned so ONNX Runtime can map them). The quantized graphs are made
the same way: each weight matmul becomes `MatMulNBits` from one weight read at a time with onnxruntime's own block
quantizer, so no step holds more than one tensor beyond what it writes.
"""
import os
import shutil
import tempfile
from pathlib import Path

from glm_tune.errors import GlmTuneError

OPSET = 17
QUANTIZATIONS = {"int8": 8, "int4": 4}
# Weights per scale: 128 for both. Measured at ChatGLM2-6B's layer shapes, one token, 2 threads
# (bench/matmul_nbits.py, bench/RESULTS.md): MatMulNBits reads int8 blocks of 32 / 64 / 128 at 0.70 / 0.73 / 0.82
# of the machine's plain read bandwidth and int4 at 0.72 / 0.74 / 0.97. 128 is also onnxruntime's own 4-bit
# quantizer's default and GPTQ's / AWQ's usual group size; on the tests' demo recipe int4 in blocks of 128 kept 85
# of 100 dev answers equal to fp32's against 76 in blocks of 32 (ROUGE-L 65.98 / 65.14, fp32 65.36: both noise).
# chatglm.cpp's q4_0 uses 32: --quantize_block_size 32 gives that.
BLOCK_SIZES = {"int8": 128, "int4": 128}
BLOCK_CHOICES = (16, 32, 64, 128, 256)  # what MatMulNBits takes
ACCURACY_LEVEL = 4  # MatMulNBits computes with int8 activations: onnxruntime's fastest CPU kernel
# Weights above this go to the graph's data file. Protobuf stops at 2 GiB, but an inline graph costs twice its
# size to write (the message, then its serialization) and again to load (ONNX Runtime parses it, then copies each
# initializer), while a data file is written a tensor at a time and mapped by ONNX Runtime: measured on the 2-layer
# 6B-shape model, quantizing to a 1.7 GB inline int8 graph peaked at 7.4 GB, to a data file at 1.85 GB.
INLINE_LIMIT = 256 * 2 ** 20
MAX_INLINE = 1800 * 2 ** 20  # what protobuf's 2 GiB leaves for weights beside the graph itself
DATA_ALIGNMENT = 64 * 1024  # external tensors start at multiples of this: ONNX Runtime maps aligned ones
SMALL_TENSOR = 64 * 1024  # smaller tensors (norms, biases) stay inline even in a graph with a data file


class OnnxExportError(GlmTuneError):
    """The step graph could not be written as ONNX; the message names the operator or the file."""


# Run in a child process: on an operator it cannot convert, paddle2onnx's C++ converter aborts the process
# (SIGABRT) without naming the operator.
_CONVERT = """
import sys
import paddle2onnx.paddle2onnx_cpp2py_export as c_p2o
model = c_p2o.export(sys.argv[1] + ".json", sys.argv[1] + ".pdiparams", int(sys.argv[3]), True, False, True, True,
                     True, {}, "onnxruntime", "", sys.argv[2] + ".data", False)
if not model:
    sys.exit(3)
open(sys.argv[2], "wb").write(model)
"""

# pd_op operators of the three generations' step graphs, all converted by paddle2onnx 2.1.0.
CONVERTED_OPS = {"add", "arange", "bitwise_and", "bmm", "cast", "concat", "cos", "data", "divide", "einsum",
                 "elementwise_pow", "embedding", "expand", "fetch", "flatten", "full", "full_int_array", "full_like",
                 "full_with_tensor", "gather_nd", "gelu", "if", "layer_norm", "matmul", "max", "mean", "multiply",
                 "pow", "reshape", "rsqrt", "scale", "shape64", "silu", "sin", "slice", "softmax", "split",
                 "split_with_num", "squeeze", "stack", "subtract", "tile", "transpose", "tril", "unsqueeze", "where"}


def program_operators(graph_json: Path) -> set:
    """Names of the pd_op operators in an exported PIR program (PREFIX.json)."""
    import json

    found, stack = set(), [json.loads(graph_json.read_text(encoding="utf-8"))]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            name = node.get("#")
            if isinstance(name, str) and name.startswith("1.") and ("A" in node or "O" in node):
                found.add(name[2:].rstrip("_"))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def suspect_operators(graph_json: Path) -> list:
    """Operators of the program that are neither known to convert nor in paddle2onnx's own (old-IR) list."""
    import paddle2onnx.paddle2onnx_cpp2py_export as c_p2o

    listed = set(c_p2o.get_all_supported_operators_pir())
    return sorted(op for op in program_operators(graph_json) - CONVERTED_OPS
                  if not {op, f"elementwise_{op}", f"{op}_v2", f"reduce_{op}"} & listed)


def convert_to_onnx(paddle_prefix: Path, onnx_file: Path, inline_limit: int = INLINE_LIMIT) -> dict:
    """PREFIX.json + PREFIX.pdiparams (the exported step graph) -> onnx_file, opset 17, its weights inline or in
    onnx_file.data (see the module's notes); returns its description for PREFIX.generation.json."""
    import onnx

    from glm_tune.deployment.paddle_params import read_tensor, stored_tensors, write_stand_ins

    paddle_prefix, onnx_file = Path(paddle_prefix), Path(onnx_file)
    tensors = {t.name: t for t in stored_tensors(paddle_prefix)}
    with tempfile.TemporaryDirectory(prefix=".stand-ins.", dir=onnx_file.parent) as work:
        stand_in = Path(work) / paddle_prefix.name
        shutil.copyfile(f"{paddle_prefix}.json", f"{stand_in}.json")
        write_stand_ins(list(tensors.values()), Path(f"{stand_in}.pdiparams"))
        converted = _run_paddle2onnx(stand_in, Path(work) / onnx_file.name, report_as=paddle_prefix)
        model = onnx.load(str(converted))
    constants_as_initializers(model)
    # Each parameter must come out as its own initializer: one that paddle2onnx folded into another constant
    # would carry the stand-in's value into the graph.
    missing = sorted(set(tensors) - {init.name for init in model.graph.initializer})
    if missing:
        raise OnnxExportError(f"paddle2onnx folded the parameters {', '.join(missing[:5])} of {paddle_prefix}.json "
                              "into other constants, so their weights cannot be attached; export with --onnx False "
                              "to keep the Paddle Inference engine only")
    params_file = Path(f"{paddle_prefix}.pdiparams")
    with TensorSink(onnx_file, external=sum(t.nbytes for t in tensors.values()) > inline_limit) as sink:
        for index, init in enumerate(model.graph.initializer):
            if init.name in tensors:
                model.graph.initializer[index].CopyFrom(sink.add(init.name, read_tensor(params_file,
                                                                                          tensors[init.name])))
        onnx.save(model, str(onnx_file))
    return {"file": onnx_file.name, "opset": OPSET, **sink.description()}


def _run_paddle2onnx(paddle_prefix: Path, onnx_file: Path, report_as: Path) -> Path:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _CONVERT, str(paddle_prefix), str(onnx_file), str(OPSET)],
                          capture_output=True, text=True, errors="replace")
    if done.returncode or not onnx_file.is_file():
        suspects = suspect_operators(Path(f"{paddle_prefix}.json"))
        lines = [line.replace("[Paddle2ONNX]", "").strip() for line in (done.stdout + done.stderr).splitlines()
                 if "ERROR" in line]
        detail = (f"operators it cannot convert: {', '.join(suspects)}" if suspects
                  else (lines[-1] if lines else f"exit status {done.returncode}"))
        raise OnnxExportError(f"paddle2onnx could not convert {report_as}.json ({detail}); export with "
                              "--onnx False to keep the Paddle Inference engine only")
    return onnx_file


def constants_as_initializers(model) -> None:
    """paddle2onnx's C++ converter emits every weight as a Constant node; graph initializers are what the
    weight-only quantization (and onnxruntime's constant folding) recognise as weights."""
    import onnx

    graph = model.graph
    kept = []
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if node.op_type == "Constant" and value is not None and node.output[0] not in used:
            continue  # a constant no node reads (paddle2onnx leaves some)
        if node.op_type == "Constant" and value is not None:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


class TensorSink:
    """Where a graph's tensors go: inline in the proto, or appended to GRAPH.data (aligned, written as they come)
    and referenced from the proto by offset. Removes a half-written data file when the block fails."""

    def __init__(self, onnx_file: Path, external: bool):
        self.external = external
        self.data_file = Path(onnx_file).with_name(Path(onnx_file).name + ".data")
        self._out = None

    def __enter__(self) -> "TensorSink":
        if self.external:
            self._out = open(self.data_file, "wb")
        return self

    def __exit__(self, kind, *_):
        if self._out is not None:
            self._out.close()
            if kind is not None:
                self.data_file.unlink(missing_ok=True)
        return False

    def add(self, name: str, array):
        import numpy as np
        from onnx import TensorProto, helper, numpy_helper

        if not self.external or array.nbytes < SMALL_TENSOR:
            return numpy_helper.from_array(np.ascontiguousarray(array), name)
        offset = -(-self._out.tell() // DATA_ALIGNMENT) * DATA_ALIGNMENT
        self._out.write(b"\0" * (offset - self._out.tell()))
        np.ascontiguousarray(array).tofile(self._out)
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                             dims=array.shape, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.data_file.name), ("offset", str(offset)),
                           ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    def description(self) -> dict:
        """{"data": {"file", "bytes"}} for an external graph (what opening it checks), {} for an inline one."""
        if not self.external:
            return {}
        return {"data": {"file": self.data_file.name, "bytes": os.path.getsize(self.data_file)}}


def converter_constant_matmuls(model) -> list:
    """MatMul nodes whose constant operand paddle2onnx made (named p2o.*), not one of the model's weights: the
    step graph's rotary pair swap ([dim, dim] of -1, 0, 1) must stay exact, and with int8 activations
    (accuracy_level 4) a quantized rotary would lose precision at every layer."""
    made = {i.name for i in model.graph.initializer if i.name.startswith("p2o.")}
    return [node.name for node in model.graph.node if node.op_type == "MatMul" and node.input[1:2] and
            node.input[1] in made]


def quantize_weights(onnx_file: Path, out_file: Path, quantization: str, inline_limit: int = INLINE_LIMIT,
                     block_size: int = None) -> dict:
    """A weight-only quantized copy of `onnx_file`: every MatMul with one of the model's weights becomes
    MatMulNBits (blocks of `block_size`, default BLOCK_SIZES; symmetric; accuracy level 4), as onnxruntime's
    MatMulNBitsQuantizer makes it, one weight read and quantized at a time; returns its description for
    PREFIX.generation.json."""
    import onnx
    from onnx import helper

    onnx_file, out_file = Path(onnx_file), Path(out_file)
    bits = QUANTIZATIONS[quantization]
    block_size = block_size or BLOCK_SIZES[quantization]
    model = onnx.load(str(onnx_file), load_external_data=False)
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    own = set(converter_constant_matmuls(model))
    targets = {node.name: node for node in graph.node if node.op_type == "MatMul" and node.name not in own and
               node.input[1] in initializers and len(initializers[node.input[1]].dims) == 2}
    if not targets:
        raise OnnxExportError(f"{onnx_file}: no MatMul with a constant weight to quantize")
    quantized_names = {node.input[1] for node in targets.values()}

    def weight(tensor):  # one tensor, from the proto or from the graph's data file
        return read_initializer(tensor, onnx_file.parent)

    kept_bytes = sum(tensor_bytes(i) for i in graph.initializer if i.name not in quantized_names)
    quantized_bytes = sum(tensor_bytes(initializers[n]) for n in quantized_names) * bits // 32
    new_initializers, new_nodes = [], []
    with TensorSink(out_file, external=kept_bytes + quantized_bytes > inline_limit) as sink:
        for init in graph.initializer:
            if init.name not in quantized_names:
                new_initializers.append(sink.add(init.name, weight(init)) if
                                        init.data_location == onnx.TensorProto.EXTERNAL else init)
        for node in graph.node:
            if node.name not in targets:
                new_nodes.append(node)
                continue
            b = weight(initializers[node.input[1]])
            packed, scales = block_quantize(b, bits, block_size)
            rows, cols = b.shape
            name = node.input[1]
            new_initializers += [sink.add(f"{name}_Q{bits}", packed), sink.add(f"{name}_scales", scales)]
            new_nodes.append(helper.make_node(
                "MatMulNBits", [node.input[0], f"{name}_Q{bits}", f"{name}_scales"], [node.output[0]],
                name=f"{node.name}_Q{bits}", domain="com.microsoft", K=rows, N=cols, bits=bits, block_size=block_size,
                accuracy_level=ACCURACY_LEVEL))
            del b, packed, scales
        del graph.initializer[:]
        graph.initializer.extend(new_initializers)
        del graph.node[:]
        graph.node.extend(new_nodes)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        onnx.save(model, str(out_file))
    return {"file": out_file.name, "bits": bits, "block_size": block_size, "symmetric": True,
            "accuracy_level": ACCURACY_LEVEL, "quantized_matmuls": len(targets), **sink.description()}


def read_initializer(tensor, folder: Path):
    """An initializer's array; an external one is read from its data file without filling the proto (onnx's
    numpy_helper.to_array loads the data into the tensor proto itself, so a graph's weights would pile up)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    if tensor.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    where = {entry.key: entry.value for entry in tensor.external_data}
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    count = int(np.prod(tensor.dims, dtype=np.int64))
    array = np.fromfile(Path(folder) / where["location"], dtype=dtype, count=count, offset=int(where.get("offset", 0)))
    if array.size != count:
        raise OnnxExportError(f"{Path(folder) / where['location']} ends inside {tensor.name}; export again")
    return array.reshape(tuple(tensor.dims))


def block_quantize(weight, bits: int, block_size: int):
    """(packed [N, K / block, block * bits / 8] uint8, scales [N, K / block]) of a [K, N] weight: onnxruntime's own C++
    block quantizer, with the layout its MatMulNBitsQuantizer gives it (symmetric, so no zero points)."""
    import numpy as np
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    rows, cols = weight.shape
    k_blocks = -(-rows // block_size)
    if k_blocks * block_size != rows:
        weight = np.pad(weight, ((0, k_blocks * block_size - rows), (0, 0)))
    blob = block_size * bits // 8
    packed = np.zeros((cols, k_blocks, blob), dtype="uint8")
    scales = np.zeros((cols, k_blocks), dtype=weight.dtype)
    zero_points = np.zeros((cols, -(-k_blocks // (8 // bits))), dtype="uint8")
    quantize = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    quantize(packed, np.ascontiguousarray(weight), scales, zero_points, block_size, cols, rows, True)
    return packed, scales


def tensor_bytes(tensor) -> int:
    """A tensor's data size, inline or external, without reading it."""
    import numpy as np
    from onnx import helper

    count = int(np.prod(tensor.dims, dtype=np.int64))
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
