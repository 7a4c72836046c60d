"""Fine-tune ChatGLM / ChatGLM2 / ChatGLM3 (full, LoRA or prefix), evaluate with generation, save for export.

    python finetune_generation.py --model_name_or_path build/tiny/chatglm2 --task_name_or_path build/data/AdvertiseGen \
        --output_dir output/chatglm2 --max_steps 60 --learning_rate 3e-3 --do_train --do_eval --do_generation True
    python -m paddle.distributed.launch --nproc_per_node 2 finetune_generation.py --tensor_parallel_degree 2 ...
    python finetune_generation.py ... --lora True --lora_rank 8          # or: --prefix_tuning True --num_prefix_tokens 64
    python finetune_generation.py ... --resume_from_checkpoint auto      # continue from the last checkpoint-N

`python finetune_generation.py --help` lists every flag (PaddleNLP's TrainingArguments plus this suite's).
"""
from glm_tune import console

console.quiet_startup()  # called before the imports below: paddle prints its start-up warnings while it loads

import json
import logging
from pathlib import Path

import paddle
from paddlenlp.datasets import MapDataset
from paddlenlp.trainer import set_seed

from argument import DataArgument, GenerateArgument, GLMTrainingArguments, TrainModelArgument, parse_dataclasses
from data import (DataCollator, DataFormatError, cut_summary, get_prompt_format, read_examples, task_file,
                  tokenize_example)
from glm_tune.errors import run_cli
from glm_tune.training.glm_trainer import (ConsoleProgress, GenerationEvaluator, GLMTrainer, TrainingArtifactsCallback,
                                           accuracy_metrics, read_log_history, use_safe_visualdl,
                                           write_run_summary)
from glm_tune.model_loading import (Adapter, ConfigurationError, check_adapter_flags, check_lengths, check_tensor_parallel,
                                    load_checkpoint, load_config, locate_checkpoint, resolve_generation)
from glm_tune.process_memory import peak_rss_per_rank
from glm_tune.safe_output import write_owner
from glm_tune.tensor_parallel_layout import mark_replicated_kv
from glm_tune.training.run_checkpoints import (COMMAND, check_resumable, checkpoint_step, claim_output_dir,
                                               drop_checkpoints, latest_complete, run_identity)

logger = logging.getLogger("finetune_generation")


# The flags this command takes, in --help's order (tools/flag_reference.py documents them in docs/flags.md).
ARGUMENT_GROUPS = (TrainModelArgument, DataArgument, GenerateArgument, GLMTrainingArguments)


def parse_arguments(argv=None):
    return parse_dataclasses(ARGUMENT_GROUPS, argv)


def validate(model_args, data_args, training_args) -> tuple:
    """Every check that needs no weights: returns (the checkpoint, run identity, output folder state, the records of
    each split the run reads), raises with the flag to fix."""
    check_adapter_flags(model_args)
    if training_args.per_device_train_batch_size < 1 or training_args.per_device_eval_batch_size < 1:
        raise ConfigurationError("--per_device_train_batch_size and --per_device_eval_batch_size must be at least 1")
    generation = resolve_generation(model_args.model_name_or_path, model_args.model_type)
    run = run_identity(model_args, data_args, training_args, generation)
    inputs = {"--model_name_or_path": model_args.model_name_or_path, "--task_name_or_path": data_args.task_name_or_path,
              "--lora_path": model_args.lora_path, "--prefix_path": model_args.prefix_path}
    output_state = claim_output_dir(training_args.output_dir, run, inputs, training_args.overwrite_output_dir)
    checkpoint = locate_checkpoint(model_args, training_adapter(model_args), generation)
    # read (and so checked) here, before any weight is loaded; the datasets are built from these records
    splits = ["train"] * training_args.do_train + ["dev"] * training_args.do_eval
    records = {split: read_examples(task_file(data_args.task_name_or_path, split), data_args.skip_bad_records,
                                    data_format=data_args.data_format, offer_skip=True) for split in splits}
    config = load_config(checkpoint.folder, generation)
    check_lengths(config, data_args.src_length, data_args.tgt_length)
    degree = training_args.requested_tensor_parallel_degree
    check_tensor_parallel(config, generation, degree)
    if degree > 1 and degree != training_args.tensor_parallel_degree:
        raise ConfigurationError(
            f"--tensor_parallel_degree {degree} needs {degree} processes but this run has {training_args.world_size}: "
            f"start it with python -m paddle.distributed.launch --nproc_per_node {degree} finetune_generation.py ...")
    on_cpu = paddle.get_device().startswith("cpu")
    if training_args.fp16 and on_cpu:
        raise ConfigurationError("--fp16 needs a GPU; on CPU train in float32 (drop --fp16)")
    if training_args.bf16 and training_args.fp16_opt_level == "O2" and on_cpu:
        raise ConfigurationError("--bf16 with --fp16_opt_level O2 (pure bfloat16 weights) has no CPU kernels in "
                                 "Paddle 3.3.1; on CPU use --fp16_opt_level O1 or drop --bf16")
    if output_state == "foreign":  # allowed by --overwrite_output_dir, done only now that every check passed
        for folder in drop_checkpoints(training_args.output_dir):
            logger.info("--overwrite_output_dir: removed %s of an earlier run", folder)
        output_state = "new"
    return checkpoint, run, output_state, records


def model_dtype(training_args) -> str:
    if training_args.fp16_opt_level == "O2":
        if training_args.fp16:
            return "float16"
        if training_args.bf16:
            return "bfloat16"
    return "float32"


def training_adapter(model_args):
    """The adapter this run trains: new LoRA / prefixes of the given size, or trained ones to continue."""
    if model_args.lora:
        return Adapter("lora", model_args.lora_path, model_args.lora_rank, model_args.lora_alpha)
    if model_args.prefix_tuning:
        return Adapter("prefix", model_args.prefix_path, num_prefix_tokens=model_args.num_prefix_tokens)
    return None


def build_model(checkpoint, training_args):
    """(model, tokenizer) for training."""
    # ChatGLM2/3 only add prefix key/values through the KV-cache path, so prefix tuning needs use_cache.
    prefix = checkpoint.adapter is not None and checkpoint.adapter.kind == "prefix"
    model, tokenizer = load_checkpoint(checkpoint, model_dtype(training_args), training_args.tensor_parallel_degree,
                                       max(training_args.tensor_parallel_rank, 0), seed=training_args.seed,
                                       use_cache=prefix, recompute=training_args.recompute)
    mark_replicated_kv(model)  # degree past the KV groups: copies whose gradients are summed at each step
    return model, tokenizer


def build_datasets(data_args, training_args, tokenizer, generation, records, gen_args=None):
    fmt = get_prompt_format(generation, tokenizer)

    def features(split, is_test=False):
        examples = records[split]
        if split == "dev" and data_args.max_eval_samples:
            examples = examples[: data_args.max_eval_samples]
        feats = [tokenize_example(fmt, e, data_args.src_length, data_args.tgt_length, is_test) for e in examples]
        cuts = cut_summary(fmt, len(examples), data_args.src_length, data_args.tgt_length)
        if cuts:
            logger.info("%s.json: %s", split, cuts)
        kept = [(e, f) for e, f in zip(examples, feats) if f is not None]
        if len(kept) < len(examples):  # conversations cut so short that nothing learnable was left
            logger.info("%s.json: skipped %d of %d conversations with no learnable token left after cutting to "
                        "--src_length + --tgt_length", split, len(examples) - len(kept), len(examples))
        if not kept:
            raise DataFormatError(f"{split}.json: no record keeps a learnable token within --src_length "
                                  f"{data_args.src_length} + --tgt_length {data_args.tgt_length}; raise them")
        return [e for e, _ in kept], [f for _, f in kept]

    train = MapDataset(features("train")[1]) if training_args.do_train else None
    dev, evaluator = None, None
    if training_args.do_eval:
        dev_examples, dev_feats = features("dev")
        dev = MapDataset(dev_feats)
        if training_args.do_generation:
            items = [item for e in dev_examples for item in fmt.eval_items(e, data_args.src_length)]
            evaluator = GenerationEvaluator(tokenizer, generation, [p for p, _ in items], [r for _, r in items],
                                            data_args.tgt_length, training_args.per_device_eval_batch_size,
                                            vars(gen_args) if gen_args else None)
    return train, dev, evaluator


def resume_checkpoint(training_args, output_state: str = "same_run"):
    """--resume_from_checkpoint PATH, or auto/true for the newest complete checkpoint-N of this run in
    output_dir (half-written ones are skipped and named; another run's are never taken)."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    if str(value).lower() not in ("auto", "true"):
        return str(check_resumable(value))
    found, skipped = latest_complete(training_args.output_dir) if output_state == "same_run" else (None, [])
    for folder, reason in skipped:
        logger.warning("--resume_from_checkpoint %s: skipping %s: %s", value, folder, reason)
    if found is None:
        logger.warning("--resume_from_checkpoint %s: no complete checkpoint of this run in %s, starting fresh",
                       value, training_args.output_dir)
        return None
    if 0 < training_args.max_steps < checkpoint_step(found):
        raise ConfigurationError(
            f"--resume_from_checkpoint {value}: the newest checkpoint {found} is at step {checkpoint_step(found)}, "
            f"past --max_steps {training_args.max_steps}; raise --max_steps or use another --output_dir")
    logger.info("resuming from %s", found)
    return str(found)


def main(argv=None):
    """Run the job; returns (trainer, metrics) so tests can look inside."""
    console.setup_logging(console.verbose_requested(argv))  # before parsing: PaddleNLP logs while it parses
    from glm_tune.training import gloo_rendezvous, tp_cpu_compat

    gloo_rendezvous.install()  # before parsing: PaddleNLP's arguments start fleet (CPU, 2+ ranks)
    model_args, data_args, gen_args, training_args = parse_arguments(argv)
    checkpoint, run, output_state, records = validate(model_args, data_args, training_args)
    resume_from = resume_checkpoint(training_args, output_state) if training_args.do_train else None
    if training_args.tensor_parallel_degree > 1:
        from glm_tune.training import kv_replica_sync

        tp_cpu_compat.install()
        kv_replica_sync.install()
    # Optimizer state in a checkpoint is keyed by parameter and accumulator names, which Paddle numbers per
    # process; a fresh name scope gives the same names on every run, so a checkpoint resumes in any process.
    with paddle.utils.unique_name.guard():
        return train_and_evaluate(data_args, training_args, checkpoint, records, run, resume_from, gen_args)


def write_predictions_file(path: Path, evaluator) -> None:
    """The last evaluation's generated answers beside their references, one JSON line each, to read what the
    metrics summarize."""
    from glm_tune.safe_output import atomic_write_text

    atomic_write_text(path, "".join(json.dumps({"reference": r, "prediction": p}, ensure_ascii=False) + "\n"
                                    for r, p in zip(evaluator.references, evaluator.last_predictions)))


def train_and_evaluate(data_args, training_args, checkpoint, records, run=None, resume_from=None, gen_args=None):
    set_seed(training_args.seed)  # before any weight is created: prefix and LoRA start from the seed
    generation = checkpoint.generation
    model, tokenizer = build_model(checkpoint, training_args)
    train_ds, dev_ds, evaluator = build_datasets(data_args, training_args, tokenizer, generation, records, gen_args)
    if training_args.process_index == 0:  # the folder is this run's from here on
        write_owner(training_args.output_dir, COMMAND, run=run)

    trainer = GLMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=dev_ds,
        tokenizer=tokenizer,
        data_collator=DataCollator(tokenizer, generation),
        compute_metrics=accuracy_metrics,
        generation_evaluator=evaluator,
        callbacks=[TrainingArtifactsCallback(training_args.output_dir),
                   ConsoleProgress(len(train_ds) if train_ds is not None else None)],
    )
    use_safe_visualdl(trainer)

    metrics = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=resume_from)
        # before saving (which copies weights): what training itself needed, per rank (bench/memory_plan.py)
        metrics["train_peak_rss_mb"] = peak_rss_per_rank(training_args.world_size)
        trainer.save_model()
        trainer.save_state()
        metrics.update(result.metrics)
    if training_args.do_eval:
        metrics.update(trainer.evaluate())
    if trainer.is_world_process_zero():
        summary = write_run_summary(training_args.output_dir, read_log_history(training_args.output_dir),
                                    {"metrics": metrics, "generation": generation})
        logger.info("metrics: %s", {k: v for k, v in summary["metrics"].items() if "runtime" not in k})
        if evaluator is not None and evaluator.last_predictions:
            write_predictions_file(Path(training_args.output_dir) / "eval_predictions.jsonl", evaluator)
        logger.info("wrote %s/metrics.json%s", training_args.output_dir,
                    " and loss_curve.png" if training_args.do_train else "")
    return trainer, metrics


if __name__ == "__main__":
    run_cli(main)
