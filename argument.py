"""Argument dataclasses shared by every glm-tune script (PaddleNLP `llm/` style: `field(metadata={"help": …})`).

Scripts parse the groups they need with PaddleNLP's PdArgumentParser, so flags read exactly as in the
PaddleNLP ChatGLM examples (`--model_name_or_path`, `--task_name_or_path`, `--src_length`, `--tgt_length`, …)
and `script.py config.json` works as well as command-line flags.
"""
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from paddlenlp.trainer import PdArgumentParser, TrainingArguments

from glm_tune.errors import GlmTuneError


class ArgumentError(GlmTuneError):
    """A flag value no command can use; the message names the flag and the accepted values."""


def build_parser(groups) -> PdArgumentParser:
    """The parser of a command's argument dataclasses, with --verbose (ConsoleArgument) added."""
    return PdArgumentParser((*groups, ConsoleArgument))


def parse_dataclasses(groups, argv=None):
    """Parse argv (or one JSON config file) into the argument dataclasses `groups`; a value a dataclass
    refuses becomes an ArgumentError naming the flag instead of a traceback. Every script also takes
    --verbose (ConsoleArgument), which console.py reads from the command line before paddle loads."""
    parser = build_parser(groups)
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            *parsed, _ = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
        else:
            *parsed, _ = parser.parse_args_into_dataclasses(argv)
        return tuple(parsed)
    except ArgumentError:
        raise
    except (ValueError, TypeError, OSError) as err:
        raise ArgumentError(str(err)) from None


def comma_list(value: Optional[str]) -> list:
    """The non-empty, stripped items of a comma-separated flag value ("a, b," -> ["a", "b"]; None -> [])."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def require_flag(condition: bool, message: str) -> None:
    if not condition:
        raise ArgumentError(message)


@dataclass
class LengthArgument:
    src_length: int = field(default=128, metadata={"help": "Max tokens of the prompt (incl. special tokens); a "
                                                           "longer prompt loses its oldest turns, then the end of "
                                                           "the question (never the template)."})
    tgt_length: int = field(default=128, metadata={"help": "Max tokens of the answer, end token included; also "
                                                           "the max new tokens generated."})

    def __post_init__(self):
        require_flag(self.src_length > 2 and self.tgt_length > 1,
                     f"--src_length ({self.src_length}) must exceed 2 and --tgt_length ({self.tgt_length}) must "
                     "exceed 1 to hold the special tokens")


@dataclass
class DataArgument(LengthArgument):
    """finetune_generation.py's data: the lengths plus the task folder and how to read it."""
    task_name_or_path: str = field(
        default=None,
        metadata={"help": "Folder holding train.json and dev.json (AdvertiseGen, instruction or BelleGroup records, "
                          "JSON lines or a JSON list)."},
    )
    data_format: Optional[str] = field(default=None, metadata={
        "help": "conversations (ChatGLM3 roles, tools, per-message loss), content (AdvertiseGen) or instruction; "
                "default: told apart per record by its fields."})
    skip_bad_records: bool = field(default=False, metadata={"help": "Skip malformed records (and report how many) "
                                                                    "instead of stopping at the first one."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Evaluate on the first N dev records "
                                                                            "only (generation is slow)."})

    def __post_init__(self):
        super().__post_init__()
        require_flag(self.max_eval_samples is None or self.max_eval_samples >= 1,
                     f"--max_eval_samples {self.max_eval_samples} must be at least 1 (omit it to evaluate every "
                     "record)")


@dataclass
class ModelArgument:
    model_name_or_path: str = field(default=None, metadata={"help": "Folder of a ChatGLM checkpoint (Paddle layout "
                                                                    "or Hugging Face layout) or a PaddleNLP name."})
    model_type: Optional[str] = field(default=None, metadata={"help": "chatglm | chatglm2 | chatglm3; read from "
                                                                      "the checkpoint (give it only to tell "
                                                                      "ChatGLM2 from ChatGLM3 in a folder that "
                                                                      "does not say)."})
    lora_path: Optional[str] = field(default=None, metadata={"help": "Folder of trained LoRA adapters to load."})
    prefix_path: Optional[str] = field(default=None, metadata={"help": "Folder of trained prefixes to load."})


@dataclass
class TrainModelArgument(ModelArgument):
    """finetune_generation.py's model flags: the checkpoint plus which adapters to train."""
    lora: bool = field(default=False, metadata={"help": "Fine-tune LoRA adapters instead of all weights."})
    lora_rank: int = field(default=8, metadata={"help": "Rank of the LoRA update matrices."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (update scaled by alpha/rank)."})
    prefix_tuning: bool = field(default=False, metadata={"help": "Fine-tune P-Tuning v2 prefixes instead of "
                                                                 "all weights."})
    num_prefix_tokens: int = field(default=64, metadata={"help": "Number of prefix tokens per layer."})


@dataclass
class GenerateArgument:
    decode_strategy: str = field(default="greedy_search", metadata={"help": "greedy_search or sampling."})
    top_k: int = field(default=1, metadata={"help": "Sampling: keep the k most likely tokens (1 = greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Sampling: keep the smallest set of tokens whose "
                                                        "probability reaches top_p."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling: divide logits by this before softmax "
                                                              "(> 0; lower is more deterministic)."})

    def __post_init__(self):
        require_flag(self.decode_strategy in ("greedy_search", "sampling"),
               f"--decode_strategy {self.decode_strategy!r}: choose greedy_search or sampling")
        require_flag(self.top_k >= 0, f"--top_k {self.top_k} must be 0 (no limit) or a positive number of tokens")
        require_flag(0.0 < self.top_p <= 1.0, f"--top_p {self.top_p} must be in (0, 1]")
        require_flag(self.temperature > 0.0, f"--temperature {self.temperature} must be above 0 (use --decode_strategy "
                                       "greedy_search for deterministic answers)")


@dataclass
class GLMTrainingArguments(TrainingArguments):
    do_generation: bool = field(default=False, metadata={"help": "At evaluation, generate answers for the dev set "
                                                                 "and report ROUGE-1/2/L and BLEU-4; otherwise "
                                                                 "report teacher-forced token accuracy."})
    log_dir: Optional[str] = field(default=None, metadata={"help": "Alias of --logging_dir (VisualDL logs)."})

    def __post_init__(self):
        if self.log_dir:
            self.logging_dir = self.log_dir
        # PaddleNLP quietly lowers tensor_parallel_degree to the number of processes; keep what was asked
        # so a run without the launcher is refused instead of silently training on one process.
        self.requested_tensor_parallel_degree = self.tensor_parallel_degree
        check_layout(self.tensor_parallel_degree, self.sharding, int(os.environ.get("PADDLE_TRAINERS_NUM", "1")))
        super().__post_init__()


def check_layout(degree: int, sharding, processes: int) -> None:
    """Refuse, before PaddleNLP starts the distributed environment, a process layout it would reject with an
    assertion or that has no CPU implementation."""
    if processes > 1 and degree > 1 and processes % degree:
        require_flag(False, f"{processes} processes are not a multiple of --tensor_parallel_degree {degree}: launch "
                            f"{degree} x k processes (k data-parallel replicas), e.g. --nproc_per_node {degree}")
    stages = str(sharding or "").split()
    if any(s in ("stage2", "stage3") for s in stages) and processes > 1:
        import paddle

        require_flag(not paddle.get_device().startswith("cpu"),
                     f"--sharding {sharding} needs GPUs (Paddle's group_sharded_parallel has no CPU version); on CPU "
                     "use --sharding stage1 (optimizer states sharded) or no sharding")


@dataclass
class PredictArgument:
    data_file: Optional[str] = field(default=None, metadata={"help": "JSON lines (or a JSON list) whose 'content' "
                                                                     "or 'instruction'/'input' is the prompt; "
                                                                     "built-in examples when omitted."})
    output_file: Optional[str] = field(default=None, metadata={"help": "Write JSON lines {\"prompt\", \"output\"} "
                                                                       "here, in input order."})
    batch_size: int = field(default=4, metadata={"help": "Prompts generated together (left-padded)."})
    seed: int = field(default=42, metadata={"help": "Seed for sampling."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace an existing output that this command did not write; an earlier predictions file "
                "(or merge) is replaced without it."})

    def __post_init__(self):
        require_flag(self.batch_size >= 1, f"--batch_size {self.batch_size} must be at least 1")


@dataclass
class DygraphPredictArgument(PredictArgument):
    """predict_generation.py's flags: PredictArgument plus merging tensor-parallel shards."""
    merge_tensor_parallel_path: Optional[str] = field(default=None, metadata={
        "help": "With a tensor-parallel checkpoint under paddle.distributed.launch: also write the merged "
                "single-shard checkpoint (weights, config, tokenizer) to this folder."})


@dataclass
class EngineArgument:
    """Which exported model runs on which engine (infer_generation.py and serve_generation.py)."""
    model_path: str = field(default="./checkpoints/infer", metadata={"help": "Folder of the exported model."})
    model_prefix: str = field(default="chatglm", metadata={"help": "File prefix of the exported model."})
    backend: Optional[str] = field(default=None, metadata={
        "help": "onnxruntime (ONNX Runtime, fp32 or weight-only int8/int4), paddle (Paddle Inference C++ predictor) "
                "or fastdeploy (FastDeploy runtime, if installed); default: the fastest the export holds."})
    precision: Optional[str] = field(default=None, metadata={
        "help": "fp32, int8 or int4 (the last two: onnxruntime on a --quantize export); default: the fastest the "
                "export holds for the backend."})
    threads: int = field(default=2, metadata={"help": "CPU threads of the engine."})
    speculative: Optional[int] = field(default=None, metadata={
        "help": "Draft tokens per speculative step (prompt lookup: the tokens that followed the answer's latest "
                "n-gram earlier in prompt + answer, verified in one engine call); sampled rows keep drafts by the "
                "speculative-sampling rule (each token distributed as one-step sampling gives). Default: 4 on fp32 engines (greedy answers token for token the plain ones), 0 (off) on "
                "int8 / int4, whose weight-only kernels give a step over several tokens logits that differ at the "
                "quantization-noise level, so a near-tied greedy choice can differ."})
    prefix_cache_mb: Optional[int] = field(default=None, metadata={
        "help": "MiB of keys and values kept from earlier requests by their token prefix (blocks of 16 tokens, "
                "least recently used out first): a prompt that starts like an earlier one (the next turn of a "
                "conversation, the same tools system message) prefills only its new end. ChatGLM2/3. Default: 256 "
                "on fp32 engines, 0 (off) on int8 / int4 (same reason as --speculative); 0: off."})

    def __post_init__(self):
        require_flag(self.speculative is None or 0 <= self.speculative <= 32,
                     f"--speculative {self.speculative}: choose 0 (off) to 32")
        require_flag(self.prefix_cache_mb is None or self.prefix_cache_mb >= 0,
                     f"--prefix_cache_mb {self.prefix_cache_mb} must be 0 (off) or more")
        cores = max(len(os.sched_getaffinity(0)), 2)  # the default of 2 stays valid on one core
        # More threads than cores only adds switching (10,000 made one token take seconds), so it is refused.
        require_flag(1 <= self.threads <= cores,
                     f"--threads {self.threads}: this machine gives the process {cores} CPUs; use 1 to {cores}")
        require_flag(self.precision in (None, "fp32", "int8", "int4"),
                     f"--precision {self.precision!r}: choose fp32, int8 or int4")


@dataclass
class ConsoleArgument:
    verbose: bool = field(default=False, metadata={"help": "Show the libraries' own start-up warnings and log lines "
                                                           "(also GLM_TUNE_VERBOSE=1)."})
