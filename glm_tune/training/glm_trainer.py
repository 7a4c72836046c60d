"""PaddleNLP's Trainer, plus what fine-tuning ChatGLM needs: generation metrics at evaluation, a VisualDL
callback that survives today's protobuf, and the loss curve / metrics.json written at the end."""
import json
import logging
from pathlib import Path
from typing import List

import numpy as np
from paddlenlp.trainer import Trainer, TrainerCallback
from paddlenlp.trainer.integrations import VisualDLCallback

from glm_tune.generation import decode_answer, generate_ids
from glm_tune.training.run_checkpoints import checkpoint_step, mark_complete, train_loss_sum
from glm_tune.safe_output import atomic_write_json
from glm_tune.metrics import score_answers, token_accuracy

logger = logging.getLogger(__name__)


def argmax_logits(logits):
    """Keep only the argmax ids of eval logits: the full [batch, length, vocab] tensors of a 65k vocabulary
    would fill memory long before the dev set ends."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.argmax(axis=-1)


def accuracy_metrics(eval_prediction) -> dict:
    return {"accuracy": token_accuracy(eval_prediction.predictions, eval_prediction.label_ids)}


class GenerationEvaluator:
    """Generates answers for dev prompts and scores them: THUDM's ADGEN metrics, tool-call accuracy for tool calls."""

    def __init__(self, tokenizer, generation: str, prompts: List[List[int]], references: List[str],
                 max_new_tokens: int, batch_size: int, gen_kwargs: dict = None):
        self.tokenizer, self.generation = tokenizer, generation
        self.prompts, self.references = prompts, references
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.gen_kwargs = gen_kwargs or {}
        self.last_predictions: List[str] = []

    def __call__(self, model) -> dict:
        ids = generate_ids(model, self.tokenizer, self.generation, self.prompts, self.max_new_tokens,
                           self.batch_size, **self.gen_kwargs)
        self.last_predictions = [decode_answer(self.tokenizer, row) for row in ids]
        return score_answers(self.last_predictions, self.references)


class GLMTrainer(Trainer):
    """Adds ROUGE-1/2/L and BLEU-4 of generated dev answers to the evaluation metrics when asked."""

    def __init__(self, *args, generation_evaluator: GenerationEvaluator = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.generation_evaluator = generation_evaluator
        self._unlogged_loss = None  # PaddleNLP's running loss of the steps not yet logged (a tensor it owns)
        self._loss_sum_to_restore = None  # the losses of the steps before a resume, summed
        self._first_step = 0  # the step this process started from (0, or the resumed checkpoint's)

    def train(self, resume_from_checkpoint=None, **kwargs):
        """PaddleNLP's train. A resumed run's train_loss is the mean over all its steps, not the resumed steps'
        sum over all of them, and its throughput counts the steps this process ran, not all max_steps."""
        if resume_from_checkpoint:
            self._first_step = checkpoint_step(resume_from_checkpoint)
            self._loss_sum_to_restore = train_loss_sum(resume_from_checkpoint)
            if self._loss_sum_to_restore is None and self._first_step:
                logger.warning("%s keeps no training-loss sum (written by an older version): train_loss will "
                               "average the resumed steps only", resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _maybe_log_save_evaluate(self, tr_loss, *args, **kwargs):
        # PaddleNLP zeroes its loss sum after loading a checkpoint, just before the first step: the earlier
        # steps' sum goes back in here, at the first step's end, before anything reads it.
        if self._loss_sum_to_restore is not None:
            self._total_loss_scalar += self._loss_sum_to_restore
            self._loss_sum_to_restore = None
        self._unlogged_loss = tr_loss
        return super()._maybe_log_save_evaluate(tr_loss, *args, **kwargs)

    def log(self, logs, **kwargs):
        if "train_runtime" in logs and self.state.max_steps and self._first_step:
            ran = (self.state.global_step - self._first_step) / self.state.max_steps
            for key in ("train_samples_per_second", "train_steps_per_second"):
                if key in logs:
                    logs[key] = round(logs[key] * ran, 4)
        return super().log(logs, **kwargs)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval", max_eval_iters=-1):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix, max_eval_iters)
        if self.generation_evaluator is not None and description == "Evaluation":
            scores = self.generation_evaluator(self.model)
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in scores.items()})
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # ChatGLM-6B's forward returns a tuple holding a None cache unless asked for a dict, and PaddleNLP's
        # prediction_step cannot detach None; a model output drops None fields.
        loss, logits, labels = super().prediction_step(model, {**inputs, "return_dict": True}, prediction_loss_only,
                                                       ignore_keys)
        # PaddleNLP's evaluation loop gathers logits across data-parallel ranks *before* its
        # preprocess_logits_for_metrics hook, so the ids are taken here: gathering whole logits moves a vocabulary
        # per token, and ChatGLM2/3's are a transposed view that all_gather refuses ("must be contiguous").
        if logits is not None:
            logits = argmax_logits(logits).contiguous()
        return loss, logits, labels

    def _save_checkpoint(self, model, metrics=None):
        """PaddleNLP's save, then the completion marker, written last and once every rank has saved: a
        checkpoint without it (a save cut short by kill -9 or a full disk) is never resumed from."""
        super()._save_checkpoint(model, metrics)
        if self.args.world_size > 1:
            import paddle

            paddle.distributed.barrier()
        if self.args.process_index == 0:
            # what train_loss would sum to here: the logged windows plus the steps since the last log
            unlogged = float(self._unlogged_loss.item()) if self._unlogged_loss is not None else 0.0
            mark_complete(Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}",
                          train_loss_sum=self._total_loss_scalar + unlogged)

    def _get_train_sampler(self):
        if self.train_dataset is None:
            return None
        return _same_order_sampler(self)


class VisualDLWithSafeHparams(VisualDLCallback):
    """VisualDL 2.5.3 writes booleans into an int protobuf field, which protobuf >= 5 refuses
    (`HparamInfo.int_value: Expected an int, got a boolean`); log them as text instead."""

    def _init_summary_writer(self, args, log_dir=None):
        super()._init_summary_writer(args, log_dir)
        writer = getattr(self, "vdl_writer", None)
        if writer is None or not hasattr(writer, "add_hparams"):
            return
        add_hparams = writer.add_hparams

        def add_hparams_as_text(hparams_dict, metrics_list, *args, **kwargs):
            clean = {k: (str(v) if isinstance(v, bool) else v) for k, v in hparams_dict.items()}
            return add_hparams(clean, metrics_list, *args, **kwargs)

        writer.add_hparams = add_hparams_as_text


class ConsoleProgress(TrainerCallback):
    """The run banner and one line per --logging_steps on the console, with or without tqdm. PaddleNLP prints
    both through its own logger, which the suite keeps at WARNING to drop its per-file chatter."""

    HIDDEN = ("runtime", "per_second", "global_step", "total_flos", "samples", "trained_tokens")

    def __init__(self, num_examples: int = None):
        self.num_examples = num_examples

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        replicas = max(args.dataset_world_size, 1)
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * replicas
        examples = f"{self.num_examples} examples, " if self.num_examples is not None else ""
        resumed = f", resuming after step {state.global_step}" if state.global_step else ""
        write_console(f"training: {examples}{state.max_steps} steps, batch {args.per_device_train_batch_size} per "
                      f"device x {args.gradient_accumulation_steps} accumulation x {replicas} data-parallel = "
                      f"{per_step} examples per step{resumed}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        figures = [f"{k} {_short(v)}" for k, v in logs.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and not any(h in k for h in self.HIDDEN)]
        if figures:
            write_console(f"step {state.global_step}/{state.max_steps}: " + ", ".join(figures))


def write_console(line: str) -> None:
    """A line on stderr that leaves a running tqdm bar intact."""
    import sys

    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def use_safe_visualdl(trainer: Trainer) -> None:
    if any(isinstance(cb, VisualDLCallback) for cb in trainer.callback_handler.callbacks):
        trainer.pop_callback(VisualDLCallback)
        trainer.add_callback(VisualDLWithSafeHparams)


def plot_loss_curve(log_history: List[dict], path) -> Path:
    """loss_curve.png: training loss per logging step, and eval loss where it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


LOG_HISTORY_FILE = "log_history.jsonl"


def read_log_history(output_dir) -> List[dict]:
    path = Path(output_dir) / LOG_HISTORY_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class TrainingArtifactsCallback(TrainerCallback):
    """Keeps every logged figure in output_dir/log_history.jsonl (PaddleNLP's Trainer empties
    state.log_history at each log) and writes loss_curve.png and metrics.json when training ends.
    A resumed run keeps the history up to its checkpoint, so the curve continues where it stopped."""

    def __init__(self, output_dir):
        self.output_dir = Path(output_dir)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        kept = [h for h in read_log_history(self.output_dir) if h.get("step", 0) <= state.global_step]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(h, default=_to_builtin) + "\n" for h in (kept if state.global_step else []))
        (self.output_dir / LOG_HISTORY_FILE).write_text(lines, encoding="utf-8")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / LOG_HISTORY_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps({**logs, "step": state.global_step}, default=_to_builtin) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_run_summary(self.output_dir, read_log_history(self.output_dir))


def write_run_summary(output_dir, log_history: List[dict], extra: dict = None) -> dict:
    """metrics.json (final train/eval figures, the whole log history) and loss_curve.png in `output_dir`."""
    output_dir = Path(output_dir)
    final = {}
    for entry in log_history:
        final.update({k: v for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    summary = {"final": final, **(extra or {}), "log_history": log_history}
    atomic_write_json(output_dir / "metrics.json", json.loads(json.dumps(summary, default=_to_builtin)))
    if any("loss" in h for h in log_history):
        plot_loss_curve(log_history, output_dir / "loss_curve.png")
    return summary


def _to_builtin(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _same_order_sampler(trainer: Trainer):
    """An epoch-seeded DistributedBatchSampler for every run, one process or many: single-process, tensor
    parallel and resumed runs then see the same batches in the same order (PaddleNLP's default gives one
    process a differently shuffled BatchSampler, so losses could not be compared)."""
    from paddle.io import DistributedBatchSampler

    args = trainer.args
    return DistributedBatchSampler(
        trainer.train_dataset,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        num_replicas=max(args.dataset_world_size, 1),
        rank=max(args.dataset_rank, 0),
        drop_last=args.dataloader_drop_last,
    )

