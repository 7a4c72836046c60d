"""Run an exported ChatGLM step graph on Paddle Inference's C++ engine (or FastDeploy's runtime), batch or chat.

    python infer_generation.py --model_path ./checkpoints/infer --model_prefix chatglm
    python infer_generation.py --model_path ./checkpoints/infer --model_prefix chatglm --data_file dev.json \
        --output_file engine.json          # same contract as predict_generation.py: compare line by line
    python infer_generation.py --model_path ./checkpoints/infer --model_prefix chatglm --interactive True
"""
import logging
import sys
from dataclasses import dataclass, field
from typing import Optional

from paddlenlp.trainer import PdArgumentParser

from argument import GenerateArgument, PredictArgument
from data import DataFormatError, Example
from glm_family import get_generation
from inference_engine import EngineError, create_engine, read_description
from predictor import StepEnginePredictor, load_prompts, report_predictions
from step_model import StepFeeds
from utils import quiet_library_logs

logger = logging.getLogger("infer_generation")


@dataclass
class InferArgument:
    model_path: str = field(default="./checkpoints/infer", metadata={"help": "Folder of the exported model."})
    model_prefix: str = field(default="chatglm", metadata={"help": "File prefix of the exported model."})
    backend: str = field(default="paddle", metadata={"help": "paddle (Paddle Inference C++ predictor) or "
                                                             "fastdeploy (FastDeploy runtime, if installed)."})
    threads: int = field(default=2, metadata={"help": "CPU threads of the engine."})
    src_length: Optional[int] = field(default=None, metadata={"help": "Max prompt tokens (default: export's)."})
    tgt_length: Optional[int] = field(default=None, metadata={"help": "Max new tokens (default: export's)."})
    interactive: bool = field(default=False, metadata={"help": "Read prompts from stdin, one per line, and answer "
                                                               "each (keeps the conversation as history)."})


def build_predictor(infer_args, gen_args, predict_args) -> StepEnginePredictor:
    info = read_description(infer_args.model_path, infer_args.model_prefix)
    generation = info["generation"]
    _, _, tokenizer_class = get_generation(generation).classes()
    tokenizer = tokenizer_class.from_pretrained(infer_args.model_path)
    config_class, _, _ = get_generation(generation).classes()
    config = config_class.from_pretrained(infer_args.model_path)
    engine = create_engine(infer_args.backend, infer_args.model_path, infer_args.model_prefix, infer_args.threads)
    defaults = info["defaults"]
    return StepEnginePredictor(
        engine, StepFeeds(tokenizer, generation, config, info["dtype"]), tokenizer, generation,
        src_length=infer_args.src_length or defaults["src_length"],
        max_new_tokens=infer_args.tgt_length or defaults["max_new_tokens"], batch_size=predict_args.batch_size,
        decode_strategy=gen_args.decode_strategy, top_k=gen_args.top_k, top_p=gen_args.top_p,
        temperature=gen_args.temperature, seed=predict_args.seed)


def chat(predictor, stdin=sys.stdin, stdout=sys.stdout) -> None:
    """One answer per input line; 'clear' forgets the conversation, 'exit' or end of input stops."""
    history = []
    stdout.write("prompt (clear: new conversation, exit: quit)> ")
    stdout.flush()
    for line in stdin:
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
    parser = PdArgumentParser((InferArgument, GenerateArgument, PredictArgument))
    return parser.parse_args_into_dataclasses(sys.argv[1:] if argv is None else argv)


def main(argv=None):
    infer_args, gen_args, predict_args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_library_logs()
    predictor = build_predictor(infer_args, gen_args, predict_args)
    if infer_args.interactive:
        chat(predictor)
        return None
    examples = load_prompts(predict_args.data_file)
    outputs = predictor.predict(examples)
    report_predictions(examples, outputs, predict_args.output_file)
    return outputs


if __name__ == "__main__":
    try:
        main()
    except (EngineError, DataFormatError) as err:
        sys.exit(f"error: {err}")
