"""The three ChatGLM generations in one table: which PaddleNLP classes serve them and how to tell them apart.

Every script picks classes from `GENERATIONS` by name instead of an if/elif ladder. `detect_generation` reads a
checkpoint folder (Paddle or Hugging Face layout) and says which generation it holds; ChatGLM3 shares
ChatGLM2's architecture and tokenizer class, so it is told apart by the marker this project writes
(`chatglm_generation` in config.json) or, for folders from elsewhere, by THUDM's own hints (PaddleNLP #8556 is
the bug this avoids: a ChatGLM3 folder served with ChatGLM2's prompt format).
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

from glm_tune.errors import GlmTuneError

GENERATION_KEY = "chatglm_generation"


class NotAChatGLMCheckpoint(GlmTuneError):
    """The folder given as a model is not a ChatGLM checkpoint this suite can load."""


@dataclass(frozen=True)
class Generation:
    name: str  # chatglm | chatglm2 | chatglm3
    paddle_model_type: str  # PaddleNLP config.model_type
    config_class: str  # PaddleNLP class names, looked up lazily so importing this module stays cheap
    model_class: str
    tokenizer_class: str
    vocab_file: str  # the SentencePiece file name the tokenizer class expects in a folder
    # Linear layers LoRA adapts (PaddleNLP name patterns), as PaddleNLP's own ChatGLM LoRA recipes choose.
    lora_target_modules: tuple = field(default_factory=tuple)

    def classes(self):
        """(config_class, model_class, tokenizer_class) imported from paddlenlp.transformers."""
        import paddlenlp.transformers as pt

        from glm_tune import tensor_parallel_layout

        tensor_parallel_layout.install()  # tensor parallel past the KV groups; LoRA's fused-column shard layout
        return getattr(pt, self.config_class), getattr(pt, self.model_class), getattr(pt, self.tokenizer_class)


# The same linear layer names in every generation (PaddleNLP's ChatGLM LoRA recipes).
_LORA_TARGETS = (".*query_key_value.*", ".*dense.*", ".*dense_h_to_4h.*", ".*dense_4h_to_h.*")

GENERATIONS = {
    "chatglm": Generation(
        "chatglm",
        "chatglm",
        "ChatGLMConfig",
        "ChatGLMForCausalLM",
        "ChatGLMTokenizer",
        "ice_text.model",
        _LORA_TARGETS,
    ),
    "chatglm2": Generation(
        "chatglm2", "chatglm_v2", "ChatGLMv2Config", "ChatGLMv2ForCausalLM", "ChatGLMv2Tokenizer",
        "tokenizer.model", _LORA_TARGETS,
    ),
    "chatglm3": Generation(
        "chatglm3", "chatglm_v2", "ChatGLMv2Config", "ChatGLMv2ForCausalLM", "ChatGLMv2Tokenizer",
        "tokenizer.model", _LORA_TARGETS,
    ),
}


def get_generation(name: str) -> Generation:
    try:
        return GENERATIONS[name]
    except KeyError:
        raise NotAChatGLMCheckpoint(f"unknown model type {name!r}; choose one of {sorted(GENERATIONS)}") from None


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except (ValueError, OSError) as err:
        raise NotAChatGLMCheckpoint(f"{path} is not valid JSON text ({err}); restore it from the checkpoint's "
                                    "download") from None


def detect_generation(model_dir) -> str:
    """Name of the ChatGLM generation stored in `model_dir` (Paddle or Hugging Face layout).

    Raises NotAChatGLMCheckpoint, saying what is missing, for anything else.
    """
    return detect_generation_verdict(model_dir)[0]


def detect_generation_verdict(model_dir) -> tuple:
    """(generation, certain): certain is False only for a ChatGLM2-architecture folder with no sign of being
    ChatGLM3 either way (no marker, no ChatGLM3 name, role tokens or rope_ratio), which is read as ChatGLM2."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise NotAChatGLMCheckpoint(
            f"{model_dir} has no config.json: pass a folder holding a ChatGLM checkpoint "
            "(config.json, weights and tokenizer), e.g. one written by tools/make_tiny_model.py"
        )
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise NotAChatGLMCheckpoint(f"{config_path} holds a {type(config).__name__}, not a JSON object")
    if config.get(GENERATION_KEY) in GENERATIONS:
        return config[GENERATION_KEY], True
    model_type = config.get("model_type")
    v2_style = model_type == "chatglm_v2" or "multi_query_group_num" in config or "padded_vocab_size" in config
    if model_type not in ("chatglm", "chatglm_v2"):
        raise NotAChatGLMCheckpoint(
            f"{config_path} has model_type={model_type!r}; expected a ChatGLM checkpoint (chatglm or chatglm_v2)"
        )
    if not v2_style:
        return "chatglm", True
    hints = " ".join(str(config.get(k, "")) for k in ("_name_or_path", "name_or_path")) + " " + model_dir.name
    tok_config = model_dir / "tokenizer_config.json"
    if tok_config.is_file():
        hints += " " + json.dumps(_read_json(tok_config), ensure_ascii=False)
    # ChatGLM3's names and chat template carry "chatglm3" or its role tokens; ChatGLM2's never do.
    if "chatglm3" in hints.lower() or "<|user|>" in hints or config.get("rope_ratio") is not None:
        return "chatglm3", True
    return "chatglm2", "chatglm2" in hints.lower()
