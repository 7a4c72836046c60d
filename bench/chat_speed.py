"""Where chat spends its time, measured in one run on the same weights: decode with speculative steps (prompt
lookup) against plain decoding and chatglm.cpp, and first-token latency with the prefix cache against without.

    python bench/chat_speed.py --model demo --peer build/chatglm_cpp     # make demo's fine-tuned ChatGLM2
    python bench/chat_speed.py --model mid --peer build/chatglm_cpp      # the mid ChatGLM2 (untrained)
    python bench/chat_speed.py --model demo --parts decode --prompts 20  # a quicker look

Parts:
- decode: the dev prompts answered one at a time (greedy, up to --new_tokens, stopping at the end token) by the
  exported engine at each precision, plain (`--speculative 0`) and with `--speculative K` for each K asked,
  interleaved, best of --rounds; decode tok/s from the engine calls after the prefill, the acceptance rate, and
  whether every answer is token for token the plain one. chatglm.cpp (fp32 / q8_0 / q4_0, its own converter, its
  engine driven by ../shared/peers/chatglm_cpp/bench.py) decodes the same prompt ids for --new_tokens tokens.
- conversation: a 6-turn conversation replayed through serve_generation.py (dev prompts as the user's turns, their
  reference answers as the assistant's: an untrained model's own answers do not survive the text round trip, a
  trained model's mostly do), streamed, with and without the prefix cache: first-token ms per turn (to the first
  chunk that carries text).
- tools: a ChatGLM3 of the same sizes (untrained: only latency matters here) served with 3 tools; the first
  request, then 5 with the same tools and other questions: first-token ms with and without the cache.
Ratios are taken within the run; absolute figures move from machine to machine.
"""
import argparse
import http.client
import json
import os
import sys
import time
from pathlib import Path

from decode_throughput import run_python  # beside this script (its folder is on the path)

ROOT = Path(__file__).resolve().parents[1]
MID = {"hidden_size": 512, "num_layers": 4, "num_attention_heads": 8, "ffn_hidden_size": 1376, "vocab_size": 65024}
PEER_KIND = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}
TOOLS = [
    {"name": "get_weather", "description": "Current weather of a city: temperature, sky and wind.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "city name"},
                                                     "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                    "required": ["city"]}},
    {"name": "search_products", "description": "Search the shop's catalogue by type, material, colour and style.",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "max_results": {"type": "integer"}},
                    "required": ["query"]}},
    {"name": "track_order", "description": "Where an order is, by its order number, and when it arrives.",
     "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}},
]


def prepare(args, generation: str = "chatglm2") -> tuple:
    """(paddle model folder, export folder with int8 / int4) of the model asked for, made once under work_dir."""
    from tools.make_tiny_model import make_tiny_model

    if args.model == "demo" and generation == "chatglm2":
        model = ROOT / "build" / "demo" / "output" / "chatglm2"
        if not (model / "config.json").is_file():
            sys.exit("error: the demo model is missing: run make demo first")
    else:
        # the mid ChatGLM2 is decode_throughput.py's, made once for both
        model = args.work_dir / ("mid-model" if (args.model, generation) == ("mid", "chatglm2") else
                                 f"{args.model}-{generation}-model")
        if not (model / "config.json").is_file():
            make_tiny_model(generation, model, sizes=MID if args.model == "mid" else None, overwrite=True)
    export = args.work_dir / f"{args.model}-{generation}-infer"
    info = export / "chatglm.generation.json"
    if not info.is_file() or "v3" not in json.loads(info.read_text())["format"] or not (
            export / "chatglm.int4.onnx").is_file():
        run_python(["export_generation_model.py", "--model_name_or_path", model, "--output_path", export / "chatglm",
                    "--quantize", "int8,int4", "--src_length", "1024", "--tgt_length", str(args.new_tokens),
                    "--overwrite", "True"])
    return model, export


def dev_examples(count: int):
    from data import read_examples

    return read_examples(ROOT / "build" / "demo" / "data" / "AdvertiseGen" / "dev.json")[:count]


# --------------------------------------------------------------------------------------------- decode


def decode_round(export: Path, precision: str, speculative: int, examples, args) -> dict:
    import infer_generation

    predictor = infer_generation.build_predictor(*infer_generation.parse_arguments(
        ["--model_path", str(export), "--backend", "onnxruntime", "--precision", precision, "--batch_size", "1",
         "--threads", str(args.threads), "--speculative", str(speculative), "--prefix_cache_mb", "0",
         "--tgt_length", str(args.new_tokens)]))
    predictor.predict_ids(examples[:2])  # warm-up
    predictor.scheduler.stats.update({k: 0 for k in predictor.scheduler.stats})
    ids = predictor.predict_ids(examples)
    stats = predictor.scheduler.summary()
    return {"ids": ids, "decode_tok_s": stats["decode_tokens"] / stats["decode_seconds"],
            "tokens": stats["decode_tokens"], "calls": stats["decode_calls"], "acceptance": stats["acceptance"],
            "prompts": predictor._preprocess(examples)}


def measure_decode(export: Path, examples, args) -> dict:
    rows = {}
    for _ in range(args.rounds):
        for precision in args.precisions:
            for k in [0] + args.speculative:
                got = decode_round(export, precision, k, examples, args)
                best = rows.get((precision, k))
                if best is None or got["decode_tok_s"] > best["decode_tok_s"]:
                    rows[(precision, k)] = got
    return rows


def run_peer(model: Path, prompts, args) -> dict:
    peer_tools = ROOT.parent / "shared" / "peers" / "chatglm_cpp"
    hf, ggml = args.work_dir / f"{args.model}-hf", args.work_dir / f"{args.model}-ggml"
    if not (hf / "config.json").is_file():
        run_python(["tools/convert_checkpoint.py", "--input_dir", model, "--output_dir", hf, "--to", "hf",
                    "--overwrite"])
    env = {**os.environ, "PEER": str(Path(args.peer).resolve())}
    if not Path(f"{ggml}-q4_0.bin").is_file():
        run_python([peer_tools / "to_ggml.py", hf, ggml], env)
    ids = args.work_dir / f"{args.model}-prompt-ids.json"
    ids.write_text(json.dumps(prompts[:args.peer_prompts]))
    out = args.work_dir / f"{args.model}-peer.json"
    kinds = [PEER_KIND[p] for p in args.precisions]
    run_python([peer_tools / "bench.py", ggml, out, *kinds, "--prompts", ids, "--new_tokens", args.new_tokens], env)
    return json.loads(out.read_text())


def report_decode(rows: dict, peer: dict, args) -> None:
    print(f"\n## decode, {args.model} model, {len(next(iter(rows.values()))['ids'])} dev prompts one at a time, "
          f"up to {args.new_tokens} tokens, {args.threads} threads (best of {args.rounds})")
    print(f"{'precision':<10}{'drafts':>7}{'tok/s':>9}{'x plain':>9}{'kept':>7}{'tokens/call':>13}{'same answers':>14}"
          + (f"{'x chatglm.cpp':>15}" if peer else ""))
    for (precision, k), row in rows.items():
        plain = rows[(precision, 0)]
        same = sum(a == b for a, b in zip(row["ids"], plain["ids"]))
        line = (f"{precision:<10}{k:>7}{row['decode_tok_s']:>9.0f}{row['decode_tok_s'] / plain['decode_tok_s']:>9.2f}"
                f"{(row['acceptance'] or 0):>7.2f}{row['tokens'] / max(row['calls'], 1):>13.2f}"
                f"{same:>9}/{len(plain['ids'])}")
        other = (peer or {}).get(PEER_KIND[precision])
        if other:
            line += f"{row['decode_tok_s'] / other['decode_tok_s']:>15.2f}"
        print(line)
    for kind, row in (peer or {}).items():
        print(f"chatglm.cpp {kind}: decode {row['decode_tok_s']:.0f} tok/s, first token {row['first_token_ms']:.1f} ms "
              f"({args.peer_prompts} prompts, {args.new_tokens} tokens each)")


# ------------------------------------------------------------------------------------------ serving


def first_text_ms(port: int, messages, max_tokens: int, tools=None) -> tuple:
    """(ms to the first chunk, the answer) of one streamed greedy completion: the server sends its first chunk
    with the first token (a first chunk with text would wait for a token that decodes to visible text)."""
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if tools:
        body["tools"] = [{"type": "function", "function": tool} for tool in tools]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    sent = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json",
                                                                          "Authorization": "Bearer bench"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    first, answer = None, ""
    for line in response:
        if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
            continue
        first = first or time.perf_counter()  # the role chunk goes out with the first token (docs/serving.md)
        choices = json.loads(line[5:]).get("choices") or [{}]
        answer += choices[0].get("delta", {}).get("content") or ""
    connection.close()
    return (1000 * ((first or time.perf_counter()) - sent)), answer


def serve(export: Path, cache_mb: int, args):
    from tools.local_server import start_server

    proc, url = start_server(export, args.work_dir / f"chat_speed-{cache_mb}.log", "--backend", "onnxruntime",
                             "--precision", args.serve_precision, "--threads", args.threads, "--served_model_name",
                             "bench", "--prefix_cache_mb", cache_mb, "--max_tokens_limit", 4096, timeout=300)
    return proc, int(url.rsplit(":", 1)[1])


def conversation(export: Path, examples, args) -> dict:
    """First-token ms per turn of a 6-turn conversation, with and without the prefix cache."""
    result = {}
    for cache_mb in (0, args.prefix_cache_mb):
        proc, port = serve(export, cache_mb, args)
        try:
            for _ in range(args.rounds):
                messages, times = [], []
                for example in examples[:6]:
                    messages.append({"role": "user", "content": example.src})
                    ms, _ = first_text_ms(port, messages, args.new_tokens)
                    messages.append({"role": "assistant", "content": example.tgt})
                    times.append(ms)
                best = result.get(cache_mb)
                result[cache_mb] = times if best is None else [min(a, b) for a, b in zip(best, times)]
            health = json.loads(urllib_get(port, "/health"))
        finally:
            proc.terminate()
            proc.wait(60)
        result[f"health-{cache_mb}"] = health
    return result


def tools_requests(export: Path, examples, args) -> dict:
    result = {}
    for cache_mb in (0, args.prefix_cache_mb):
        proc, port = serve(export, cache_mb, args)
        try:
            times = []
            for example in examples[:6]:
                ms, _ = first_text_ms(port, [{"role": "user", "content": example.src}], 16, tools=TOOLS)
                times.append(ms)
            result[cache_mb] = times
        finally:
            proc.terminate()
            proc.wait(60)
    return result


def urllib_get(port: int, path: str) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", path, headers={"Authorization": "Bearer bench"})
    return connection.getresponse().read().decode()


def report_ttft(title: str, rows: dict, args, labels) -> None:
    off, on = rows[0], rows[args.prefix_cache_mb]
    print(f"\n## {title} (first-token ms, {args.serve_precision}, best of {args.rounds if 'turn' in labels[0] else 1})")
    print(f"{'':<12}" + "".join(f"{label:>10}" for label in labels))
    print(f"{'no cache':<12}" + "".join(f"{v:>10.1f}" for v in off))
    print(f"{'cache':<12}" + "".join(f"{v:>10.1f}" for v in on))
    print(f"{'ratio':<12}" + "".join(f"{b / a:>10.2f}" for a, b in zip(off, on)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("demo", "mid"), default="demo")
    parser.add_argument("--parts", default="decode,conversation,tools")
    parser.add_argument("--precisions", default="fp32,int8,int4")
    parser.add_argument("--speculative", default="4", help="draft counts to measure beside plain decoding")
    parser.add_argument("--prompts", type=int, default=100, help="dev prompts for the decode part")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefix_cache_mb", type=int, default=256)
    parser.add_argument("--serve_precision", default="fp32", help="the engine served (fp32: where the cache keeps answers exact)")
    parser.add_argument("--peer", default=None, help="folder chatglm.cpp was built into by its build.sh")
    parser.add_argument("--peer_prompts", type=int, default=20)
    parser.add_argument("--work_dir", default="build/bench")
    args = parser.parse_args(argv)
    args.work_dir = (ROOT / args.work_dir).resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.precisions, args.parts = args.precisions.split(","), args.parts.split(",")
    args.speculative = [int(k) for k in args.speculative.split(",")]
    from glm_tune import console

    console.quiet_startup()
    model, export = prepare(args)
    examples = dev_examples(args.prompts)
    print(f"# chat_speed {time.strftime('%Y-%m-%d %H:%M')}, {args.model} model ({export}), "
          f"{os.cpu_count()} CPUs", flush=True)
    if "decode" in args.parts:
        rows = measure_decode(export, examples, args)
        peer = run_peer(model, next(iter(rows.values()))["prompts"], args) if args.peer else None
        report_decode(rows, peer, args)
    if "conversation" in args.parts:
        turns = conversation(export, examples, args)
        report_ttft("6-turn conversation through the server", turns, args, [f"turn {i + 1}" for i in range(6)])
        print("prefix cache:", json.dumps(turns[f"health-{args.prefix_cache_mb}"].get("prefix_cache")))
    if "tools" in args.parts:
        _, tools_export = prepare(args, "chatglm3")
        rows = tools_requests(tools_export, examples, args)
        report_ttft("ChatGLM3 with 3 tools: six requests, same tools, other questions", rows, args,
                    [f"req {i + 1}" for i in range(6)])
    sys.stdout.flush()


if __name__ == "__main__":
    main()
