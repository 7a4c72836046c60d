"""MindFormers recipes (ascend/configs/*.yaml) loaded for one run: the user's paths and model folder applied, the
device's limits applied, and checked before anything starts.

A recipe is the YAML MindFormers users know (`MindFormerConfig` parses it). The launchers change only what a run
must change:
- `--model_dir` (a THUDM ChatGLM2/3 folder): the model's sizes come from its `config.json` and the tokenizer from its
  `tokenizer.model`, so one recipe serves a 6B checkpoint and the tiny test models through the same code; its
  weights are converted to a MindSpore checkpoint once (ascend/convert_weights.py) unless `--load_checkpoint` is given;
- data files, output folder, batch size, epochs, learning rate, source/target lengths (seq_length follows);
- on a CPU (`--device_target CPU`): `adapt_to_cpu` lists each change, all of them things only an NPU has.
"""
import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

ASCEND = Path(__file__).resolve().parent

CONFIGS = ASCEND / "configs"
logger = logging.getLogger("glm_tune.ascend")

# ChatGLM2/3 config.json keys that size MindFormers' ChatGLM2Config (same names in both).
MODEL_SIZE_KEYS = ("num_layers", "padded_vocab_size", "hidden_size", "ffn_hidden_size", "kv_channels",
                   "num_attention_heads", "multi_query_group_num", "layernorm_epsilon", "add_qkv_bias",
                   "add_bias_linear", "eos_token_id", "pad_token_id")

# Where each `type:` of a recipe is looked up in MindFormers' registry (MindFormerModuleType values).
TYPE_SECTIONS = {
    "model.model_config": "config", "model.arch": "models", "trainer": "trainer", "metric": "metric",
    "processor": "processor", "processor.tokenizer": "tokenizer", "runner_wrapper": "wrapper",
    "runner_wrapper.scale_sense": "wrapper", "lr_schedule": "lr", "optimizer": "optimizer",
    "callbacks": "callback", "eval_callbacks": "callback",
    "train_dataset.data_loader": "dataset_loader", "train_dataset.tokenizer": "tokenizer",
    "train_dataset_task": "dataset", "train_dataset_task.dataset_config.data_loader": "dataset_loader",
    "train_dataset_task.dataset_config.tokenizer": "tokenizer",
    "eval_dataset.data_loader": "dataset_loader", "eval_dataset.tokenizer": "tokenizer",
    "eval_dataset_task": "dataset", "eval_dataset_task.dataset_config.data_loader": "dataset_loader",
    "eval_dataset_task.dataset_config.tokenizer": "tokenizer",
}
RUN_MODE_TASKS = {"train": "finetune", "finetune": "finetune", "eval": "eval", "predict": "predict"}
TOKENIZER_BY_GENERATION = {"chatglm2": "ChatGLM2Tokenizer", "chatglm3": "ChatGLM3Tokenizer"}


class RecipeError(ValueError):
    """A recipe or its overrides cannot run; the message says what to change."""


@dataclass
class RecipeOverrides:
    """What a launcher's flags change in a recipe (None: keep the recipe's value)."""
    model_dir: Optional[str] = None
    load_checkpoint: Optional[str] = None
    train_data: Optional[str] = None
    eval_data: Optional[str] = None
    output_dir: Optional[str] = None
    device_target: Optional[str] = None
    batch_size: Optional[int] = None
    epochs: Optional[int] = None
    learning_rate: Optional[float] = None
    max_source_length: Optional[int] = None
    max_target_length: Optional[int] = None
    max_decode_length: Optional[int] = None
    seq_length: Optional[int] = None
    save_checkpoint_steps: Optional[int] = None
    keep_checkpoint_max: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None


def add_recipe_arguments(parser, default_config: str) -> None:
    """The flags every launcher shares (help on each)."""
    parser.add_argument("--config", default=str(CONFIGS / default_config),
                        help=f"recipe YAML (MindFormers format); default ascend/configs/{default_config}")
    parser.add_argument("--model_dir", help="THUDM ChatGLM2/3 folder (Hugging Face layout): model sizes from its "
                        "config.json, tokenizer from its tokenizer.model, weights converted unless --load_checkpoint")
    parser.add_argument("--load_checkpoint", help="MindSpore .ckpt to start from (ascend/convert_weights.py "
                        "--to ms writes one; a fine-tune writes output_dir/checkpoint/rank_0/*.ckpt)")
    parser.add_argument("--output_dir", help="folder for checkpoints, logs, predictions (recipe: output_dir)")
    parser.add_argument("--device_target", choices=["Ascend", "CPU", "GPU"],
                        help="device (recipe: context.device_target); CPU applies adapt_to_cpu's changes")
    parser.add_argument("--batch_size", type=int, help="per-step batch size (recipe: runner_config.batch_size)")
    parser.add_argument("--max_source_length", type=int, help="prompt token budget of the dataset")
    parser.add_argument("--max_target_length", type=int,
                        help="answer token budget; for training seq_length becomes source + target + 1")


def add_seq_length_argument(parser) -> None:
    """For inference: a 32K model's full length needs an NPU's memory (a [32768, 32768] attention mask alone is
    4 GB in fp32); a shorter static length serves shorter prompts with the same weights."""
    parser.add_argument("--seq_length", type=int, help="the model's static length for this run (prompt + answer); "
                        "default: the recipe's (32768 for GLM3-32K)")


def overrides_from_args(args) -> RecipeOverrides:
    names = {f.name for f in fields(RecipeOverrides)}
    return RecipeOverrides(**{k: v for k, v in vars(args).items() if k in names})


def load_recipe(path, overrides: RecipeOverrides = RecipeOverrides(), task: str = None):
    """The recipe at `path` as a MindFormerConfig, with `overrides` applied, adapted to a CPU if that is the
    device, and checked for `task` (finetune / eval / predict / export / forward; default: the recipe's run_mode).
    Checks that hold for every task always run."""
    from mindformers import MindFormerConfig

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe not found (the recipes are in {CONFIGS})")
    config = MindFormerConfig(str(path))
    apply_overrides(config, overrides)
    if str(config.context.device_target).upper() == "CPU":
        for change in adapt_to_cpu(config):
            logger.warning("CPU run: %s", change)
    check_recipe(config, task or RUN_MODE_TASKS.get(config.get("run_mode")))
    if overrides.model_dir and not (overrides.load_checkpoint or overrides.resume_from_checkpoint):
        # converted last: a 6B conversion takes minutes, a refused recipe should not wait for it
        convert_once(Path(overrides.model_dir), Path(config.load_checkpoint))
    return config


def dataset_sections(config, split: str) -> List[dict]:
    """Both copies of a dataset section: MindFormers copies `train_dataset` into `train_dataset_task` when it
    parses the YAML anchor, so an override must reach both."""
    sections = []
    if config.get(f"{split}_dataset"):
        sections.append(config[f"{split}_dataset"])
    task = config.get(f"{split}_dataset_task")
    if task and task.get("dataset_config"):
        sections.append(task["dataset_config"])
    return sections


def tokenizer_sections(config) -> List[dict]:
    found = [config.processor.tokenizer] if config.get("processor") and config.processor.get("tokenizer") else []
    for split in ("train", "eval"):
        found += [ds["tokenizer"] for ds in dataset_sections(config, split) if ds.get("tokenizer")]
    return found


def apply_model_dir(config, model_dir, output_dir: Path, load_checkpoint: Optional[str]) -> None:
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise RecipeError(f"--model_dir {model_dir}: no config.json (expected a THUDM ChatGLM2/3 folder)")
    hf = json.loads(config_file.read_text(encoding="utf-8"))
    if "padded_vocab_size" not in hf:
        raise RecipeError(f"--model_dir {model_dir}: not a ChatGLM2/3 checkpoint (MindFormers' GLM2 runs ChatGLM2, "
                          "ChatGLM3 and ChatGLM3-32K; ChatGLM-6B has no MindFormers 1.9 model)")
    model_config = config.model.model_config
    for key in MODEL_SIZE_KEYS:
        if key in hf:
            model_config[key] = hf[key]
    model_config["rope_ratio"] = hf.get("rope_ratio", 1)
    model_config["checkpoint_name_or_path"] = ""
    vocab = model_dir / "tokenizer.model"
    if not vocab.is_file():
        raise RecipeError(f"--model_dir {model_dir}: no tokenizer.model")
    from glm_tune.glm_family import NotAChatGLMCheckpoint, detect_generation

    try:
        generation = detect_generation(model_dir)
    except NotAChatGLMCheckpoint as err:
        raise RecipeError(f"--model_dir: {err}") from None
    for tokenizer in tokenizer_sections(config):
        tokenizer["vocab_file"] = str(vocab)
        if tokenizer["type"] != TOKENIZER_BY_GENERATION[generation]:
            raise RecipeError(f"{model_dir} is a {generation} model but the recipe's tokenizer is "
                              f"{tokenizer['type']}: use a recipe for {generation} (ascend/configs)")
    if load_checkpoint is None:  # load_recipe converts the folder there once the recipe has passed its checks
        config["load_checkpoint"] = str(output_dir / "converted" / f"{model_dir.resolve().name}.ckpt")


def convert_once(model_dir: Path, target: Path) -> None:
    """The MindSpore checkpoint of an HF folder, converted once (kept next to the run's output)."""
    import convert_weights

    if not target.is_file():
        convert_weights.hf_to_ms(model_dir, target)


def apply_overrides(config, o: RecipeOverrides) -> None:
    if o.device_target:
        config.context["device_target"] = o.device_target
    if o.output_dir:
        config["output_dir"] = str(Path(o.output_dir).resolve())
    output_dir = Path(config.get("output_dir") or "./output").resolve()
    if o.load_checkpoint:
        if not Path(o.load_checkpoint).exists():
            raise RecipeError(f"--load_checkpoint {o.load_checkpoint}: not found")
        config["load_checkpoint"] = str(Path(o.load_checkpoint).resolve())
    if o.model_dir:
        apply_model_dir(config, o.model_dir, output_dir, o.load_checkpoint or o.resume_from_checkpoint)
    if o.resume_from_checkpoint:
        apply_resume(config, Path(o.resume_from_checkpoint))
    for split, data in (("train", o.train_data), ("eval", o.eval_data)):
        for section in dataset_sections(config, split):
            if data:
                section["data_loader"]["dataset_dir"] = str(Path(data).resolve())
            if o.batch_size:
                section["batch_size"] = o.batch_size
            if o.max_source_length:
                section["max_source_length"] = o.max_source_length
            if o.max_target_length:
                section["max_target_length"] = o.max_target_length
        for section in dataset_sections(config, split):
            # MindSpore's data pipeline refuses more workers than the host has cores
            section["num_parallel_workers"] = min(section.get("num_parallel_workers", 1), os.cpu_count() or 1)
    train = dataset_sections(config, "train")
    if train and (o.max_source_length or o.max_target_length):
        config.model.model_config["seq_length"] = train[0]["max_source_length"] + train[0]["max_target_length"] + 1
    if o.batch_size and config.get("runner_config"):
        config.runner_config["batch_size"] = o.batch_size
    if o.epochs and config.get("runner_config"):
        config.runner_config["epochs"] = o.epochs
    if o.learning_rate and config.get("lr_schedule"):
        config.lr_schedule["learning_rate"] = o.learning_rate
    if o.seq_length:
        config.model.model_config["seq_length"] = o.seq_length
        # generation stops at max_decode_length, which cannot pass the model's length
        config.model.model_config["max_decode_length"] = min(config.model.model_config["max_decode_length"],
                                                             o.seq_length)
    if o.max_decode_length:
        config.model.model_config["max_decode_length"] = o.max_decode_length
    for callback in config.get("callbacks") or []:
        if callback["type"] == "CheckpointMonitor":
            if o.save_checkpoint_steps:
                callback["save_checkpoint_steps"] = o.save_checkpoint_steps
            if o.keep_checkpoint_max:
                callback["keep_checkpoint_max"] = o.keep_checkpoint_max


def apply_resume(config, checkpoint: Path) -> None:
    """MindFormers resumes from a run's checkpoint folder (`load_checkpoint` = .../checkpoint, one rank_N
    subfolder per rank) and the file name to continue from (`resume_training`); weights, optimizer state, loss
    scale and the step counter come back, and the data already seen is skipped."""
    rank_folder = checkpoint.resolve().parent
    if not checkpoint.is_file() or not checkpoint.suffix == ".ckpt" or not rank_folder.name.startswith("rank_"):
        raise RecipeError(f"--resume_from_checkpoint {checkpoint}: expected a .ckpt a fine-tune wrote, "
                          "output_dir/checkpoint/rank_0/<prefix>_rank_0-<epoch>_<step>.ckpt")
    config["load_checkpoint"] = str(rank_folder.parent)
    config["resume_training"] = checkpoint.name


def adapt_to_cpu(config) -> List[str]:
    """Change what only an NPU (or several devices) can run; returns one line per change, for the log."""
    changes = []

    def set_value(section, key, value, why):
        if section.get(key) != value:
            changes.append(f"{key}: {section.get(key)} -> {value} ({why})")
            section[key] = value

    context, model_config = config.context, config.model.model_config
    set_value(context, "mode", 1, "ms_cpu_compat.py is exercised in PyNative")
    if "max_device_memory" in context:
        changes.append("max_device_memory dropped (NPU memory pool)")
        del context["max_device_memory"]
    for key in ("param_init_type", "compute_dtype", "rotary_dtype", "layernorm_compute_type"):
        set_value(model_config, key, "float32", "fp16/bf16 matmuls are NPU kernels")
    set_value(model_config, "use_flash_attention", False, "FlashAttention is an Ascend kernel")
    set_value(model_config, "use_past", False, "the KV cache is the Ascend paged-attention cache")
    set_value(config, "use_parallel", False, "one CPU process; multi-card runs need NPUs and HCCL")
    if config.get("parallel"):
        set_value(config.parallel, "parallel_mode", 0, "one CPU process")
    for key in ("data_parallel", "model_parallel", "pipeline_stage", "micro_batch_num"):
        if config.get("parallel_config") and key in config.parallel_config:
            set_value(config.parallel_config, key, 1, "one CPU process")
    if config.get("runner_config"):
        set_value(config.runner_config, "sink_mode", False, "data sinking needs a device queue")
    if config.get("recompute_config"):
        # measured on MindSpore 2.9 CPU (PyNative): with recompute on and the base weights frozen (LoRA), the LoRA
        # parameters inside recomputed layers get zero gradients, silently: lora_b stayed 0 and the loss flat.
        # (A full fine-tune's gradients were unaffected.) Recompute only trades memory, so the CPU does without.
        for key in ("recompute", "select_recompute"):
            if config.recompute_config.get(key):
                set_value(config.recompute_config, key, False, "recompute zeroes LoRA gradients on the CPU")
    return changes


def iter_types(node, path: str = "") -> Iterator[Tuple[str, str]]:
    """(section path, class name) of every `type:` in a recipe; list items share their list's path."""
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            yield path, node["type"]
        for key, value in node.items():
            yield from iter_types(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for item in node:
            yield from iter_types(item, path)


def unregistered_types(config) -> List[str]:
    """`section: Type` for each `type:` MindFormers' registry does not know in that section (or whose section
    this suite does not know how to look up)."""
    from mindformers.tools.register import MindFormerRegister

    problems = []
    for path, name in iter_types(dict(config)):
        module_type = TYPE_SECTIONS.get(path)
        if module_type is None or not MindFormerRegister.is_exist(module_type, name):
            problems.append(f"{path}: {name}")
    return problems


def check_recipe(config, task: Optional[str]) -> None:
    problems = [f"unregistered type {p} (not in MindFormers 1.9's registry)" for p in unregistered_types(config)]
    model_config = config.model.model_config
    seq_length = model_config["seq_length"]
    if model_config["num_attention_heads"] * model_config["kv_channels"] != model_config["hidden_size"]:
        problems.append("num_attention_heads * kv_channels must equal hidden_size")
    if task in (None, "finetune"):
        for section in dataset_sections(config, "train"):
            need = section["max_source_length"] + section["max_target_length"] + 1
            if need != seq_length:
                problems.append(f"train dataset pads to max_source_length + max_target_length + 1 = {need} tokens "
                                f"but model seq_length is {seq_length}: make them equal")
    if task in (None, "eval"):
        for section in dataset_sections(config, "eval"):
            if section["max_source_length"] > seq_length:
                problems.append(f"eval max_source_length {section['max_source_length']} exceeds seq_length "
                                f"{seq_length}")
    if task in (None, "eval", "predict") and model_config.get("max_decode_length", seq_length) > seq_length:
        problems.append(f"max_decode_length {model_config['max_decode_length']} exceeds seq_length {seq_length}")
    if model_config.get("use_flash_attention") and seq_length % 16:
        problems.append(f"use_flash_attention needs seq_length divisible by 16, got {seq_length}")
    if config.get("use_parallel") and config.get("parallel_config"):
        pc = config.parallel_config
        if pc.get("pipeline_stage", 1) > 1 and pc.get("micro_batch_num", 1) < pc["pipeline_stage"]:
            problems.append(f"micro_batch_num {pc['micro_batch_num']} < pipeline_stage {pc['pipeline_stage']}")
        if pc.get("pipeline_stage", 1) > model_config["num_layers"]:
            problems.append(f"pipeline_stage {pc['pipeline_stage']} exceeds num_layers {model_config['num_layers']}")
        world = os.environ.get("MS_WORKER_NUM") or os.environ.get("RANK_SIZE")
        cards = devices_needed(config)
        if world and int(world) != cards:
            problems.append(f"data_parallel x model_parallel x pipeline_stage = {cards} but {world} processes "
                            "were launched")
    if problems:
        raise RecipeError("recipe cannot run:\n  " + "\n  ".join(problems))


def devices_needed(config) -> int:
    pc = config.get("parallel_config") or {}
    return pc.get("data_parallel", 1) * pc.get("model_parallel", 1) * pc.get("pipeline_stage", 1)


def describe(config) -> Dict[str, object]:
    """The numbers of a recipe a user checks before launching (printed by the launchers)."""
    model_config = config.model.model_config
    return {"seq_length": model_config["seq_length"], "layers": model_config["num_layers"],
            "hidden_size": model_config["hidden_size"], "device": config.context.device_target,
            "devices": devices_needed(config) if config.get("use_parallel") else 1,
            "load_checkpoint": config.get("load_checkpoint")}
