"""The predictor template shared by predict_generation.py (dygraph) and infer_generation.py (exported engine):
`predict(examples) = _postprocess(_infer(_preprocess(examples)))`; the two differ only in `_infer`."""
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import List

from glm_tune.data.examples import Example
from glm_tune.data.prompt_formats import cut_summary, get_prompt_format
from glm_tune.deployment.continuous_batching import Request, Scheduler
from glm_tune.deployment.export_format import EngineError
from glm_tune.deployment.prefix_cache import PrefixCache
from glm_tune.generation import decode_answer, generate_ids, stop_token_ids
from glm_tune.sampling import Sampling

logger = logging.getLogger(__name__)

BUILTIN_PROMPTS = ["类型#上衣*材质#牛仔布*颜色#白色*风格#简约*图案#刺绣", "类型#裙*风格#复古*图案#格子",
                   "你好", "晚上睡不着应该怎么办"]


class BasePredictor:
    def __init__(self, tokenizer, generation: str, src_length: int, max_new_tokens: int, batch_size: int = 8,
                 sampling: Sampling = None, seed: int = 42):
        self.tokenizer, self.generation = tokenizer, generation
        self.format = get_prompt_format(generation, tokenizer)
        self.src_length, self.max_new_tokens, self.batch_size = src_length, max_new_tokens, batch_size
        self.sampling = sampling or Sampling()
        self.seed = seed

    def _preprocess(self, examples: List[Example]) -> List[List[int]]:
        prompts = [self.format.prompt_ids(e.src, e.history, self.src_length) if e.conversation is None else
                   self.format.turns_prompt_ids(e.conversation, self.src_length) for e in examples]
        cuts = cut_summary(self.format, len(prompts), self.src_length)
        if cuts:
            logger.info(cuts)
        return prompts

    def _infer(self, prompts: List[List[int]]) -> List[List[int]]:
        raise NotImplementedError

    def _postprocess(self, ids: List[List[int]]) -> List[str]:
        return [decode_answer(self.tokenizer, row) for row in ids]

    def predict_ids(self, examples: List[Example]) -> List[List[int]]:
        return self._infer(self._preprocess(examples))

    def predict(self, examples: List[Example]) -> List[str]:
        return self._postprocess(self.predict_ids(examples))


class DygraphPredictor(BasePredictor):
    """PaddleNLP's `generate` on the dygraph model."""

    def __init__(self, model, tokenizer, generation, **kwargs):
        super().__init__(tokenizer, generation, **kwargs)
        self.model = model

    def _infer(self, prompts):
        import paddle

        paddle.seed(self.seed)
        return generate_ids(self.model, self.tokenizer, self.generation, prompts, self.max_new_tokens,
                            self.batch_size, **self.sampling.generate_kwargs())


class StepEnginePredictor(BasePredictor):
    """Runs an exported step graph with its KV cache on the server's scheduler (continuous_batching.py), driven on
    the calling thread: up to `batch_size` prompts decode together, a finished one's place goes to the next, and
    speculative steps and the prefix cache work as they do when serving.
    `run(feeds) -> (logits [B, K, V], *caches)` is the engine: Paddle Inference, FastDeploy or ONNX Runtime."""

    def __init__(self, run, feeds, tokenizer, generation, speculative: int = 0, prefix_cache_mb: int = 0,
                 **kwargs):
        super().__init__(tokenizer, generation, **kwargs)
        self.run, self.feeds = run, feeds
        self.stops = stop_token_ids(tokenizer, generation)
        prefix_cache = PrefixCache(prefix_cache_mb * 2 ** 20) if prefix_cache_mb else None
        self.scheduler = Scheduler(run, feeds, self.stops, max_batch=self.batch_size, max_waiting=2 ** 62,
                                   speculative=speculative, prefix_cache=prefix_cache)
        self.prompts_seen = 0

    def _infer(self, prompts):
        failures = []
        requests = []
        for prompt in prompts:
            # one seed per prompt, counted over the run: a sampled answer does not depend on its batch-mates
            sampling = replace(self.sampling, seed=self.seed + self.prompts_seen)
            self.prompts_seen += 1
            requests.append(Request(list(prompt), self.max_new_tokens, on_token=lambda token: None,
                                    on_finish=lambda reason: None, on_error=failures.append, sampling=sampling))
            self.scheduler.submit(requests[-1])
        self.scheduler.run_until_idle()
        if failures:
            raise EngineError(failures[0])
        return [r.tokens for r in requests]  # a request's tokens end before its stop token (the scheduler's rule)

    def speed_summary(self) -> str:
        """First-token latency (the prefill calls) and decode throughput (every later call), and what the
        speculative steps and the prefix cache did."""
        stats = self.scheduler.summary()
        first = 1000 * stats["prefill_seconds"] / max(stats["prefill_calls"], 1)
        rate = stats["decode_tokens"] / stats["decode_seconds"] if stats["decode_seconds"] else 0.0
        line = (f"first token {first:.1f} ms per prefill call, decode {rate:.0f} tok/s ({stats['decode_tokens']} "
                f"tokens in {stats['decode_calls']} calls)")
        if stats["drafted"]:
            line += f"; speculative: {stats['accepted']} of {stats['drafted']} drafts kept"
        if "prefix_cache" in stats:
            cache = stats["prefix_cache"]
            line += f"; prefix cache: {cache['hits']} hits, {cache['tokens_reused']} prompt tokens reused"
        return line


def report_predictions(examples: List[Example], outputs: List[str], output_file=None) -> None:
    """Print each prompt and answer; with `output_file`, also write them as JSON lines (predict and infer share
    this, so their files compare line by line)."""
    for example, output in zip(examples, outputs):
        print(f"### prompt: {example.src}\n### output: {output}\n", flush=True)
    if output_file:
        write_predictions(output_file, examples, outputs)
        logger.info("wrote %d predictions to %s", len(outputs), output_file)


def write_predictions(path, examples: List[Example], outputs: List[str]) -> None:
    """JSON lines {"prompt", "output"} in input order, written atomically."""
    from glm_tune.safe_output import atomic_write_text

    lines = [json.dumps({"prompt": e.src, "output": o}, ensure_ascii=False) + "\n" for e, o in zip(examples, outputs)]
    atomic_write_text(Path(path), "".join(lines))


def is_predictions_file(path) -> bool:
    """True for a file `write_predictions` wrote: JSON lines of exactly {"prompt", "output"} (so predict and
    infer may replace their own earlier output, and nothing else, without --overwrite)."""
    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        return all(set(json.loads(line)) == {"prompt", "output"} for line in lines)
    except (OSError, ValueError, TypeError):
        return False


def check_predictions_target(output_file, overwrite: bool, inputs: dict) -> None:
    """Refuse an --output_file that is an input, a folder, or a file this command did not write."""
    from glm_tune.safe_output import check_output_file

    if output_file:
        check_output_file(output_file, "--output_file", inputs, overwrite, is_predictions_file)


def load_prompts(data_file: str = None) -> List[Example]:
    """Prompts from `--data_file` (JSON lines or list with `content` or `instruction`/`input`), or the built-ins."""
    from glm_tune.data.records import read_examples

    if not data_file:
        return [Example(p) for p in BUILTIN_PROMPTS]
    return read_examples(data_file, require_target=False)
