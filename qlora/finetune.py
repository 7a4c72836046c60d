"""QLoRA fine-tuning of ChatGLM2/3 (PyTorch, bitsandbytes, PEFT) on instruction data with history.

    python qlora/finetune.py --base_model MODEL_DIR --data_path data.json --output_dir output/ --bits 4
    torchrun --nproc_per_node 2 qlora/finetune.py ...        # or: accelerate launch qlora/finetune.py ...

Data: a JSON list (or JSON lines) of {"instruction", "input", "output", "history": [[q, a], ...]} (AdvertiseGen
content/summary also works), formatted exactly as the main suite formats ChatGLM2/3 prompts (data.py). Saves
OUTPUT_DIR/checkpoint-final (adapter + tokenizer); logs a loss dict every --logging_steps with a progress bar.
"""
import sys
from dataclasses import dataclass, field
from pathlib import Path

import common
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from data import IGNORE_INDEX, DataFormatError, get_prompt_format, read_examples

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]  # GLM layout
THUDM_LORA_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]  # THUDM's own modeling code


@dataclass
class FinetuneArguments:
    base_model: str = field(metadata={"help": "Model folder: transformers GLM layout or a THUDM ChatGLM2/3 folder."})
    data_path: str = field(metadata={"help": "Instruction data: JSON list or JSON lines (instruction/input/output/"
                                             "history)."})
    bits: int = field(default=4, metadata={"help": "4 (NF4 QLoRA), 8 (LLM.int8) or 16 (no quantization)."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    src_length: int = field(default=512, metadata={"help": "Max prompt tokens (oldest dropped first)."})
    tgt_length: int = field(default=512, metadata={"help": "Max answer tokens, end token included."})
    local_files_only: bool = field(default=True, metadata={"help": "Never reach for a model hub."})


def build_features(path, tokenizer, generation, src_length, tgt_length):
    """input_ids = prompt + answer; labels are -100 on the prompt (transformers shifts labels itself).
    ChatGLM3 `conversations` records keep their roles, tools and per-message loss (the main suite's layout);
    other generations read them as their last question and answer with the earlier rounds as history."""
    fmt = get_prompt_format(generation, tokenizer)
    features = []
    for example in read_examples(path):
        if example.conversation is not None and generation == "chatglm3":
            feature = fmt.conversation_features(example.conversation, src_length, tgt_length, shift=False)
            features += [feature] if feature is not None else []
            continue
        if example.conversation is not None:
            example = fmt.conversation_example(example.conversation)
        prompt = fmt.prompt_ids(example.src, example.history, src_length)
        target = fmt.target_ids(example.tgt, tgt_length)
        features.append({"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target})
    return features


def collate(features, pad_id):
    """Right padding: training positions then start at 0 on every row, as the model computes them."""
    length = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": [], "labels": [], "attention_mask": []}
    for f in features:
        pad = length - len(f["input_ids"])
        batch["input_ids"].append(f["input_ids"] + [pad_id] * pad)
        batch["labels"].append(f["labels"] + [IGNORE_INDEX] * pad)
        batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
    return {k: torch.tensor(v) for k, v in batch.items()}


def wrap_lora(model, args, bits):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if bits in (4, 8):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in LORA_TARGETS + THUDM_LORA_TARGETS if t in names]
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def main(argv=None):
    parser = HfArgumentParser((FinetuneArguments, TrainingArguments))
    args, training_args = parser.parse_args_into_dataclasses(sys.argv[1:] if argv is None else argv)
    set_seed(training_args.seed)
    generation = common.model_generation(args.base_model)
    tokenizer = common.load_tokenizer(args.base_model)
    try:
        features = build_features(args.data_path, tokenizer, generation, args.src_length, args.tgt_length)
    except DataFormatError as err:
        raise SystemExit(f"error: {err}")
    model = wrap_lora(common.load_model(args.base_model, args.bits, local_files_only=args.local_files_only), args,
                      args.bits)
    model.print_trainable_parameters()
    training_args.remove_unused_columns = False
    trainer = Trainer(model=model, args=training_args, train_dataset=features,
                      data_collator=lambda f: collate(f, tokenizer.pad_token_id))
    trainer.train()
    final = Path(training_args.output_dir) / "checkpoint-final"
    if trainer.is_world_process_zero():
        model.save_pretrained(final)
        tokenizer.save_pretrained(final)
        print(f"saved adapter and tokenizer to {final}", flush=True)
    return trainer


if __name__ == "__main__":
    main()
