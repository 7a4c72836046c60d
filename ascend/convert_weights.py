"""ChatGLM2/3 weights between THUDM's Hugging Face layout and a MindSpore checkpoint for MindFormers' ChatGLM2.

    python ascend/convert_weights.py --to ms --input_dir ./chatglm2-6b --output_file ./glm2_6b.ckpt [--dtype float16]
    python ascend/convert_weights.py --to hf --input_file ./glm2_6b.ckpt --config_dir ./chatglm2-6b --output_dir ./out
    # Paddle <-> MindSpore goes through the Hugging Face layout (two stacks, two environments):
    .venv/bin/python tools/convert_checkpoint.py --input_dir PADDLE_DIR --output_dir HF_DIR --to hf
    ascend/.venv/bin/python ascend/convert_weights.py --to ms --input_dir HF_DIR --output_file model.ckpt

MindFormers (qkv_concat / mlp_concat, its defaults) keeps THUDM's fused tensors and torch's [out, in] layout, so
the mapping is a rename: `transformer.embedding.word_embeddings.weight` <-> `transformer.embedding.embedding_weight`.
THUDM's `rotary_pos_emb.inv_freq` has no MindFormers parameter (it recomputes it); it is kept in the checkpoint
under its own name, which MindFormers' loader reports as unused, so the way back is exact. Reading is tensor by tensor
(numpy safetensors reader of the main suite); the output is written to a temporary file and renamed.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from glm_tune.conversion.checkpoint_convert import ConversionError, HFWeights  # framework-free readers
from glm_tune.safe_output import OutputRefused, check_output_dir

HF_EMBEDDING = "transformer.embedding.word_embeddings.weight"
MS_EMBEDDING = "transformer.embedding.embedding_weight"


def hf_to_ms_name(name: str) -> str:
    return MS_EMBEDDING if name == HF_EMBEDDING else name


def ms_to_hf_name(name: str) -> str:
    return HF_EMBEDDING if name == MS_EMBEDDING else name


def _ms_dtype(dtype: str):
    import mindspore as ms

    return {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}[dtype]


def hf_to_ms(input_dir, output_file, dtype: str = "float32") -> Path:
    """Write the ChatGLM2/3 tensors of an HF folder as a MindSpore checkpoint."""
    import mindspore as ms

    config = json.loads((Path(input_dir) / "config.json").read_text(encoding="utf-8"))
    if "padded_vocab_size" not in config:
        raise ConversionError(f"{input_dir} is not a ChatGLM2/3 checkpoint (MindFormers' GLM2 serves those)")
    weights = HFWeights(input_dir)
    params = []
    for name in weights.names():
        array = weights.get(name).astype(np.float32)
        params.append({"name": hf_to_ms_name(name), "data": ms.Tensor(array, dtype=_ms_dtype(dtype))})
    output_file = Path(output_file)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_file.with_name(output_file.name + ".tmp.ckpt")
    ms.save_checkpoint(params, str(tmp))
    os.replace(tmp, output_file)
    return output_file


HF_INV_FREQ = "transformer.rotary_pos_emb.inv_freq"


def rotary_inv_freq(config_dir: Path) -> np.ndarray:
    """THUDM's rotary buffer, which a MindFormers checkpoint written by training lacks (MindFormers recomputes it):
    taken from the original folder's weights when they are there, else THUDM's formula (base 10000; rope_ratio
    is applied at run time, not stored)."""
    try:
        weights = HFWeights(config_dir)
        if HF_INV_FREQ in weights.names():
            return weights.get(HF_INV_FREQ)
    except ConversionError:
        pass
    config = json.loads((config_dir / "config.json").read_text(encoding="utf-8"))
    dim = config["kv_channels"] // 2
    return (1.0 / (10000 ** (np.arange(0, dim, 2, dtype=np.float32) / dim))).astype(np.float32)


LORA_A, LORA_B = ".mindpet_delta_lora_a", ".mindpet_delta_lora_b"


def find_adapter_config(checkpoint: Path):
    """MindFormers writes adapter_config.json (lora_alpha, r) in the run's output folder, two levels above
    checkpoint/rank_N/*.ckpt."""
    for folder in list(checkpoint.resolve().parents)[:3]:
        if (folder / "adapter_config.json").is_file():
            return folder / "adapter_config.json"
    return None


def fold_lora(tensors: dict, scaling: float) -> int:
    """W + scaling * B @ A for every LoRA pair (MindPet's delta: lora_b [out, r] @ lora_a [r, in]); the pairs are
    removed. Returns how many weights were folded."""
    folded = 0
    for name in [n for n in tensors if n.endswith(LORA_A)]:
        base = name[: -len(LORA_A)] + ".weight"
        a, b = tensors.pop(name), tensors.pop(name[: -len(LORA_A)] + LORA_B)
        weight = tensors[base]
        tensors[base] = (weight.astype(np.float32) + scaling * (b.astype(np.float32) @ a.astype(np.float32))
                         ).astype(weight.dtype)
        folded += 1
    return folded


def ms_to_hf(input_file, config_dir, output_dir, dtype: str = None, adapter_config=None,
             overwrite: bool = False) -> Path:
    """Write a MindSpore ChatGLM2 checkpoint (a fine-tune's output included: optimizer state and training counters
    are dropped, LoRA deltas folded into their weights) in THUDM's HF layout, config/tokenizer from `config_dir`."""
    import shutil

    import mindspore as ms

    from glm_tune.conversion.hf_layout import write_safetensors_shards
    from glm_tune.safe_output import atomic_folder

    input_file, config_dir, output_dir = Path(input_file), Path(config_dir), Path(output_dir)
    inputs = {"--input_file": input_file, "--config_dir": config_dir}
    check_output_dir(output_dir, "convert_weights", inputs=inputs, overwrite=overwrite)  # before any tensor is read
    tensors = {}
    for name, param in ms.load_checkpoint(str(input_file)).items():
        if not name.startswith("transformer.") or "paged_attention_mgr" in name:
            continue  # optimizer moments (adam_m.*), loss scale, step counters, runtime caches
        array = param.asnumpy()
        tensors[ms_to_hf_name(name)] = array if dtype is None else array.astype(dtype)
    tensors.setdefault(HF_INV_FREQ, rotary_inv_freq(config_dir))
    if any(name.endswith(LORA_A) for name in tensors):
        adapter_config = Path(adapter_config) if adapter_config else find_adapter_config(input_file)
        if adapter_config is None:
            raise ConversionError(f"{input_file} holds LoRA weights but no adapter_config.json was found near it: "
                                  "pass --adapter_config (MindFormers writes it in the run's output_dir)")
        lora = json.loads(adapter_config.read_text(encoding="utf-8"))
        fold_lora(tensors, lora["lora_alpha"] / lora["r"])
    with atomic_folder(output_dir, "convert_weights", overwrite, inputs) as staging:
        write_safetensors_shards(tensors, staging)
        for name in ("config.json", "tokenizer_config.json", "tokenizer.model"):
            if (config_dir / name).is_file():
                shutil.copy2(config_dir / name, staging / name)
    return output_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", required=True, choices=["ms", "hf"], help="ms: HF -> MindSpore; hf: MindSpore -> HF")
    parser.add_argument("--input_dir", help="--to ms: the HF ChatGLM2/3 folder")
    parser.add_argument("--output_file", help="--to ms: the .ckpt to write")
    parser.add_argument("--input_file", help="--to hf: the .ckpt to read")
    parser.add_argument("--config_dir", help="--to hf: folder whose config.json / tokenizer to copy")
    parser.add_argument("--output_dir", help="--to hf: folder to write (an existing one only if this command wrote "
                                             "it, or with --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="--to hf: replace an --output_dir it did not write")
    parser.add_argument("--adapter_config", help="--to hf: LoRA adapter_config.json (found next to the run if omitted)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="--to ms: parameter dtype in the checkpoint")
    args = parser.parse_args(argv)
    try:
        if args.to == "ms":
            out = hf_to_ms(args.input_dir, args.output_file, args.dtype)
        else:
            out = ms_to_hf(args.input_file, args.config_dir, args.output_dir, adapter_config=args.adapter_config,
                           overwrite=args.overwrite)
    except (ConversionError, OutputRefused) as err:
        sys.exit(f"error: {err}")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
