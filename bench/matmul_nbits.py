"""One decode step's weight-only matmul in isolation: onnxruntime's `MatMulNBits` at ChatGLM2-6B's shapes, one
token (M = 1), by bits, block size and accuracy level, as a fraction of the memory limit measured in the same run.

    python bench/matmul_nbits.py                          # the 6B layer's four matmuls, int8 and int4
    python bench/matmul_nbits.py --blocks 32,64,128 --levels 0,4

A decode step streams every weight once, so a matmul at M = 1 cannot beat (weight bytes + scales) / bandwidth;
the bandwidth is a plain parallel read of a buffer far larger than the caches (bench/decode_throughput.py's).
Each row's weights are quantized by onnxruntime's own block quantizer (glm_tune/deployment/onnx_export.py's
`block_quantize`, with the block size asked for); one graph holds the layer's four matmuls, each on its own
input, so a call reads one layer's weights once (~412 MB in fp32).
"""
import argparse
import time

import numpy as np

SHAPES = {"query_key_value": (4096, 4608), "dense": (4096, 4096), "dense_h_to_4h": (4096, 27392),
          "dense_4h_to_h": (13696, 4096)}


def layer_graph(bits: int, block: int, level: int, rng):
    """A graph computing the four matmuls of one layer on the same [1, K] inputs, and its weight bytes."""
    from onnx import TensorProto, helper, numpy_helper

    from glm_tune.deployment import onnx_export

    nodes, inits, inputs, outputs, total = [], [], [], [], 0
    for name, (k, n) in SHAPES.items():
        weight = rng.standard_normal((k, n)).astype("float32") * 0.02
        packed, scales = onnx_export.block_quantize(weight, bits, block)
        inits += [numpy_helper.from_array(packed, f"{name}_q"), numpy_helper.from_array(scales, f"{name}_s")]
        total += packed.nbytes + scales.nbytes
        inputs.append(helper.make_tensor_value_info(f"{name}_x", TensorProto.FLOAT, [1, k]))
        outputs.append(helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, n]))
        nodes.append(helper.make_node("MatMulNBits", [f"{name}_x", f"{name}_q", f"{name}_s"], [f"{name}_y"],
                                      domain="com.microsoft", K=k, N=n, bits=bits, block_size=block,
                                      accuracy_level=level))
    graph = helper.make_graph(nodes, "layer", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString(), total


def time_graph(serialized: bytes, threads: int, repeats: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    session = ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
    feeds = {i.name: np.random.RandomState(0).standard_normal(i.shape).astype("float32")
             for i in session.get_inputs()}
    session.run(None, feeds)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, feeds)
        best = min(best, time.perf_counter() - started)
    return best


def main(argv=None) -> None:
    from pathlib import Path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", default="8,4")
    parser.add_argument("--blocks", default="32,64,128")
    parser.add_argument("--levels", default="4,0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    from decode_throughput import read_bandwidth  # beside this script (its folder is on the path)

    bandwidth = read_bandwidth(args.threads)
    print(f"# MatMulNBits at ChatGLM2-6B's layer shapes, M = 1, {args.threads} threads; plain read {bandwidth:.1f} "
          f"GB/s ({Path(__file__).name}, {time.strftime('%Y-%m-%d %H:%M')})")
    print(f"{'bits':>5}{'block':>7}{'level':>7}{'MB read':>9}{'ms':>8}{'GB/s':>8}{'of limit':>10}")
    rng = np.random.RandomState(0)
    for bits in map(int, args.bits.split(",")):
        for block in map(int, args.blocks.split(",")):
            for level in map(int, args.levels.split(",")):
                serialized, weight_bytes = layer_graph(bits, block, level, rng)
                seconds = time_graph(serialized, args.threads, args.repeats)
                rate = weight_bytes / seconds / 1e9
                print(f"{bits:>5}{block:>7}{level:>7}{weight_bytes / 1e6:>9.0f}{seconds * 1e3:>8.2f}{rate:>8.1f}"
                      f"{rate / bandwidth:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
