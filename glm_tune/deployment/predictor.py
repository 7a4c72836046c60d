"""The predictor template shared by predict_generation.py (dygraph) and infer_generation.py (exported engine):
`predict(examples) = _postprocess(_infer(_preprocess(examples)))`; the two differ only in `_infer`."""
import json
import logging
import time
from pathlib import Path
from typing import List

import numpy as np

from glm_tune.data.examples import Example
from glm_tune.data.prompt_formats import cut_summary, get_prompt_format
from glm_tune.generation import cut_at_stop, decode_answer, generate_ids, stop_token_ids
from glm_tune.sampling import Sampling, choose_next

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
    """Runs an exported step graph (see step_model.py) one token at a time with its KV cache.
    `run(feeds) -> (next_logits, *caches)` is the engine: Paddle Inference, FastDeploy or ONNX Runtime."""

    def __init__(self, run, feeds, tokenizer, generation, **kwargs):
        super().__init__(tokenizer, generation, **kwargs)
        self.run, self.feeds = run, feeds
        self.stops = stop_token_ids(tokenizer, generation)
        self.speed = EngineSpeed()

    def _infer(self, prompts):
        results = []
        rng = np.random.RandomState(self.seed)
        for start in range(0, len(prompts), self.batch_size):
            results += self._generate(prompts[start:start + self.batch_size], rng)
        return results

    def _generate(self, prompts, rng):
        feeds = self.feeds.prefill(prompts)
        tokens = [[] for _ in prompts]
        done = np.zeros(len(prompts), dtype=bool)
        for step in range(self.max_new_tokens):
            started = time.perf_counter()
            logits, *caches = self.run(feeds)
            self.speed.add(step, time.perf_counter() - started, int((~done).sum()))
            chosen = choose_next(logits, rng, self.sampling)
            for row, token in enumerate(chosen):
                if not done[row]:
                    tokens[row].append(int(token))
                    done[row] = int(token) in self.stops
            if done.all():
                break
            feeds = self.feeds.advance(feeds, chosen, caches)
        return [cut_at_stop(row, self.stops) for row in tokens]


class EngineSpeed:
    """First-token latency (the prefill calls) and decode throughput (every later call, tokens of unfinished
    rows only) of an engine, summed over batches."""

    def __init__(self):
        self.prefill_seconds = self.decode_seconds = 0.0
        self.prefills = self.decode_tokens = 0

    def add(self, step: int, seconds: float, rows: int) -> None:
        if step == 0:
            self.prefill_seconds += seconds
            self.prefills += 1
        else:
            self.decode_seconds += seconds
            self.decode_tokens += rows

    def summary(self) -> str:
        first = 1000 * self.prefill_seconds / max(self.prefills, 1)
        rate = self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0
        return f"first token {first:.1f} ms per batch, decode {rate:.0f} tok/s ({self.decode_tokens} tokens)"


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
