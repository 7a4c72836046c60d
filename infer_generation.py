"""Run an exported ChatGLM step graph on Paddle Inference's C++ engine (or FastDeploy's runtime), batch or chat.

    python infer_generation.py --model_path ./checkpoints/infer --model_prefix chatglm
    python infer_generation.py --model_path ./checkpoints/infer --model_prefix chatglm --data_file dev.json \
        --output_file engine.json          # same contract as predict_generation.py: compare line by line
    python infer_generation.py --model_path ./checkpoints/infer --model_prefix chatglm --interactive True
"""
from glm_tune import console

console.quiet_startup()  # called before the imports below: paddle prints its start-up warnings while it loads

import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Optional

from argument import EngineArgument, GenerateArgument, PredictArgument, parse_dataclasses, require_flag
from data import ChatTurn, DataFormatError, Example, parse_tool_call, tool_call_turn, tools_system_text
from glm_tune.errors import one_line, run_cli
from glm_tune.deployment.exported_model import open_export, step_settings
from glm_tune.sampling import Sampling
from glm_tune.deployment.predictor import (StepEnginePredictor, check_predictions_target, load_prompts,
                                           report_predictions)

logger = logging.getLogger("infer_generation")


@dataclass
class InferArgument(EngineArgument):
    src_length: Optional[int] = field(default=None, metadata={"help": "Max prompt tokens (default: export's)."})
    tgt_length: Optional[int] = field(default=None, metadata={"help": "Max new tokens (default: export's)."})
    interactive: bool = field(default=False, metadata={"help": "Read prompts from stdin, one per line, and answer "
                                                               "each (keeps the conversation as history)."})
    tools_file: Optional[str] = field(default=None, metadata={
        "help": "With --interactive on a ChatGLM3 export: a JSON list of tools ({name, description, parameters}) "
                "the model may call; a call is shown and the next line you type is the tool's result."})

    def __post_init__(self):
        super().__post_init__()
        require_flag(self.src_length is None or self.src_length > 2,
                     f"--src_length {self.src_length} must exceed 2 (omit it for the export's default)")
        require_flag(self.tgt_length is None or self.tgt_length >= 1,
                     f"--tgt_length {self.tgt_length} must be at least 1 (omit it for the export's default)")
        require_flag(self.tools_file is None or self.interactive, "--tools_file goes with --interactive True")


def build_predictor(infer_args, gen_args, predict_args) -> StepEnginePredictor:
    model = open_export(infer_args)
    defaults = model.info["defaults"]
    src_length = defaults["src_length"] if infer_args.src_length is None else infer_args.src_length
    max_new_tokens = defaults["max_new_tokens"] if infer_args.tgt_length is None else infer_args.tgt_length
    limit = model.context_length  # the export's position table: a longer run fails mid-way inside the engine
    require_flag(src_length + max_new_tokens <= limit,
                 f"--src_length {src_length} + --tgt_length {max_new_tokens} = {src_length + max_new_tokens} exceeds "
                 f"this export's sequence length {limit}; lower them so the sum is at most {limit}")
    return StepEnginePredictor(
        model.engine, model.feeds, model.tokenizer, model.generation,
        src_length=src_length, max_new_tokens=max_new_tokens, batch_size=predict_args.batch_size,
        sampling=Sampling.from_arguments(gen_args), seed=predict_args.seed,
        **dict(zip(("speculative", "prefix_cache_mb"), step_settings(infer_args, model.precision))))


def read_tools(path) -> list:
    """The --tools_file list, checked: each tool an object with a name."""
    from data import read_text_file

    try:
        tools = json.loads(read_text_file(path, "tools file"))
    except ValueError as err:
        raise DataFormatError(f"--tools_file {path}: not JSON ({one_line(err)})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools):
        raise DataFormatError(f"--tools_file {path}: expected a JSON list of tools, each with a 'name'")
    return tools


def chat(predictor, stdin=None, stdout=sys.stdout, tools=None) -> None:
    """One answer per input line; 'clear' forgets the conversation, 'exit' or end of input stops. A line that
    is not UTF-8 is answered with a one-line error and the conversation goes on. With `tools` (ChatGLM3), a
    tool call the model makes is parsed (never run) and shown, and the next line is taken as the tool's result."""
    if tools:
        return chat_with_tools(predictor, tools, stdin, stdout)
    stdin = sys.stdin.buffer if stdin is None else stdin
    history = []
    stdout.write("prompt (clear: new conversation, exit: quit)> ")
    stdout.flush()
    for query in input_lines(stdin, stdout, "prompt> "):
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


def input_lines(stdin, stdout, prompt: str):
    """Stripped input lines; a line that is not UTF-8 gets a one-line error and the prompt again."""
    for number, raw in enumerate(stdin, start=1):
        try:
            yield (raw.decode("utf-8") if isinstance(raw, bytes) else raw).strip()
        except UnicodeDecodeError as err:
            stdout.write(f"error: input line {number} is not UTF-8 text ({one_line(err)}); type it again\n{prompt}")
            stdout.flush()


def chat_with_tools(predictor, tools, stdin=None, stdout=sys.stdout) -> None:
    stdin = sys.stdin.buffer if stdin is None else stdin
    names = {t["name"] for t in tools}
    opening = [ChatTurn("system", tools_system_text(tools))]
    turns, calling = list(opening), None
    stdout.write(f"prompt (tools: {', '.join(sorted(names))}; clear: new conversation, exit: quit)> ")
    stdout.flush()
    for line in input_lines(stdin, stdout, "> "):
        if line in ("exit", "quit"):
            break
        if line == "clear":
            turns, calling = list(opening), None
        elif line:
            turns.append(ChatTurn("observation" if calling else "user", line))
            answer = predictor.predict([Example(line, conversation=list(turns))])[0]
            call = parse_tool_call(answer)
            if call is not None and call[0] in names:
                calling = call
                turns.append(tool_call_turn(*call))
                stdout.write(f"ChatGLM calls {call[0]}({json.dumps(call[1], ensure_ascii=False)}); type the "
                             "tool's result\n")
            else:
                calling = None
                turns.append(ChatTurn("assistant", answer))
                stdout.write(f"ChatGLM: {answer}\n")
        stdout.write("result> " if calling else "prompt> ")
        stdout.flush()
    return None


# The flags this command takes, in --help's order (tools/flag_reference.py documents them in docs/flags.md).
ARGUMENT_GROUPS = (InferArgument, GenerateArgument, PredictArgument)


def parse_arguments(argv=None):
    return parse_dataclasses(ARGUMENT_GROUPS, argv)


def main(argv=None):
    console.setup_logging(console.verbose_requested(argv))  # before parsing: PaddleNLP logs while it parses
    infer_args, gen_args, predict_args = parse_arguments(argv)
    check_predictions_target(predict_args.output_file, predict_args.overwrite,
                             {"--data_file": predict_args.data_file, "--model_path": infer_args.model_path})
    examples = None if infer_args.interactive else load_prompts(predict_args.data_file)
    tools = read_tools(infer_args.tools_file) if infer_args.tools_file else None
    predictor = build_predictor(infer_args, gen_args, predict_args)
    if tools and predictor.generation != "chatglm3":
        raise DataFormatError(f"--tools_file needs a ChatGLM3 export; {infer_args.model_path} holds "
                              f"{predictor.generation}")
    if infer_args.interactive:
        chat(predictor, tools=tools)
        return None
    outputs = predictor.predict(examples)
    report_predictions(examples, outputs, predict_args.output_file)
    logger.info("engine speed: %s", predictor.speed_summary())
    return outputs


if __name__ == "__main__":
    run_cli(main)
