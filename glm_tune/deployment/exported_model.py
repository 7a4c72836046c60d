"""An exported model ready to run: its engine, tokenizer, step-graph feeds and description, opened once for
infer_generation.py and serve_generation.py alike."""
import logging
from dataclasses import dataclass

from glm_tune.deployment.export_format import check_export_folder, read_description
from glm_tune.deployment.inference_engine import choose_engine, create_engine
from glm_tune.deployment.step_feeds import StepFeeds
from glm_tune.glm_family import get_generation

logger = logging.getLogger(__name__)

# On fp32 engines a step over several tokens (a speculative verify, a prompt's end after cached columns) gives the
# logits plain decoding gives (to ~1e-6), so both are on by default there. onnxruntime's weight-only int8 / int4
# kernels differ between a one-token step and a several-token one at the quantization-noise level (measured 1e-2
# on a logit), which moved 52 of 100 greedy answers of an untrained mid model: off unless asked for.
EXACT_DEFAULTS = {"speculative": 4, "prefix_cache_mb": 256}


def step_settings(engine_args, precision: str) -> tuple:
    """(draft tokens per speculative step, prefix-cache MiB): the flags as given, else the defaults above."""
    chosen = []
    for name, default in EXACT_DEFAULTS.items():
        value = getattr(engine_args, name)
        if value is None:
            value = default if precision == "fp32" else 0
        elif value and precision != "fp32":
            logger.warning("--%s %d on a %s engine: greedy answers may differ from plain decoding where two tokens "
                           "are nearly tied (the weight-only kernels' noise)", name, value, precision)
        chosen.append(value)
    return tuple(chosen)


@dataclass
class ExportedModel:
    engine: object      # feeds -> (logits [B, K, V], *caches)
    feeds: StepFeeds
    tokenizer: object
    config: object
    generation: str
    info: dict          # PREFIX.generation.json
    backend: str
    precision: str

    @property
    def context_length(self) -> int:
        """Tokens a prompt and its answer may take together (the model's position table)."""
        return int(self.info.get("max_sequence_length") or getattr(self.config, "seq_length", 2048))


def open_export(engine_args) -> ExportedModel:
    """Check the export folder, pick the engine (the fastest the export holds unless --backend / --precision
    say otherwise) and load it with the tokenizer and config saved beside the graph."""
    info = read_description(engine_args.model_path, engine_args.model_prefix)
    generation = info["generation"]
    backend, precision = choose_engine(info, engine_args.backend, engine_args.precision)
    logger.info("engine: %s %s%s", backend, precision, "" if engine_args.backend and engine_args.precision else
                " (the fastest this export holds for what was asked; --backend / --precision choose another)")
    check_export_folder(engine_args.model_path, engine_args.model_prefix, generation, backend, precision,
                        info.get("formats"))
    config_class, _, tokenizer_class = get_generation(generation).classes()
    tokenizer = tokenizer_class.from_pretrained(engine_args.model_path)
    config = config_class.from_pretrained(engine_args.model_path)
    engine = create_engine(backend, engine_args.model_path, engine_args.model_prefix, engine_args.threads, precision)
    return ExportedModel(engine, StepFeeds(tokenizer, generation, config, info["dtype"]), tokenizer, config,
                         generation, info, backend, precision)
