"""An exported model ready to run: its engine, tokenizer, step-graph feeds and description, opened once for
infer_generation.py and serve_generation.py alike."""
import logging
from dataclasses import dataclass

from glm_tune.deployment.export_format import check_export_folder, read_description
from glm_tune.deployment.inference_engine import choose_engine, create_engine
from glm_tune.deployment.step_feeds import StepFeeds
from glm_tune.glm_family import get_generation

logger = logging.getLogger(__name__)


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
