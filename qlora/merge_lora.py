"""Merge a trained LoRA adapter into its full-precision base and save a standalone model folder.

    python qlora/merge_lora.py --lora_model output/checkpoint-final --output_dir models/chatglm3-merged
    python qlora/merge_lora.py --lora_model ADAPTER --base_model BASE_DIR --output_dir OUT
"""
import argparse
import json
import shutil
from pathlib import Path

import common
from glm_tune.errors import run_cli
from glm_tune.safe_output import atomic_folder, check_output_dir


def merge(lora_model, output_dir, base_model=None, overwrite: bool = False) -> Path:
    from peft import PeftModel

    lora_model, output_dir = Path(lora_model), Path(output_dir)
    inputs = {"--lora_model": lora_model, "--base_model": base_model}
    check_output_dir(output_dir, "merge_lora", inputs=inputs, overwrite=overwrite)  # before the model loads
    base_model = base_model or json.loads((lora_model / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = common.load_model(base_model, bits=16)  # merging into quantized weights would lose the update
    merged = PeftModel.from_pretrained(base, str(lora_model)).merge_and_unload()
    with atomic_folder(output_dir, "merge_lora", overwrite, inputs) as staging:
        merged.save_pretrained(staging)
        common.load_tokenizer(base_model).save_pretrained(staging)
        if (Path(base_model) / "tokenizer_config.json").is_file():  # keeps the generation marker for the loaders
            shutil.copy2(Path(base_model) / "tokenizer_config.json", staging / "tokenizer_config.json")
    return output_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora_model", required=True, help="adapter folder (finetune.py's checkpoint-final)")
    parser.add_argument("--output_dir", required=True,
                        help="folder for the merged model (made on success; an existing one only if an earlier merge "
                             "wrote it, or with --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir no merge wrote")
    parser.add_argument("--base_model", default=None, help="base model folder (default: the adapter's record)")
    args = parser.parse_args(argv)
    out = merge(args.lora_model, args.output_dir, args.base_model, args.overwrite)
    print(f"merged model saved to {out}")
    return out


if __name__ == "__main__":
    run_cli(main)
