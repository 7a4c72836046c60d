"""Where a decode step's time goes on ONNX Runtime: onnxruntime's own profiler over greedy decode steps of an
exported model, by operator type, against the step's wall time and the memory limit.

    python bench/step_profile.py --size 6b-slice --precisions int8,int4 --context 1024
    python bench/step_profile.py --size mid --precisions fp32

The model and its export are decode_throughput.py's (made once under --work_dir). For each precision: one prompt of
`--context` random ids, prefilled, then `--steps` decode steps exactly as the engine runs them (StepFeeds, the
host-side cache); the profile's node times of the decode runs only, summed per operator type and divided by the
steps. "host" is the step's wall time outside session.run (feeds, argmax, the cache write); "run, not in nodes" is
session.run's time no node accounts for (binding inputs, allocating and copying outputs, thread hand-offs). The
weight-reading operators also get their GB/s: the bytes of their weights over their time.
"""
import argparse
import collections
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from decode_throughput import SIZES, prepare, prompts_of, read_bandwidth  # beside this script (its folder is on the path)

ROOT = Path(__file__).resolve().parents[1]


def weights_by_node(graph_file: Path) -> dict:
    """node name -> (the weight bytes a step reads: its initializers larger than 4 KB; a label: MatMulNBits nodes
    by their K x N), from the graph without its data."""
    import onnx

    from glm_tune.deployment.onnx_export import tensor_bytes

    graph = onnx.load(str(graph_file), load_external_data=False).graph
    sizes = {t.name: tensor_bytes(t) for t in graph.initializer}
    out = {}
    for node in graph.node:
        attributes = {a.name: a.i for a in node.attribute}
        label = f"{node.op_type} {attributes['K']}x{attributes['N']}" if node.op_type == "MatMulNBits" else None
        read = 0 if node.op_type == "Gather" else sum(sizes.get(i, 0) for i in node.input if sizes.get(i, 0) > 4096)
        out[node.name] = (read, label)  # a Gather reads a few rows of its table, not the table
    return out


def profile_precision(export: Path, precision: str, args) -> dict:
    from paddlenlp.transformers import AutoConfig, AutoTokenizer

    from glm_tune.deployment.export_format import onnx_file_name
    from glm_tune.deployment.inference_engine import OnnxRuntimeEngine
    from glm_tune.deployment.step_feeds import StepFeeds

    tokenizer, config = AutoTokenizer.from_pretrained(str(export)), AutoConfig.from_pretrained(str(export))
    feeds_builder = StepFeeds(tokenizer, "chatglm2", config)
    prefix = Path(tempfile.mkdtemp(prefix="step_profile_")) / precision
    engine = OnnxRuntimeEngine(export, "chatglm", args.threads, precision, profile_prefix=prefix)
    prompt = prompts_of(args.context, config.vocab_size, count=1)
    walls, runs = [], []
    for rounds in range(2):  # the first round warms up at this shape; only the second is profiled below
        feeds = feeds_builder.prefill(prompt)
        logits, *caches = engine(feeds)
        feeds = feeds_builder.advance(feeds, logits[:, -1].argmax(-1), caches)
        for _ in range(args.steps):
            started = time.perf_counter()
            logits, *caches = engine(feeds)
            ran = time.perf_counter()
            feeds = feeds_builder.advance(feeds, logits[:, -1].argmax(-1), caches)
            if rounds:
                walls.append(time.perf_counter() - started)
                runs.append(ran - started)
    profile_file = Path(engine.session.end_profiling())
    events = json.loads(profile_file.read_text())
    shutil.rmtree(profile_file.parent, ignore_errors=True)
    model_runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    decode_runs = model_runs[-args.steps:]
    first, last = decode_runs[0]["ts"], decode_runs[-1]["ts"] + decode_runs[-1]["dur"]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
             and first <= e["ts"] <= last]
    weights = weights_by_node(export / onnx_file_name("chatglm", None if precision == "fp32" else precision))
    by_op = collections.defaultdict(lambda: {"us": 0.0, "bytes": 0})
    for event in nodes:
        nbytes, label = weights.get(event["name"][:-len("_kernel_time")], (0, None))
        row = by_op[label or event["args"]["op_name"]]
        row["us"] += event["dur"]
        row["bytes"] += nbytes
    steps = len(decode_runs)
    return {"precision": precision, "steps": steps, "wall_ms": 1000 * statistics.median(walls),
            "run_ms": 1000 * statistics.median(runs),
            "model_run_ms": statistics.median(e["dur"] for e in decode_runs) / 1000,
            "ops": {op: {"ms": row["us"] / steps / 1000, "gb_s": row["bytes"] / row["us"] / 1000 if row["us"] else 0}
                    for op, row in sorted(by_op.items(), key=lambda kv: -kv[1]["us"])}}


def report(result: dict, bandwidth: float) -> None:
    wall, run = result["wall_ms"], result["run_ms"]
    in_nodes = sum(op["ms"] for op in result["ops"].values())
    print(f"\n{result['precision']}: a decode step {wall:.2f} ms ({1000 / wall:.1f} tok/s); plain read "
          f"{bandwidth:.1f} GB/s")
    print(f"  {'part':<24}{'ms/step':>9}{'share':>8}{'GB/s':>8}{'of limit':>10}")
    rows = [(op, row["ms"], row["gb_s"]) for op, row in result["ops"].items()]
    rows += [("run, not in nodes", run - in_nodes, 0), ("host", wall - run, 0)]
    for name, ms, gb_s in rows:
        limit = f"{gb_s / bandwidth:>10.2f}" if gb_s else ""
        print(f"  {name:<24}{ms:>9.3f}{ms / wall:>8.1%}" + (f"{gb_s:>8.1f}" if gb_s else "") + limit)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="6b-slice", choices=sorted(SIZES), help="model shapes (decode_throughput's)")
    parser.add_argument("--precisions", default="int8,int4", help="comma-separated of fp32, int8, int4")
    parser.add_argument("--context", type=int, default=64, help="prompt length before the decode steps")
    parser.add_argument("--steps", type=int, default=32, help="decode steps profiled")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--work_dir", default="build/bench", help="decode_throughput's folder of models and exports")
    args = parser.parse_args(argv)
    from glm_tune import console

    console.quiet_startup()  # before the engine's imports load paddle
    args.work_dir = (ROOT / args.work_dir).resolve()
    args.model_dir = args.work_dir / f"{args.size}-model"
    export = prepare(args)
    bandwidth = read_bandwidth(args.threads)
    results = [profile_precision(export, p, args) for p in args.precisions.split(",")]
    for result in results:
        report(result, bandwidth)
    print(json.dumps({"bandwidth_gb_s": bandwidth, "results": results}), file=sys.stderr)


if __name__ == "__main__":
    main()
