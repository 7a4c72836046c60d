"""Decode speed of every engine on the same weights and prompt ids, with chatglm.cpp as the peer when built.

    python bench/decode_throughput.py                              # the mid ChatGLM2, contexts 64, 512, 1024
    python bench/decode_throughput.py --peer build/chatglm_cpp     # + chatglm.cpp f32/q8_0/q4_0 and the ratios
    python bench/decode_throughput.py --size tiny --contexts 32 --systems dygraph,paddle,onnx-fp32
    python bench/decode_throughput.py --size 6b-slice --contexts 64,1024 --systems paddle,onnx-fp32,onnx-int8,onnx-int4 \
        --peer build/chatglm_cpp                                   # ChatGLM2-6B's layer shapes, 2 layers (3.76 GB)

The model is `tools/make_tiny_model.py`'s "mid" ChatGLM2 (4 layers, hidden 512, 8 heads, 2 KV groups, ffn 1376,
vocab 65024: 176 MB of fp32 weights read per token), exported once with `--quantize int8,int4`. Each system runs
in its own process (so its peak RSS is its own): greedy decoding forced to `--new_tokens`, first-token latency
(the prefill) and decode tok/s (tokens after the first) measured apart, median over 3 prompts of random ids
after a warm-up, then a batch of 8 for aggregate tok/s. chatglm.cpp (`../shared/peers/chatglm_cpp/`, built with
its build.sh) runs the same prompt ids on the same weights converted by its own converter. Ratios are taken
within this one run: absolute figures move from machine to machine.

Each decode figure is also given as a fraction of the memory limit: a decode step reads every weight but the
embedding's once, so it cannot beat (bandwidth / bytes read per token); the bandwidth is what a plain parallel
sum over a buffer larger than the caches reaches on this machine, measured in the same run, and the bytes are the
graph's (or chatglm.cpp's file's) tensors without the embedding.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SIZES = {
    "tiny": {"hidden_size": 128, "num_layers": 2, "num_attention_heads": 4, "ffn_hidden_size": 256, "vocab_size": None},
    "mid": {"hidden_size": 512, "num_layers": 4, "num_attention_heads": 8, "ffn_hidden_size": 1376, "vocab_size": 65024},
    # ChatGLM2-6B's layer shapes and vocabulary with 2 of its 28 layers: 3.76 GB fp32
    "6b-slice": {"hidden_size": 4096, "num_layers": 2, "num_attention_heads": 32, "ffn_hidden_size": 13696,
                 "vocab_size": 65024},
}
SYSTEMS = ("dygraph", "paddle", "onnx-fp32", "onnx-int8", "onnx-int4")
PEER_KIND = {"onnx-fp32": "f32", "onnx-int8": "q8_0", "onnx-int4": "q4_0", "paddle": "f32"}


def prompts_of(context: int, vocab: int, count: int = 3) -> list:
    """`count` prompts of `context` random ids (fixed seed), the same for every system and the peer."""
    import numpy as np

    rng = np.random.RandomState(context)
    return rng.randint(100, vocab - 1, size=(count, context)).tolist()


# ------------------------------------------------------------------------------------------ one system


def step_engine(system: str, folder: Path, threads: int):
    from glm_tune.deployment.inference_engine import create_engine

    backend, precision = ("paddle", "fp32") if system == "paddle" else ("onnxruntime", system.split("-")[1])
    return create_engine(backend, folder, "chatglm", threads, precision)


def greedy_engine(engine, feeds_builder, prompts, new_tokens):
    """(first-token seconds, seconds for the rest) of forced-length greedy decoding of a batch."""
    feeds = feeds_builder.prefill(prompts)
    started = time.perf_counter()
    first = None
    for step in range(new_tokens):
        logits, *caches = engine(feeds)
        if first is None:
            first = time.perf_counter() - started
        feeds = feeds_builder.advance(feeds, logits[:, -1].argmax(-1), caches)
    return first, time.perf_counter() - started - first


def greedy_dygraph(model, tokenizer, generation, prompts, new_tokens):
    import paddle

    from data import DataCollator

    batch = {k: paddle.to_tensor(v) for k, v in DataCollator(tokenizer, generation)(
        [{"input_ids": p} for p in prompts]).items()}

    def run(n):
        with paddle.no_grad():
            model.generate(**batch, max_new_tokens=n, min_new_tokens=n, decode_strategy="greedy_search",
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, use_cache=True)

    started = time.perf_counter()
    run(1)
    first = time.perf_counter() - started
    started = time.perf_counter()
    run(new_tokens)
    return first, time.perf_counter() - started - first


def measure_system(system: str, folder: Path, args) -> dict:
    """Worker: first-token ms and decode tok/s per context, batch-8 aggregate tok/s, peak RSS."""
    from paddlenlp.transformers import AutoConfig, AutoTokenizer

    from glm_tune.deployment.step_feeds import StepFeeds
    from glm_tune.process_memory import peak_rss_mb

    tokenizer, config = AutoTokenizer.from_pretrained(str(folder)), AutoConfig.from_pretrained(str(folder))
    generation = "chatglm2"
    if system == "dygraph":
        from glm_tune.model_loading import load_model

        model = load_model(str(args.model_dir), generation, use_cache=True)
        model.eval()

        def greedy(prompts):
            return greedy_dygraph(model, tokenizer, generation, prompts, args.new_tokens)
    else:
        engine, feeds = step_engine(system, folder, args.threads), StepFeeds(tokenizer, generation, config)

        def greedy(prompts):
            return greedy_engine(engine, feeds, prompts, args.new_tokens)

    result = {"contexts": {}}
    for context in args.contexts:
        prompts = prompts_of(context, config.vocab_size)
        greedy(prompts[:1])  # warm-up at this shape
        rows = [greedy([p]) for p in prompts]
        result["contexts"][str(context)] = {
            "first_token_ms": 1000 * statistics.median(r[0] for r in rows),
            "decode_tok_s": statistics.median((args.new_tokens - 1) / r[1] for r in rows)}
    batch = prompts_of(args.contexts[0], config.vocab_size, count=8)
    first, rest = greedy(batch)
    result["batch8_tok_s"] = 8 * (args.new_tokens - 1) / rest
    result["peak_rss_mb"] = peak_rss_mb()  # VmHWM: ru_maxrss would report the parent after exec
    return result


# ------------------------------------------------------------------------------------------ the run


def prepare(args) -> Path:
    """The model (paddle layout) and its export with every format, made once under --work_dir."""
    from tools.make_tiny_model import make_tiny_model

    if not (args.model_dir / "config.json").is_file():
        make_tiny_model("chatglm2", args.model_dir, sizes=SIZES[args.size], overwrite=True)
    export = args.work_dir / f"{args.size}-infer"
    if not current_export(export):
        run_python(["export_generation_model.py", "--model_name_or_path", args.model_dir, "--output_path",
                    export / "chatglm", "--quantize", "int8,int4", "--src_length", "1024", "--tgt_length", "64",
                    "--overwrite", "True"])
    return export


def current_export(export: Path) -> bool:
    """The folder holds an export of this version's step graph with every format at today's block sizes."""
    from glm_tune.deployment.export_format import EngineError, read_description
    from glm_tune.deployment.onnx_export import BLOCK_SIZES

    try:
        formats = read_description(export, "chatglm").get("formats", {})
    except EngineError:
        return False
    return all(formats.get(f"onnx-{q}", {}).get("block_size") == size for q, size in BLOCK_SIZES.items())


def run_python(argv, env=None) -> str:
    done = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"error: {' '.join(map(str, argv[:2]))} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def run_peer(args) -> dict:
    """chatglm.cpp on the same weights (its own converter) and the same prompt ids, per context."""
    import os

    peer_tools = ROOT.parent / "shared" / "peers" / "chatglm_cpp"
    hf, ggml = args.work_dir / f"{args.size}-hf", args.work_dir / f"{args.size}-ggml"
    if not hf.is_dir():
        run_python(["tools/convert_checkpoint.py", "--input_dir", args.model_dir, "--output_dir", hf, "--to", "hf"])
    env = {**os.environ, "PEER": str(Path(args.peer).resolve())}
    if not Path(f"{ggml}-q4_0.bin").is_file():
        run_python([peer_tools / "to_ggml.py", hf, ggml], env)
    results = {}
    for context in args.contexts:
        prompts = args.work_dir / f"prompts-{context}.json"
        prompts.write_text(json.dumps(prompts_of(context, SIZES[args.size]["vocab_size"] or 1216)))
        out = args.work_dir / f"peer-{context}.json"
        run_python([peer_tools / "bench.py", ggml, out, "--prompts", prompts, "--new_tokens", args.new_tokens], env)
        results[str(context)] = json.loads(out.read_text())
    return results


def read_bandwidth(threads: int, gigabytes: float = 1.0) -> float:
    """GB/s of a plain sum over a buffer far larger than the caches, split over `threads` (numpy's sum releases
    the GIL), best of 5."""
    import threading

    import numpy as np

    data = np.ones(int(gigabytes * 2 ** 30 / 4), dtype="float32")
    parts = np.array_split(data, threads)
    best = float("inf")
    for _ in range(5):
        workers = [threading.Thread(target=part.sum) for part in parts]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = min(best, time.perf_counter() - started)
    return data.nbytes / best / 1e9


def bytes_per_token(system: str, args) -> int:
    """Weight bytes a decode step reads: the graph's tensors (inline or in its data file) without the embedding."""
    import onnx

    from glm_tune.deployment.export_format import onnx_file_name
    from glm_tune.deployment.onnx_export import tensor_bytes

    folder = args.work_dir / f"{args.size}-infer"
    graph_file = folder / (onnx_file_name("chatglm", None if system in ("dygraph", "paddle", "onnx-fp32") else
                                          system.split("-")[1]))
    graph = onnx.load(str(graph_file), load_external_data=False).graph
    gathered = {node.input[0] for node in graph.node if node.op_type == "Gather"}
    return sum(tensor_bytes(t) for t in graph.initializer if t.name not in gathered and tensor_bytes(t) > 4096)


def peer_bytes_per_token(kind: str, args) -> int:
    size = SIZES[args.size]
    embedding = size["vocab_size"] * size["hidden_size"] * {"f32": 4, "q8_0": 34 / 32, "q4_0": 18 / 32}[kind]
    return int(Path(f"{args.work_dir / args.size}-ggml-{kind}.bin").stat().st_size - embedding)


def report(results: dict, peer: dict, args, bandwidth: float = None) -> None:
    print(f"\n{args.size} ChatGLM2, greedy, {args.new_tokens} new tokens, {args.threads} threads; median of 3 "
          "prompts; ratios against chatglm.cpp at the same precision, measured in this run")
    head = f"{'system':<11}{'context':>8}{'1st ms':>9}{'decode tok/s':>14}"
    head += f"{'x cpp decode':>14}{'x cpp 1st':>11}" if peer else ""
    print(head + f"{'batch-8 tok/s':>15}{'peak RSS MB':>13}" + (f"{'x limit':>9}" if bandwidth else ""))
    for system, result in results.items():
        limit = bandwidth * 1e9 / bytes_per_token(system, args) if bandwidth else None
        for i, (context, row) in enumerate(result["contexts"].items()):
            line = f"{system if i == 0 else '':<11}{context:>8}{row['first_token_ms']:>9.1f}{row['decode_tok_s']:>14.1f}"
            kind = PEER_KIND.get(system)
            if peer:
                other = peer.get(context, {}).get(kind) if kind else None
                line += (f"{row['decode_tok_s'] / other['decode_tok_s']:>14.2f}"
                         f"{row['first_token_ms'] / other['first_token_ms']:>11.2f}") if other else f"{'':>25}"
            tail = f"{result['batch8_tok_s']:>15.0f}{result['peak_rss_mb']:>13.0f}" if i == 0 else f"{'':>28}"
            print(line + tail + (f"{row['decode_tok_s'] / limit:>9.2f}" if limit else ""))
    for context, kinds in (peer or {}).items():
        print("chatglm.cpp at context " + context + ": " + ", ".join(
            f"{kind} {row['first_token_ms']:.1f} ms / {row['decode_tok_s']:.1f} tok/s" + (
                f" ({row['decode_tok_s'] / (bandwidth * 1e9 / peer_bytes_per_token(kind, args)):.2f} of the limit)"
                if bandwidth else "") for kind, row in kinds.items()))
    if bandwidth:
        print(f"memory limit: best plain read of the run {bandwidth:.1f} GB/s with {args.threads} threads; bytes read per token: " +
              ", ".join(f"{system} {bytes_per_token(system, args) / 1e9:.2f} GB" for system in results))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="mid", choices=sorted(SIZES), help="model size (see SIZES)")
    parser.add_argument("--contexts", default="64,512,1024", help="comma-separated prompt lengths (ids)")
    parser.add_argument("--new_tokens", type=int, default=64, help="tokens generated per measurement")
    parser.add_argument("--threads", type=int, default=2, help="engine CPU threads (chatglm.cpp uses all cores)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated from {', '.join(SYSTEMS)}")
    parser.add_argument("--peer", default=None, help="folder chatglm.cpp was built into by its build.sh")
    parser.add_argument("--work_dir", default="build/bench", help="where the model and its exports go")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every system (and the peer) this many times, interleaved, and keep each one's "
                             "best: on a shared machine a neighbour's load moves single runs by 10-20%%")
    parser.add_argument("--memory_limit", action="store_true",
                        help="also give each decode figure as a fraction of the memory limit (measured read "
                             "bandwidth / weight bytes read per token)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one system, in its own process
    args = parser.parse_args(argv)
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.work_dir = (ROOT / args.work_dir).resolve()
    args.model_dir = args.work_dir / f"{args.size}-model"
    if args.worker:
        from glm_tune import console

        console.quiet_startup()  # before the engine's imports load paddle

        print(json.dumps(measure_system(args.worker, args.work_dir / f"{args.size}-infer", args)))
        return
    prepare(args)
    # The limit is the best plain read of the run, read after every system's measurement: on a shared machine the
    # bandwidth moves by 20-30% with the neighbours' load, as the decode figures do (best of the rounds too).
    results, peer, bandwidth = {}, None, None
    for round_ in range(args.rounds):
        for system in args.systems.split(","):
            out = run_python([Path(__file__), "--worker", system, "--size", args.size, "--contexts",
                              ",".join(map(str, args.contexts)), "--new_tokens", args.new_tokens, "--threads",
                              args.threads, "--work_dir", args.work_dir])
            results[system] = best_of(results.get(system), json.loads(out.strip().splitlines()[-1]))
            print(f"measured {system} (round {round_ + 1} of {args.rounds})", file=sys.stderr, flush=True)
            if args.memory_limit:
                bandwidth = max(bandwidth or 0.0, read_bandwidth(args.threads))
        if args.peer:
            measured = run_peer(args)
            peer = {context: {kind: best_of((peer or {}).get(context, {}).get(kind), row)
                              for kind, row in kinds.items()} for context, kinds in measured.items()}
    report(results, peer, args, bandwidth)


def best_of(old, new, key: str = ""):
    """The better of two measurements of one system, figure by figure: the higher tok/s, the lower ms and MB."""
    if old is None:
        return new
    if isinstance(new, dict):
        return {k: best_of(old.get(k), v, k) for k, v in new.items()}
    if isinstance(new, (int, float)) and isinstance(old, (int, float)):
        return max(old, new) if key.endswith("tok_s") else min(old, new)
    return new


if __name__ == "__main__":
    main()
