"""The step graph for ONNX Runtime: PaddlePaddle's own converter (paddle2onnx) on the exported Paddle graph, and
weight-only int8 / int4 copies made by onnxruntime's MatMulNBits quantizer.

paddle2onnx is called through its C++ entry point: its Python wrapper swallows a conversion error, prints it and
calls sys.exit, and then spends ~10 s in a Polygraphy constant-folding pass that ONNX Runtime's own graph
optimizer repeats at session start anyway. The C++ converter aborts the whole process on an operator it cannot
convert, without naming it, so it runs in a child process and the error names the program's operators that
are neither known to convert here nor in paddle2onnx's own list.
"""
from pathlib import Path

from glm_tune.errors import GlmTuneError

OPSET = 17
QUANTIZATIONS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32  # weights per scale, as chatglm.cpp's q8_0 / q4_0 blocks
ACCURACY_LEVEL = 4  # MatMulNBits computes with int8 activations: onnxruntime's fastest CPU kernel
PROTOBUF_LIMIT = 2 ** 31 - 1  # a larger graph keeps its weights in PREFIX.onnx.data


class OnnxExportError(GlmTuneError):
    """The step graph could not be written as ONNX; the message names the operator or the file."""


def onnx_file_name(prefix: str, quantization: str = None) -> str:
    return f"{prefix}.{quantization}.onnx" if quantization else f"{prefix}.onnx"


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


def convert_to_onnx(paddle_prefix: Path, onnx_file: Path) -> Path:
    """PREFIX.json + PREFIX.pdiparams (the exported step graph) -> onnx_file, opset 17. Weights beyond protobuf's
    2 GB limit (a 6B model in fp32) go to onnx_file.data, as paddle2onnx writes them."""
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
        raise OnnxExportError(f"paddle2onnx could not convert {paddle_prefix}.json ({detail}); export with "
                              "--onnx False to keep the Paddle Inference engine only")
    onnx_file.write_bytes(constants_as_initializers(onnx_file.read_bytes()))
    return onnx_file


def constants_as_initializers(serialized: bytes) -> bytes:
    """paddle2onnx's C++ converter emits every weight as a Constant node; graph initializers are what
    onnxruntime's weight-only quantizer (and its constant folding) recognise as weights."""
    import onnx

    model = onnx.load_from_string(serialized)
    graph = model.graph
    kept = []
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if node.op_type == "Constant" and value is not None:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return model.SerializeToString()


def converter_constant_matmuls(model) -> list:
    """MatMul nodes whose constant operand paddle2onnx made (named p2o.*), not one of the model's weights: the
    step graph's rotary pair swap ([dim, dim] of -1, 0, 1) must stay exact, and with int8 activations
    (accuracy_level 4) a quantized rotary would lose precision at every layer."""
    made = {i.name for i in model.graph.initializer if i.name.startswith("p2o.")}
    return [node.name for node in model.graph.node if node.op_type == "MatMul" and node.input[1:2] and
            node.input[1] in made]


def quantize_weights(onnx_file: Path, out_file: Path, quantization: str) -> dict:
    """A weight-only quantized copy of `onnx_file` (every MatMul with a constant weight becomes MatMulNBits);
    returns its description for PREFIX.generation.json."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    bits = QUANTIZATIONS[quantization]
    # accuracy_level must be set in the config: the quantizer's own argument of that name is not carried over
    config = DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL,
                                          bits=bits)
    model = onnx.load(str(onnx_file))
    quantizer = MatMulNBitsQuantizer(model, algo_config=config, nodes_to_exclude=converter_constant_matmuls(model))
    quantizer.process()
    quantized = sum(node.op_type == "MatMulNBits" for node in quantizer.model.model.graph.node)
    if not quantized:
        raise OnnxExportError(f"{onnx_file}: no MatMul with a constant weight to quantize")
    large = onnx_file.stat().st_size + sum(p.stat().st_size for p in onnx_file.parent.glob(f"{onnx_file.name}.data"))
    quantizer.model.save_model_to_file(str(out_file), use_external_data_format=large > PROTOBUF_LIMIT)
    return {"file": out_file.name, "bits": bits, "block_size": BLOCK_SIZE, "symmetric": True,
            "accuracy_level": ACCURACY_LEVEL, "quantized_matmuls": quantized}
