"""Run an exported ChatGLM step graph on Paddle Inference's C++ engine (or FastDeploy's runtime), batch or chat.

    python infer_generation.py --model_path ./checkpoints/infer --model_prefix chatglm
    python infer_generation.py --model_path ./checkpoints/infer --model_prefix chatglm --data_file dev.json \
        --output_file engine.json          # same contract as predict_generation.py: compare line by line
    python infer_generation.py --model_path ./checkpoints/infer --model_prefix chatglm --interactive True
"""
from glm_tune import console  # first import: it turns the libraries' start-up noise off before paddle loads
import logging
import sys
from dataclasses import dataclass, field
from typing import Optional

from argument import EngineArgument, GenerateArgument, PredictArgument, parse_dataclasses, require_flag
from data import Example
from glm_tune.errors import one_line, run_cli
from glm_tune.deployment.exported_model import open_export
from glm_tune.deployment.predictor import (StepEnginePredictor, check_predictions_target, load_prompts,
                                           report_predictions)

logger = logging.getLogger("infer_generation")


@dataclass
class InferArgument(EngineArgument):
    src_length: Optional[int] = field(default=None, metadata={"help": "Max prompt tokens (default: export's)."})
    tgt_length: Optional[int] = field(default=None, metadata={"help": "Max new tokens (default: export's)."})
    interactive: bool = field(default=False, metadata={"help": "Read prompts from stdin, one per line, and answer "
                                                               "each (keeps the conversation as history)."})

    def __post_init__(self):
        super().__post_init__()
        require_flag(self.src_length is None or self.src_length > 2,
                     f"--src_length {self.src_length} must exceed 2 (omit it for the export's default)")
        require_flag(self.tgt_length is None or self.tgt_length >= 1,
                     f"--tgt_length {self.tgt_length} must be at least 1 (omit it for the export's default)")


def build_predictor(infer_args, gen_args, predict_args) -> StepEnginePredictor:
    model = open_export(infer_args)
    defaults = model.info["defaults"]
    src_length = defaults["src_length"] if infer_args.src_length is None else infer_args.src_length
    max_new_tokens = defaults["max_new_tokens"] if infer_args.tgt_length is None else infer_args.tgt_length
    return StepEnginePredictor(
        model.engine, model.feeds, model.tokenizer, model.generation,
        src_length=src_length, max_new_tokens=max_new_tokens, batch_size=predict_args.batch_size,
        decode_strategy=gen_args.decode_strategy, top_k=gen_args.top_k, top_p=gen_args.top_p,
        temperature=gen_args.temperature, seed=predict_args.seed)


def chat(predictor, stdin=None, stdout=sys.stdout) -> None:
    """One answer per input line; 'clear' forgets the conversation, 'exit' or end of input stops. A line that
    is not UTF-8 is answered with a one-line error and the conversation goes on."""
    stdin = sys.stdin.buffer if stdin is None else stdin
    history = []
    stdout.write("prompt (clear: new conversation, exit: quit)> ")
    stdout.flush()
    for number, raw in enumerate(stdin, start=1):
        try:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as err:
            stdout.write(f"error: input line {number} is not UTF-8 text ({one_line(err)}); type it again\nprompt> ")
            stdout.flush()
            continue
        query = line.strip()
        if query in ("exit", "quit"):
            break
        if query == "clear":
            history = []
        elif query:
            answer = predictor.predict([Example(query, history=list(history))])[0]
            history.append((query, answer))
            stdout.write(f"ChatGLM: {answer}\n")
        stdout.write("prompt> ")
        stdout.flush()


def parse_arguments(argv=None):
    return parse_dataclasses((InferArgument, GenerateArgument, PredictArgument), argv)


def main(argv=None):
    console.setup_logging(console.verbose_requested(argv))  # before parsing: PaddleNLP logs while it parses
    infer_args, gen_args, predict_args = parse_arguments(argv)
    check_predictions_target(predict_args.output_file, predict_args.overwrite,
                             {"--data_file": predict_args.data_file, "--model_path": infer_args.model_path})
    examples = None if infer_args.interactive else load_prompts(predict_args.data_file)
    predictor = build_predictor(infer_args, gen_args, predict_args)
    if infer_args.interactive:
        chat(predictor)
        return None
    outputs = predictor.predict(examples)
    report_predictions(examples, outputs, predict_args.output_file)
    logger.info("engine speed: %s", predictor.speed.summary())
    return outputs


if __name__ == "__main__":
    run_cli(main)
