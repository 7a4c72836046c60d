"""Load on serve_generation.py: N concurrent streaming clients (the official `openai` client) on the mid ChatGLM2,
against chatglm.cpp's single-stream decode on the same weights measured in the same run.

    python bench/serve_load.py                                  # 1, 4, 8, 16 clients, int8
    python bench/serve_load.py --peer build/chatglm_cpp         # + chatglm.cpp: its single stream and its server
    python bench/serve_load.py --size tiny --clients 1,2 --requests 1 --max_tokens 8

The model and its export are bench/decode_throughput.py's (built once under --work_dir). The server runs in its own
process on 127.0.0.1 with --max_batch as given; each client sends --requests streamed chat completions one after
another, each forced to --max_tokens new tokens unless the model stops. Per level: requests completed, aggregate
tok/s (completion tokens of all requests / wall time of the level), p50/p95 time to first token (request sent ->
first chunk, which the server sends with the first token) and per-stream decode tok/s. With --peer, the same
clients then load chatglm.cpp's own OpenAI server (`chatglm_cpp.openai_api`, q8_0 / f32 / q4_0 of the same
weights): its quirks are bridged, not fixed: `max_tokens` there is the total length (prompt + answer); it samples
unless sent temperature 0 (both servers are sent 0); its stream has no usage chunk and no `[DONE]`, and its deltas
are text, in which the mid model's ids show little (most fall in the padded vocabulary, which has no text): its
answers are counted as the full budget, which they reach (same weights, greedy; every answer of this server's
reaches it, and eos is 1 id in 65,024); and its first chunk (the role) goes out before its prefill, so its TTFT
counts the queue but not the prefill. The ratio columns divide by its single-stream engine decode and by its
server's aggregate at the same number of clients.
"""
import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import decode_throughput  # the same model, export and peer run

PROMPTS = ["类型#上衣*材质#牛仔布*颜色#白色*风格#简约*图案#刺绣", "类型#裙*风格#复古*图案#格子*裙长#连衣裙",
           "类型#裤*版型#宽松*材质#棉*风格#休闲", "晚上睡不着应该怎么办", "你好，请介绍一下你自己",
           "类型#上衣*风格#街头*图案#字母*衣样式#卫衣", "类型#裙*材质#雪纺*颜色#粉色*裙型#a字", "如何学习编程"]


def start_server(export: Path, args):
    from tools.local_server import start_server as launch

    return launch(export, args.work_dir / "serve_load.log", "--backend", "onnxruntime", "--precision",
                  args.precision, "--threads", args.threads, "--max_batch", args.max_batch, "--served_model_name",
                  "bench", timeout=120)


def one_stream(connection, prompt: str, max_tokens: int, peer=None) -> dict:
    """One streamed completion over a kept-alive connection: time to the first chunk, completion tokens (from the
    usage chunk; `peer`: chatglm.cpp's server, see the module's notes) and the stream's decode rate."""
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if peer is not None:
        body["max_tokens"] = peer.prompt_tokens(prompt) + max_tokens
        del body["stream_options"]
    body = json.dumps(body)
    sent = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json",
                                                              "Authorization": "Bearer bench"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    first, tokens, done = None, 0, False
    while not done:
        line = response.readline()
        if not line:
            break
        if not line.startswith(b"data:"):
            continue
        first = first or time.perf_counter()
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
        elif b'"usage": {' in data:
            tokens = json.loads(data)["usage"]["completion_tokens"]
    response.read()
    finished = time.perf_counter()
    if peer is not None:
        tokens = max_tokens  # see the module's notes
    elif not done:
        raise RuntimeError("the stream ended without [DONE]")
    return {"ttft": first - sent, "tokens": tokens, "decode_tok_s": (tokens - 1) / max(finished - first, 1e-9)}


class PeerServer:
    """chatglm.cpp's own OpenAI server on the GGML file of the same weights, on a free 127.0.0.1 port."""

    def __init__(self, args, ggml: Path):
        import os
        import socket
        import subprocess
        import urllib.request

        from paddlenlp.transformers import AutoTokenizer

        from data import get_prompt_format

        self.tokenizer = AutoTokenizer.from_pretrained(str(args.model_dir))
        self.format = get_prompt_format("chatglm2", self.tokenizer)
        peer = Path(args.peer).resolve()
        extra = peer / "pylib2"  # its server's own dependencies, beside the build (not in this project's venv)
        if not (extra / "pydantic_settings").is_dir():
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(extra),
                            "pydantic-settings", "python-dotenv"], check=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": f"{peer / 'pkg'}:{extra}:{peer / 'pylib'}", "MODEL": str(ggml),
               "MAX_LENGTH": "2048"}
        self.log = open(args.work_dir / "peer_server.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "chatglm_cpp.openai_api:app", "--host",
                                      "127.0.0.1", "--port", str(port)], cwd=peer / "pkg", env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/v1/models", timeout=2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.5)
        self.stop()
        sys.exit(f"error: chatglm.cpp's server did not start; see {args.work_dir / 'peer_server.log'}")

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.format.prompt_ids(prompt, [], 4096))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def run_level(url: str, clients: int, args, peer=None) -> dict:
    """`clients` threads, each sending args.requests streams one after another. The clients are plain HTTP (the
    server's tests use the openai client): on a 2-core machine a heavier client would take CPU from the engine."""
    import http.client
    from urllib.parse import urlparse

    results, errors = [], []
    address = urlparse(url)

    def client_loop(index):
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=600)
        for r in range(args.requests):
            try:
                results.append(one_stream(connection, PROMPTS[(index + r) % len(PROMPTS)], args.max_tokens, peer))
            except Exception as err:  # counted as not completed
                errors.append(repr(err))
                connection.close()
        connection.close()

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ttft = sorted(r["ttft"] for r in results) or [float("nan")]
    return {"clients": clients, "completed": len(results), "sent": clients * args.requests, "errors": errors[:3],
            "aggregate_tok_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_ms": 1000 * statistics.median(ttft),
            "ttft_p95_ms": 1000 * ttft[min(len(ttft) - 1, int(round(0.95 * (len(ttft) - 1))))],
            "stream_tok_s": statistics.median(r["decode_tok_s"] for r in results) if results else float("nan")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="mid", choices=sorted(decode_throughput.SIZES), help="model size")
    parser.add_argument("--precision", default="int8", choices=("fp32", "int8", "int4"), help="ONNX graph to serve")
    parser.add_argument("--clients", default="1,4,8,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--requests", type=int, default=3, help="streamed requests per client, one after another")
    parser.add_argument("--max_tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--max_batch", type=int, default=16, help="the server's --max_batch")
    parser.add_argument("--threads", type=int, default=2, help="engine CPU threads")
    parser.add_argument("--peer", default=None, help="folder chatglm.cpp was built into (its single-stream baseline)")
    parser.add_argument("--work_dir", default="build/bench", help="where the model and its exports go")
    args = parser.parse_args(argv)
    args.work_dir = (ROOT / args.work_dir).resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.model_dir = args.work_dir / f"{args.size}-model"
    export = decode_throughput.prepare(args)
    proc, url = start_server(export, args)
    try:
        run_level(url, 1, argparse.Namespace(requests=1, max_tokens=4))  # warm-up
        levels = [run_level(url, int(n), args) for n in args.clients.split(",")]
    finally:
        proc.terminate()
        proc.wait(30)
    peer, peer_levels = None, []
    if args.peer:
        kind = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}[args.precision]
        peer_args = argparse.Namespace(**{**vars(args), "contexts": [32], "new_tokens": args.max_tokens})
        peer = decode_throughput.run_peer(peer_args)["32"][kind]
        server = PeerServer(args, Path(f"{args.work_dir / args.size}-ggml-{kind}.bin"))
        try:
            run_level(server.url, 1, argparse.Namespace(requests=1, max_tokens=4), server)  # warm-up
            peer_levels = [run_level(server.url, int(n), args, server) for n in args.clients.split(",")]
        finally:
            server.stop()
    print(f"\nserve_generation.py, {args.size} ChatGLM2 onnxruntime {args.precision}, {args.threads} threads, "
          f"--max_batch {args.max_batch}; {args.requests} streamed requests per client, {args.max_tokens} new tokens")
    head = f"{'clients':>8}{'completed':>11}{'aggregate tok/s':>17}{'TTFT p50 ms':>13}{'TTFT p95 ms':>13}"
    print(head + f"{'stream tok/s':>14}" + (f"{'x cpp 1-stream':>16}{'x cpp server':>14}" if peer else ""))
    for i, level in enumerate(levels):
        print(level_line(level) + (f"{level['aggregate_tok_s'] / peer['decode_tok_s']:>16.2f}"
                                   f"{level['aggregate_tok_s'] / peer_levels[i]['aggregate_tok_s']:>14.2f}"
                                   if peer else ""))
        for error in level["errors"]:
            print(f"    error: {error}")
    if peer:
        print(f"chatglm.cpp {peer_args.new_tokens} tokens single stream: first token {peer['first_token_ms']:.1f} ms, "
              f"decode {peer['decode_tok_s']:.0f} tok/s; its own OpenAI server, the same clients:")
        print(head + f"{'stream tok/s':>14}")
        for level in peer_levels:
            print(level_line(level))
            for error in level["errors"]:
                print(f"    error: {error}")
    print(json.dumps({"levels": levels, "peer": peer, "peer_server": peer_levels}), file=sys.stderr)


def level_line(level: dict) -> str:
    return (f"{level['clients']:>8}{level['completed']:>6}/{level['sent']:<4}{level['aggregate_tok_s']:>17.0f}"
            f"{level['ttft_p50_ms']:>13.1f}{level['ttft_p95_ms']:>13.1f}{level['stream_tok_s']:>14.0f}")


if __name__ == "__main__":
    main()
