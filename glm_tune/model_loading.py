"""Loading a ChatGLM checkpoint for any script: checks first, then config, model, tokenizer and PEFT wrappers.

Every check here runs before weights are read, so a wrong flag costs seconds, not a model load. The commands go
through two calls: `locate_checkpoint` (the folder resolved, a Hugging Face folder converted once, everything
checked; the arguments are left as they were) and `load_checkpoint` (model + adapter + tokenizer).
"""
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from glm_tune.errors import GlmTuneError, one_line
from glm_tune.glm_family import GENERATIONS, NotAChatGLMCheckpoint, detect_generation_verdict, get_generation

logger = logging.getLogger(__name__)

# PaddleNLP community names -> generation, for users who load by name instead of a folder.
_NAME_HINTS = (("chatglm3", "chatglm3"), ("chatglm2", "chatglm2"), ("chatglm-6b", "chatglm"))


class ConfigurationError(GlmTuneError):
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
    from glm_tune.conversion.checkpoint_convert import convert_hf_to_paddle, is_hf_checkpoint

    if not model_name_or_path or not is_hf_checkpoint(model_name_or_path):
        return model_name_or_path
    target = converted_cache_dir(Path(model_name_or_path))
    if not (target / "config.json").is_file():
        logger.info("%s is a Hugging Face checkpoint: converting it to Paddle in %s", model_name_or_path, target)
        convert_hf_to_paddle(model_name_or_path, target, model_type, replace=False, overwrite=True)
    else:
        logger.info("%s is a Hugging Face checkpoint: using its Paddle conversion in %s", model_name_or_path, target)
    return str(target)


def resolve_generation(model_name_or_path: str, model_type: str = None) -> str:
    """The generation of the folder (or of a PaddleNLP name). --model_type may only confirm it, or settle
    ChatGLM2 vs ChatGLM3 for a folder that carries no sign of either; a contradiction is refused (training a
    ChatGLM2 folder with ChatGLM3 prompts, or the reverse, gives a model that answers neither way)."""
    asked = get_generation(model_type).name if model_type else None
    if not model_name_or_path:
        raise ConfigurationError("--model_name_or_path is required (a ChatGLM checkpoint folder)")
    path = Path(model_name_or_path)
    if path.is_file():
        raise ConfigurationError(f"--model_name_or_path {path} is a file; pass the checkpoint folder that holds "
                                 "config.json, the weights and tokenizer.model")
    if path.exists():
        detected, certain = detect_generation_verdict(path)
        if asked is None or asked == detected:
            return detected
        if not certain and {asked, detected} == {"chatglm2", "chatglm3"}:
            logger.info("%s carries no ChatGLM2/ChatGLM3 marker: using %s as --model_type says", path, asked)
            return asked
        raise ConfigurationError(
            f"--model_type {model_type} does not match {path}, which holds a {detected} checkpoint; drop "
            f"--model_type (it is read from the folder) or pass --model_type {detected}")
    if asked:
        return asked
    lowered = model_name_or_path.lower()
    for hint, name in _NAME_HINTS:
        if hint in lowered:
            return name
    raise NotAChatGLMCheckpoint(
        f"{model_name_or_path} is neither a folder nor a known ChatGLM name; pass a checkpoint folder or one of "
        "THUDM/chatglm-6b, THUDM/chatglm2-6b, THUDM/chatglm3-6b"
    )


# Config keys without which PaddleNLP silently builds its default 6B shape (and the weights then fail to load).
_REQUIRED_CONFIG_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
_WEIGHT_FILES = ("model_state.pdparams", "model_state.pdparams.index.json", "model.safetensors",
                 "model.safetensors.index.json")


def check_model_folder(model_dir, generation: str) -> None:
    """A Paddle-layout checkpoint folder has a usable config, tokenizer and weights; checked before loading so a
    broken download is named in one line instead of a traceback from deep inside PaddleNLP."""
    import json

    folder = Path(model_dir)
    if not folder.is_dir():
        return  # a PaddleNLP community name: PaddleNLP resolves it
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigurationError(f"{folder / 'config.json'} cannot be read ({err}); restore it from the "
                                 "checkpoint's download") from None
    missing = [k for k in _REQUIRED_CONFIG_KEYS if k not in config and not (k == "num_hidden_layers" and "num_layers"
                                                                            in config)]
    if missing:
        raise ConfigurationError(f"{folder / 'config.json'} lacks {', '.join(missing)}: it does not describe the "
                                 "model; restore the checkpoint's own config.json")
    check_config_sizes(config, folder / "config.json")
    check_tokenizer_file(folder, generation)
    has_weights = any((folder / n).is_file() for n in _WEIGHT_FILES) or any(folder.glob("model_state.tp*.pdparams"))
    if not has_weights:
        raise ConfigurationError(f"{folder} has no weights (model_state.pdparams); pass a complete checkpoint "
                                 "folder, or convert a Hugging Face one with tools/convert_checkpoint.py")


# Sizes a config.json may hold (each generation names some differently); each must be a positive whole number.
_SIZE_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "num_layers", "vocab_size",
              "padded_vocab_size", "kv_channels", "multi_query_group_num", "ffn_hidden_size", "inner_hidden_size",
              "seq_length", "max_sequence_length")


def check_config_sizes(config: dict, where) -> None:
    """Sizes that build a model: positive, and dividing as attention needs. A negative or zero size made Paddle
    fail deep inside (or, with 0 layers, a model that loaded and failed inside generation)."""
    for key in _SIZE_KEYS:
        value = config.get(key)
        if key in config and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigurationError(f"{where}: {key} is {value!r}, not a positive whole number; restore the "
                                     "checkpoint's own config.json")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    if "kv_channels" not in config and hidden % heads:
        raise ConfigurationError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}; "
                                 "restore the checkpoint's own config.json")
    groups = config.get("multi_query_group_num")
    if config.get("multi_query_attention", True) and groups and heads % groups:  # PaddleNLP omits the key
        raise ConfigurationError(f"{where}: num_attention_heads {heads} is not a multiple of multi_query_group_num "
                                 f"{groups} (each key/value group serves the same number of heads); restore the "
                                 "checkpoint's own config.json")


def check_tokenizer_file(folder, generation: str) -> None:
    """The generation's SentencePiece file is present and loads."""
    import sentencepiece as spm

    vocab = Path(folder) / get_generation(generation).vocab_file
    if not vocab.is_file():
        raise ConfigurationError(f"{folder} has no {vocab.name} (the tokenizer); copy it from the checkpoint's "
                                 "download into the folder")
    try:
        spm.SentencePieceProcessor(model_file=str(vocab))
    except (RuntimeError, OSError) as err:
        raise ConfigurationError(f"{vocab} is not a SentencePiece model ({one_line(err)[:120]}); copy the "
                                 "checkpoint's own tokenizer file") from None


def check_adapter_flags(model_args) -> None:
    if getattr(model_args, "lora", False) and getattr(model_args, "prefix_tuning", False):
        raise ConfigurationError("choose one of --lora True and --prefix_tuning True, not both")
    if model_args.lora_path and model_args.prefix_path:
        raise ConfigurationError("--lora_path and --prefix_path cannot be combined (only one adapter is applied); "
                                 "pass one of them")


ADAPTER_FILES = {"lora_path": ("lora_config.json", "lora_model_state"),
                 "prefix_path": ("prefix_config.json", "prefix_model_state")}


def check_adapter_folders(model_args, generation: str) -> None:
    """--lora_path / --prefix_path is an adapter folder trained on this generation."""
    from glm_tune.safe_output import read_owner

    for flag, (config_name, weights_stem) in ADAPTER_FILES.items():
        path = getattr(model_args, flag, None)
        if not path:
            continue
        folder = Path(path)
        kind = flag.split("_")[0]
        if not folder.is_dir():
            raise ConfigurationError(f"--{flag} {path} is not a folder; pass the --output_dir of a {kind} "
                                     f"fine-tune (it holds {config_name})")
        if not (folder / config_name).is_file() or not list(folder.glob(f"{weights_stem}*")):
            raise ConfigurationError(f"--{flag} {path} is not a {kind} folder (no {config_name} and "
                                     f"{weights_stem}.pdparams); pass the --output_dir of a finetune_generation.py "
                                     f"run with --{kind if kind == 'lora' else 'prefix_tuning'} True")
        trained_on = ((read_owner(folder) or {}).get("run") or {}).get("generation")
        if trained_on and trained_on != generation:
            raise ConfigurationError(f"--{flag} {path} was trained on a {trained_on} model but "
                                     f"--model_name_or_path is a {generation} checkpoint; pass the base it was "
                                     "trained from")


@dataclass(frozen=True)
class Adapter:
    """What wraps the base model: LoRA or P-Tuning v2 prefixes, trained ones loaded from `path`, or new ones
    (training) of the given size."""
    kind: str                   # "lora" | "prefix"
    path: Optional[str] = None
    lora_rank: int = 8
    lora_alpha: int = 16
    num_prefix_tokens: int = 64

    @classmethod
    def trained(cls, model_args) -> Optional["Adapter"]:
        """The adapter --lora_path / --prefix_path names (predict, export), or None."""
        if model_args.lora_path:
            return cls("lora", model_args.lora_path)
        if model_args.prefix_path:
            return cls("prefix", model_args.prefix_path)
        return None


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint resolved and checked, ready for `load_checkpoint`."""
    folder: str                 # the Paddle folder to load (a Hugging Face folder's converted copy)
    generation: str
    adapter: Optional[Adapter] = None


def locate_checkpoint(model_args, adapter: Optional[Adapter] = None, generation: str = None) -> Checkpoint:
    """--model_name_or_path as the Paddle folder to load (a Hugging Face folder is converted once), with that
    folder and any --lora_path / --prefix_path checked before a weight is read. `adapter`: what to wrap the model
    with (default: the trained one the flags name)."""
    check_adapter_flags(model_args)
    generation = generation or resolve_generation(model_args.model_name_or_path, model_args.model_type)
    folder = resolve_checkpoint(model_args.model_name_or_path, generation)
    check_model_folder(folder, generation)
    check_adapter_folders(model_args, generation)
    return Checkpoint(folder, generation, adapter if adapter is not None else Adapter.trained(model_args))


def load_checkpoint(checkpoint: Checkpoint, dtype: str = "float32", tensor_parallel_degree: int = 1,
                    tensor_parallel_rank: int = 0, low_memory: bool = None, merge_lora: bool = False,
                    seed: int = 42, **config_overrides):
    """(model, tokenizer): the model in `dtype`, split for tensor parallel, wrapped with the checkpoint's adapter
    (`merge_lora`: a LoRA folded into the weights, leaving the plain model)."""
    model = load_model(checkpoint.folder, checkpoint.generation, dtype, tensor_parallel_degree, tensor_parallel_rank,
                       low_memory, **config_overrides)
    adapter = checkpoint.adapter
    if adapter is not None and adapter.kind == "lora":
        model = apply_lora(model, checkpoint.generation, adapter.lora_rank, adapter.lora_alpha, adapter.path, dtype,
                           seed=seed)
        if merge_lora:
            model.merge()
            model = model.model
    elif adapter is not None and adapter.kind == "prefix":
        model = apply_prefix(model, checkpoint.generation, adapter.num_prefix_tokens, adapter.path, dtype)
    return model, load_tokenizer(checkpoint.folder, checkpoint.generation)


def check_adapter_matches(adapter_model, path, weights_stem: str) -> None:
    """Every tensor of the adapter file has a place of the same shape in the wrapped model (PaddleNLP skips
    unmatched tensors without a word, so a LoRA of another model would leave the base model unchanged)."""
    import paddle

    files = sorted(Path(path).glob(f"{weights_stem}*.pdparams"))
    if not files:
        return
    saved = paddle.load(str(files[0]), return_numpy=True)
    own = {n: list(p.shape) for n, p in adapter_model.model.state_dict().items()}
    foreign = [n for n in saved if n not in own]
    if foreign or not saved:
        raise ConfigurationError(f"{path} does not fit this base model: {len(foreign)} of its {len(saved)} tensors "
                                 f"have no place in it (e.g. {foreign[:1]}); pass the base it was trained from")
    if ".tp" not in files[0].name:  # a tensor-parallel shard holds a slice; its names were checked above
        wrong = [n for n in saved if list(saved[n].shape) != own[n]]
        if wrong:
            raise ConfigurationError(f"{path} does not fit this base model: {wrong[0]} is {list(saved[wrong[0]].shape)}"
                                     f" in the adapter but {own[wrong[0]]} in the model; pass the base it was "
                                     "trained from")


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
    from glm_tune.tensor_parallel_layout import supported_degree

    dims = {"num_attention_heads": config.num_attention_heads, "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size}
    if generation == "chatglm":
        dims["inner_hidden_size"] = config.inner_hidden_size
    else:
        dims["ffn_hidden_size"] = config.ffn_hidden_size
    bad = {k: v for k, v in dims.items() if v % degree}
    groups = getattr(config, "multi_query_group_num", None) if generation != "chatglm" else None
    if groups and not supported_degree(config.num_attention_heads, groups, degree):
        bad["multi_query_group_num"] = groups
    if bad:
        detail = ", ".join(f"{k}={v}" for k, v in bad.items())
        hint = ""
        if "multi_query_group_num" in bad:
            # Past the groups, each rank keeps a copy of the key/value group its query heads read.
            fits = [d for d in range(2, config.num_attention_heads + 1)
                    if supported_degree(config.num_attention_heads, groups, d) and not any(
                        v % d for v in dims.values())]
            hint = (f"; {generation} has {groups} key/value groups, so the degree must divide them or be a "
                    f"multiple of them: use --tensor_parallel_degree {' or '.join(map(str, [1] + fits))}")
        raise ConfigurationError(f"--tensor_parallel_degree {degree} does not divide {detail}{hint}")


def load_model(model_name_or_path: str, generation: str, dtype: str = "float32", tensor_parallel_degree: int = 1,
               tensor_parallel_rank: int = 0, low_memory: bool = None, **config_overrides):
    """The PaddleNLP model class of `generation`, loaded (and split for tensor parallel) from the checkpoint.
    `low_memory`: PaddleNLP's low_cpu_mem_usage (the model made without initial weights, then filled from the
    checkpoint): measured on the 2-layer 6B-shape model (3.76 GB), peak 5.0 GB in 10 s against 7.5 GB in 21 s.
    By default on whenever the model is not split for tensor parallel (the split loads stay on PaddleNLP's
    default path, which the multi-process tests cover)."""
    if low_memory is None:
        low_memory = tensor_parallel_degree == 1
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
    try:
        model = model_class.from_pretrained(model_name_or_path, config=config, dtype=dtype,
                                            low_cpu_mem_usage=low_memory)
    except (EOFError, pickle.UnpicklingError, UnicodeDecodeError, MemoryError, ValueError) as err:
        if isinstance(err, ValueError) and "can not parse the file" not in str(err):
            raise  # a ValueError that is not paddle.load's "cannot read this file" is a bug, not bad input
        raise ConfigurationError(f"the weights in {model_name_or_path} cannot be read ({one_line(err)[:100]}): the "
                                 "file is truncated or not a Paddle checkpoint; save or download it again") from None
    apply_rope_ratio(model)
    return model


def apply_rope_ratio(model) -> None:
    """ChatGLM3-6B-32K stretches its rotary base (config rope_ratio 50: base 10000 * 50); PaddleNLP's
    ChatGLMv2 always uses 10000, so a 32K checkpoint would run with the wrong positions. Swap in the
    scaled rotary embedding when the config asks for it."""
    ratio = getattr(model.config, "rope_ratio", None)
    if not ratio or ratio == 1 or not hasattr(model, "chatglm_v2"):
        return
    from glm_tune.scaled_rotary import ScaledRotaryEmbedding

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


def apply_lora(model, generation: str, rank: int = 8, alpha: int = 16, lora_path: str = None, dtype: str = "float32",
               seed: int = 42):
    """Wrap `model` with LoRA adapters on the generation's linear layers (trainable) or load trained ones."""
    from paddlenlp.peft import LoRAConfig, LoRAModel

    if lora_path:
        model = LoRAModel.from_pretrained(model=model, lora_path=lora_path)
        check_adapter_matches(model, lora_path, "lora_model_state")
        return model
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


def apply_prefix(model, generation: str, num_prefix_tokens: int = 64, prefix_path: str = None,
                 dtype: str = "float32"):
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
