"""Serve an exported ChatGLM through OpenAI's chat-completions API, streaming, with continuous batching.

    python serve_generation.py --model_path ./checkpoints/infer              # http://127.0.0.1:8000/v1
    python serve_generation.py --model_path ./checkpoints/infer --api_key KEY --max_batch 8 --ui True

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"messages": [{"role": "user", "content": "你好"}], "stream": true}'

Endpoints: GET /v1/models, POST /v1/chat/completions (stream and non-stream; ChatGLM3 tools), GET /health, and
with --ui a chat page at /. The same engine, prompt formats and answer decoding as infer_generation.py.
"""
from glm_tune import console

console.quiet_startup()  # called before the imports below: paddle prints its start-up warnings while it loads

import ipaddress
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from argument import (ArgumentError, EngineArgument, GenerateArgument, comma_list, parse_dataclasses,
                      require_flag)
from data import get_prompt_format
from glm_tune.deployment.exported_model import open_export, step_settings
from glm_tune.errors import run_cli
from glm_tune.generation import stop_token_ids

logger = logging.getLogger("serve_generation")

API_KEY_VARIABLE = "GLM_TUNE_API_KEY"


@dataclass
class ServeArgument:
    host: str = field(default="127.0.0.1", metadata={
        "help": "Address to listen on. The default answers this machine only; 0.0.0.0 opens it to the network "
                "(set --api_key then)."})
    port: int = field(default=8000, metadata={"help": "TCP port."})
    api_key: Optional[str] = field(default=None, metadata={
        "help": f"Require 'Authorization: Bearer KEY' on every call (or set {API_KEY_VARIABLE}; the flag wins)."})
    served_model_name: Optional[str] = field(default=None, metadata={
        "help": "Model id in /v1/models and responses (default: the export folder's name); comma-separated for "
                "aliases a request's model may also use. Any other model gets 404 model_not_found, as OpenAI."})
    max_batch: int = field(default=8, metadata={"help": "Most requests decoded together; more wait in a queue."})
    max_waiting: int = field(default=64, metadata={"help": "Most requests waiting for a batch row; more get 429."})
    max_tokens_limit: Optional[int] = field(default=None, metadata={
        "help": "Largest max_tokens a request may ask for (default: the model's context)."})
    default_max_tokens: Optional[int] = field(default=None, metadata={
        "help": "max_tokens of a request that sets none (default: the export's max_new_tokens)."})
    max_messages: int = field(default=256, metadata={"help": "Most messages in one request."})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "Largest request body in bytes (413 above)."})
    ui: bool = field(default=False, metadata={"help": "Also serve a streaming chat page at / (same scheduler)."})
    allowed_hosts: Optional[str] = field(default=None, metadata={
        "help": "On a loopback --host, the Host header must name 127.0.0.1, localhost or ::1 (so a web page cannot "
                "reach the server through DNS rebinding): comma-separated extra names to accept, e.g. a proxy's. "
                "On another --host, when given, the only names accepted."})

    def __post_init__(self):
        require_flag(0 < self.port < 65536, f"--port {self.port} must be in 1..65535")
        for name in ("max_batch", "max_waiting", "max_messages", "max_body_bytes"):
            require_flag(getattr(self, name) >= 1, f"--{name} {getattr(self, name)} must be at least 1")
        for name in ("max_tokens_limit", "default_max_tokens"):
            value = getattr(self, name)
            require_flag(value is None or value >= 1, f"--{name} {value} must be at least 1")
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_VARIABLE) or None


def build_app(engine_args, gen_args, serve_args):
    """Open the export, start the scheduler and return (FastAPI app, scheduler)."""
    from glm_tune.serving.app import ServedModel, create_app
    from glm_tune.sampling import Sampling
    from glm_tune.deployment.continuous_batching import Scheduler
    from glm_tune.deployment.prefix_cache import PrefixCache
    from glm_tune.serving.openai_protocol import Limits

    model = open_export(engine_args)
    context = model.context_length
    limits = Limits(max_messages=serve_args.max_messages,
                    max_tokens=min(serve_args.max_tokens_limit or context, context),
                    default_max_tokens=serve_args.default_max_tokens or model.info["defaults"]["max_new_tokens"],
                    context_length=context)
    sampling = Sampling.from_arguments(gen_args)
    speculative, prefix_cache_mb = step_settings(engine_args, model.precision)
    prefix_cache = PrefixCache(prefix_cache_mb * 2 ** 20) if prefix_cache_mb else None
    scheduler = Scheduler(model.engine, model.feeds, stop_token_ids(model.tokenizer, model.generation),
                          max_batch=serve_args.max_batch, max_waiting=serve_args.max_waiting,
                          speculative=speculative, prefix_cache=prefix_cache).start()
    names = comma_list(serve_args.served_model_name) or [Path(engine_args.model_path).resolve().name]
    served = ServedModel(names[0], model.generation, model.tokenizer,
                         get_prompt_format(model.generation, model.tokenizer), scheduler, limits, sampling,
                         tuple(names[1:]))
    return create_app(served, serve_args.api_key, serve_args.max_body_bytes, serve_args.ui,
                      allowed_hosts(serve_args)), scheduler


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def allowed_hosts(serve_args):
    """The Host names a loopback server answers (None, any, on other addresses: --api_key guards those)."""
    extra = {h.lower() for h in comma_list(serve_args.allowed_hosts)}
    if not is_loopback(serve_args.host):
        return frozenset(extra) if extra else None
    from glm_tune.serving.app import LOOPBACK_NAMES

    return LOOPBACK_NAMES | {serve_args.host.lower()} | extra


def check_address(host: str, port: int) -> None:
    """Refuse an address this process cannot listen on before the model loads (uvicorn would only log it)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as err:
        raise ArgumentError(f"cannot listen on --host {host} --port {port} ({err.strerror or err}): choose another "
                            "--port, or stop what is using it") from None


def warn_if_open(serve_args) -> None:
    if not is_loopback(serve_args.host) and serve_args.api_key is None:
        logger.warning("listening on %s without --api_key: anyone who can reach this port can use the model",
                       serve_args.host)


# The flags this command takes, in --help's order (tools/flag_reference.py documents them in docs/flags.md).
ARGUMENT_GROUPS = (EngineArgument, GenerateArgument, ServeArgument)


def parse_arguments(argv=None):
    return parse_dataclasses(ARGUMENT_GROUPS, argv)


def main(argv=None):
    console.setup_logging(console.verbose_requested(argv))
    engine_args, gen_args, serve_args = parse_arguments(argv)
    import uvicorn

    check_address(serve_args.host, serve_args.port)
    app, scheduler = build_app(engine_args, gen_args, serve_args)
    warn_if_open(serve_args)
    logger.info("serving %s on http://%s:%d/v1 (max batch %d)%s", serve_args.served_model_name or
                Path(engine_args.model_path).resolve().name, serve_args.host, serve_args.port, serve_args.max_batch,
                f"; chat page at http://{serve_args.host}:{serve_args.port}/" if serve_args.ui else "")
    try:
        uvicorn.run(app, host=serve_args.host, port=serve_args.port, log_level="warning")
    finally:
        scheduler.stop()


if __name__ == "__main__":
    run_cli(main)
