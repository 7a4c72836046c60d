"""Loading a ChatGLM checkpoint for any script: checks first, then config, model, tokenizer and PEFT wrappers.

Every check here runs before weights are read, so a wrong flag costs seconds, not a model load.
"""
import logging
from pathlib import Path

from glm_family import GENERATIONS, NotAChatGLMCheckpoint, detect_generation, get_generation

logger = logging.getLogger(__name__)

# PaddleNLP community names -> generation, for users who load by name instead of a folder.
_NAME_HINTS = (("chatglm3", "chatglm3"), ("chatglm2", "chatglm2"), ("chatglm-6b", "chatglm"))


class ConfigurationError(ValueError):
    """Flags that cannot work with this model; the message says which flag to change and to what."""


def converted_cache_dir(hf_dir: Path) -> Path:
    """Where an on-the-fly conversion of `hf_dir` lives: keyed by its path, file sizes and times, so a changed
    input converts again. GLM_TUNE_CACHE overrides the root (default ~/.cache/glm-tune/converted)."""
    import hashlib
    import os

    root = Path(os.environ.get("GLM_TUNE_CACHE", Path.home() / ".cache" / "glm-tune")) / "converted"
    digest = hashlib.sha256(str(hf_dir.resolve()).encode())
    for f in sorted(hf_dir.iterdir()):
        if f.is_file():
            stat = f.stat()
            digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return root / f"{hf_dir.name}-{digest.hexdigest()[:12]}"


def resolve_checkpoint(model_name_or_path: str, model_type: str = None) -> str:
    """The folder to load: itself, or for a Hugging Face layout folder its Paddle conversion (made once, cached)."""
    from checkpoint_convert import convert_hf_to_paddle, is_hf_checkpoint

    if not model_name_or_path or not is_hf_checkpoint(model_name_or_path):
        return model_name_or_path
    target = converted_cache_dir(Path(model_name_or_path))
    if not (target / "config.json").is_file():
        logger.info("%s is a Hugging Face checkpoint: converting it to Paddle in %s", model_name_or_path, target)
        convert_hf_to_paddle(model_name_or_path, target, model_type, replace=False)
    else:
        logger.info("%s is a Hugging Face checkpoint: using its Paddle conversion in %s", model_name_or_path, target)
    return str(target)


def resolve_generation(model_name_or_path: str, model_type: str = None) -> str:
    """The generation to use: --model_type if given, else read from the folder, else from a PaddleNLP name."""
    if model_type:
        return get_generation(model_type).name
    if not model_name_or_path:
        raise ConfigurationError("--model_name_or_path is required (a ChatGLM checkpoint folder)")
    path = Path(model_name_or_path)
    if path.exists():
        return detect_generation(path)
    lowered = model_name_or_path.lower()
    for hint, name in _NAME_HINTS:
        if hint in lowered:
            return name
    raise NotAChatGLMCheckpoint(
        f"{model_name_or_path} is neither a folder nor a known ChatGLM name; pass a checkpoint folder or one of "
        "THUDM/chatglm-6b, THUDM/chatglm2-6b, THUDM/chatglm3-6b"
    )


def load_config(model_name_or_path: str, generation: str, **overrides):
    config_class, _, _ = get_generation(generation).classes()
    config = config_class.from_pretrained(model_name_or_path)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def check_lengths(config, src_length: int, tgt_length: int) -> None:
    limit = config.max_sequence_length
    if src_length + tgt_length > limit:
        raise ConfigurationError(
            f"--src_length {src_length} + --tgt_length {tgt_length} = {src_length + tgt_length} exceeds this "
            f"model's sequence length {limit}; lower them so the sum is at most {limit}"
        )


def check_tensor_parallel(config, generation: str, degree: int) -> None:
    """Refuse a degree the architecture cannot be split by, naming the dimension that does not divide."""
    if degree <= 1:
        return
    dims = {"num_attention_heads": config.num_attention_heads, "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size}
    if generation == "chatglm":
        dims["inner_hidden_size"] = config.inner_hidden_size
    else:
        dims["ffn_hidden_size"] = config.ffn_hidden_size
        # ChatGLM2/3 share key/value heads in 2 groups; PaddleNLP splits groups, not heads, across ranks.
        dims["multi_query_group_num"] = config.multi_query_group_num
    bad = {k: v for k, v in dims.items() if v % degree}
    if bad:
        detail = ", ".join(f"{k}={v}" for k, v in bad.items())
        hint = ""
        if "multi_query_group_num" in bad:
            hint = (f"; {generation} has {config.multi_query_group_num} key/value groups, so use "
                    "--tensor_parallel_degree 1 or 2 (replicating KV heads per rank is not supported)")
        raise ConfigurationError(f"--tensor_parallel_degree {degree} does not divide {detail}{hint}")


def load_model(model_name_or_path: str, generation: str, dtype: str = "float32", tensor_parallel_degree: int = 1,
               tensor_parallel_rank: int = 0, **config_overrides):
    """The PaddleNLP model class of `generation`, loaded (and split for tensor parallel) from the checkpoint."""
    _, model_class, _ = get_generation(generation).classes()
    shards = sorted(Path(model_name_or_path).glob("model_state.tp*.pdparams")) if Path(model_name_or_path).is_dir() else []
    if shards and len(shards) != tensor_parallel_degree:
        raise ConfigurationError(
            f"{model_name_or_path} is split into {len(shards)} tensor-parallel shards but this run uses degree "
            f"{tensor_parallel_degree}: launch with python -m paddle.distributed.launch --nproc_per_node "
            f"{len(shards)} (and --tensor_parallel_degree {len(shards)} for training), or merge the shards first: "
            f"python tools/merge_tp_shards.py {model_name_or_path} MERGED_DIR")
    config = load_config(model_name_or_path, generation, tensor_parallel_degree=tensor_parallel_degree,
                         tensor_parallel_rank=tensor_parallel_rank, tensor_parallel_output=False,
                         **config_overrides)
    model = model_class.from_pretrained(model_name_or_path, config=config, dtype=dtype)
    apply_rope_ratio(model)
    return model


def apply_rope_ratio(model) -> None:
    """ChatGLM3-6B-32K stretches its rotary base (config rope_ratio 50: base 10000 * 50); PaddleNLP's
    ChatGLMv2 always uses 10000, so a 32K checkpoint would run with the wrong positions. Swap in the
    scaled rotary embedding when the config asks for it."""
    ratio = getattr(model.config, "rope_ratio", None)
    if not ratio or ratio == 1 or not hasattr(model, "chatglm_v2"):
        return
    from scaled_rotary import ScaledRotaryEmbedding

    base = model.chatglm_v2
    scaled = ScaledRotaryEmbedding(base.rotary_pos_emb.dim, 10000.0 * ratio)
    scaled.inv_freq.set_value(base.rotary_pos_emb.inv_freq)  # a saved buffer (unused by forward): keep it as loaded
    base.rotary_pos_emb = scaled


def load_tokenizer(model_name_or_path: str, generation: str):
    _, _, tokenizer_class = get_generation(generation).classes()
    return tokenizer_class.from_pretrained(model_name_or_path)


def init_lora_a(model, seed: int) -> None:
    """Draw every lora_A as a full matrix from a numpy RNG seeded by (seed, parameter name) and keep this rank's
    rows. PaddleNLP draws a shard-sized matrix per rank instead, so a tensor-parallel run would start from other
    adapters than the single-process run and the two could not be compared. Same bound as PaddleNLP's
    Kaiming-uniform(a=sqrt(5)) initialiser: 1/sqrt(fan_in)."""
    import zlib

    import numpy as np
    import paddle

    config = model.model.config if hasattr(model, "model") else model.config
    degree, rank = max(config.tensor_parallel_degree, 1), max(config.tensor_parallel_rank, 0)
    for name, param in model.named_parameters():
        if not name.endswith("lora_A"):
            continue
        split = getattr(param, "is_distributed", False) and degree > 1
        rows = param.shape[0] * (degree if split else 1)
        rng = np.random.RandomState((seed + zlib.crc32(name.encode())) % (2**32))
        full = rng.uniform(-1 / np.sqrt(rows), 1 / np.sqrt(rows), size=(rows, param.shape[1])).astype("float32")
        shard = full[rank * param.shape[0]:(rank + 1) * param.shape[0]] if split else full
        param.set_value(paddle.to_tensor(shard, dtype=param.dtype))


def apply_lora(model, generation: str, rank: int, alpha: int, lora_path: str = None, dtype: str = "float32",
               seed: int = 42):
    """Wrap `model` with LoRA adapters on the generation's linear layers (trainable) or load trained ones."""
    from paddlenlp.peft import LoRAConfig, LoRAModel

    if lora_path:
        return LoRAModel.from_pretrained(model=model, lora_path=lora_path)
    config = LoRAConfig(
        target_modules=list(GENERATIONS[generation].lora_target_modules),
        r=rank,
        lora_alpha=alpha,
        merge_weights=False,
        tensor_parallel_degree=model.config.tensor_parallel_degree,
        dtype=dtype,
    )
    model = LoRAModel(model, config)
    init_lora_a(model, seed)
    model.mark_only_lora_as_trainable()
    return model


def apply_prefix(model, generation: str, num_prefix_tokens: int, prefix_path: str = None, dtype: str = "float32"):
    """Wrap `model` with P-Tuning v2 prefixes (trainable key/value prefixes in every layer) or load trained ones."""
    from paddlenlp.peft import PrefixConfig, PrefixModelForCausalLM
    from paddlenlp.peft.prefix import chatglm_postprocess_past_key_value

    if prefix_path:
        return PrefixModelForCausalLM.from_pretrained(
            model=model, prefix_path=prefix_path, postprocess_past_key_value=chatglm_postprocess_past_key_value)
    config = model.config
    prefix_config = PrefixConfig(
        num_prefix_tokens=num_prefix_tokens,
        num_attention_heads=config.num_attention_heads,
        num_hidden_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        multi_query_group_num=getattr(config, "multi_query_group_num", None) if generation != "chatglm" else None,
        prefix_projection=False,
        dtype=dtype,
    )
    model = PrefixModelForCausalLM(model, prefix_config, postprocess_past_key_value=chatglm_postprocess_past_key_value)
    model.mark_only_prefix_as_trainable()
    return model
