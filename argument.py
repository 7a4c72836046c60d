"""Argument dataclasses shared by every glm-tune script (PaddleNLP `llm/` style: `field(metadata={"help": …})`).

Scripts parse the groups they need with PaddleNLP's PdArgumentParser, so flags read exactly as in the
PaddleNLP ChatGLM examples (`--model_name_or_path`, `--task_name_or_path`, `--src_length`, `--tgt_length`, …)
and `script.py config.json` works as well as command-line flags.
"""
from dataclasses import dataclass, field
from typing import Optional

from paddlenlp.trainer import TrainingArguments


@dataclass
class DataArgument:
    task_name_or_path: str = field(
        default=None,
        metadata={"help": "Folder holding train.json and dev.json (AdvertiseGen, instruction or BelleGroup records, "
                          "JSON lines or a JSON list)."},
    )
    src_length: int = field(default=128, metadata={"help": "Max tokens of the prompt (incl. special tokens); "
                                                           "longer prompts lose their oldest tokens."})
    tgt_length: int = field(default=128, metadata={"help": "Max tokens of the answer, end token included; also "
                                                           "the max new tokens generated at evaluation."})
    skip_bad_records: bool = field(default=False, metadata={"help": "Skip malformed records (and report how many) "
                                                                    "instead of stopping at the first one."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Evaluate on the first N dev records "
                                                                            "only (generation is slow)."})

    def __post_init__(self):
        if self.src_length <= 2 or self.tgt_length <= 1:
            raise ValueError(f"--src_length ({self.src_length}) must exceed 2 and --tgt_length "
                             f"({self.tgt_length}) must exceed 1 to hold the special tokens")


@dataclass
class ModelArgument:
    model_name_or_path: str = field(default=None, metadata={"help": "Folder of a ChatGLM checkpoint (Paddle layout "
                                                                    "or Hugging Face layout) or a PaddleNLP name."})
    model_type: Optional[str] = field(default=None, metadata={"help": "chatglm | chatglm2 | chatglm3; detected from "
                                                                      "the checkpoint when omitted."})
    lora: bool = field(default=False, metadata={"help": "Fine-tune LoRA adapters instead of all weights."})
    lora_path: Optional[str] = field(default=None, metadata={"help": "Folder of trained LoRA adapters to load."})
    lora_rank: int = field(default=8, metadata={"help": "Rank of the LoRA update matrices."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (update scaled by alpha/rank)."})
    prefix_tuning: bool = field(default=False, metadata={"help": "Fine-tune P-Tuning v2 prefixes instead of "
                                                                 "all weights."})
    prefix_path: Optional[str] = field(default=None, metadata={"help": "Folder of trained prefixes to load."})
    num_prefix_tokens: int = field(default=64, metadata={"help": "Number of prefix tokens per layer."})


@dataclass
class GenerateArgument:
    decode_strategy: str = field(default="greedy_search", metadata={"help": "greedy_search or sampling."})
    top_k: int = field(default=1, metadata={"help": "Sampling: keep the k most likely tokens (1 = greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Sampling: keep the smallest set of tokens whose "
                                                        "probability reaches top_p."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling: divide logits by this before softmax."})


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
        super().__post_init__()


@dataclass
class PredictArgument:
    data_file: Optional[str] = field(default=None, metadata={"help": "JSON lines (or a JSON list) whose 'content' "
                                                                     "or 'instruction'/'input' is the prompt; "
                                                                     "built-in examples when omitted."})
    output_file: Optional[str] = field(default=None, metadata={"help": "Write JSON lines {\"prompt\", \"output\"} "
                                                                       "here, in input order."})
    batch_size: int = field(default=4, metadata={"help": "Prompts generated together (left-padded)."})
    seed: int = field(default=42, metadata={"help": "Seed for sampling."})
    merge_tensor_parallel_path: Optional[str] = field(default=None, metadata={
        "help": "With a tensor-parallel checkpoint under paddle.distributed.launch: also write the merged "
                "single-shard checkpoint (weights, config, tokenizer) to this folder."})
