"""The four MindFormers tasks behind the launchers: fine-tune, generation eval, chat prediction, MindIR export.

Each takes a recipe already loaded by `recipe.load_recipe` and runs MindFormers' own pieces (Trainer, datasets,
ChatGLM2ForConditionalGeneration, generate); the suite adds its data checks, ADGEN metric, loss log and files.
"""
import json
from pathlib import Path
from typing import Dict, List

import numpy as np

from glm_tune.conversion.checkpoint_convert import ConversionError
from glm_tune.safe_output import atomic_write_json, atomic_write_text


def start(config) -> None:
    """MindSpore's context from the recipe (device, mode, parallel), then the CPU fixes when on a CPU."""
    from mindformers import build_context

    import ms_cpu_compat

    build_context(config)
    ms_cpu_compat.install()


def check_data(path, columns=("content", "summary")) -> int:
    """Every record of an AdvertiseGen-shaped file, checked before MindFormers reads it: its ADGenDataLoader drops a
    malformed line, a record without the recipe's `origin_columns` or with an empty value at INFO level and trains
    on the rest (a JSON-list file, or instruction data, silently becomes an empty or partial dataset). Here the run
    stops at the first such record with file:line and what to change. Returns the number of records."""
    from data import DataFormatError, iter_json_records

    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    with open(path, encoding="utf-8") as handle:
        if handle.read(4096).lstrip().startswith("["):
            raise DataFormatError(f"{path}: one JSON list; MindFormers' ADGenDataLoader reads JSON lines (one "
                                  "record per line): rewrite it that way")
    count = 0
    for lineno, record in iter_json_records(path):
        if isinstance(record, DataFormatError):
            raise record
        bad = [c for c in columns if not isinstance(record, dict) or not isinstance(record.get(c), str)
               or not record[c].strip()]
        if bad:
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataFormatError(f"{path}:{lineno}: needs non-empty text in {list(columns)} (the recipe's "
                                  f"origin_columns), missing or empty: {bad}; found {found}. MindFormers would drop "
                                  "this record without an error")
        count += 1
    if not count:
        raise DataFormatError(f"{path}: no records")
    return count


def output_dir(config) -> Path:
    path = Path(config.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def loss_history_callback(path: Path, first_step: int = 1):
    """A MindSpore callback writing {"step", "loss"} per training step to `path` (JSON lines, appended); steps
    count from `first_step` (a resumed run continues its numbering)."""
    from mindspore.train import Callback

    class LossHistory(Callback):
        def on_train_step_end(self, run_context):
            params = run_context.original_args()
            outputs = params.net_outputs
            loss = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
            step = int(params.cur_step_num) + first_step - 1
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, "loss": float(loss.asnumpy())}) + "\n")

    return LossHistory()


def latest_checkpoint(out: Path) -> Path:
    """The checkpoint MindFormers' CheckpointMonitor wrote last for rank 0 (its meta.json names it)."""
    folder = out / "checkpoint" / "rank_0"
    meta = folder / "meta.json"
    if meta.is_file():
        return folder / json.loads(meta.read_text())["last_ckpt_file"]
    found = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no checkpoint under {folder}")
    return found[-1]


def resumed_step(config) -> int:
    """The optimizer step a resumed run starts after (0 for a fresh run), read from the checkpoint's own counter
    without loading its weights."""
    import mindspore as ms

    if not isinstance(config.get("resume_training"), str):
        return 0
    checkpoint = Path(config.load_checkpoint) / "rank_0" / config.resume_training
    counter = ms.load_checkpoint(str(checkpoint), choice_func=lambda name: name == "global_step")
    return int(counter["global_step"].asnumpy().reshape(-1)[0]) if "global_step" in counter else 0


def finetune(config) -> Dict[str, object]:
    """MindFormers' Trainer.finetune on the recipe; returns the last checkpoint and the per-step losses."""
    from mindformers import Trainer

    loader = config.train_dataset.data_loader
    check_data(loader.dataset_dir, loader.origin_columns)
    start(config)
    out = output_dir(config)
    history_file = out / "log_history.jsonl"
    history_file.unlink(missing_ok=True)
    trainer = Trainer(args=config, callbacks=[loss_history_callback(history_file, resumed_step(config) + 1)])
    trainer.finetune(finetune_checkpoint=config.load_checkpoint or False)
    losses = [json.loads(line)["loss"] for line in history_file.read_text().splitlines()]
    return {"checkpoint": latest_checkpoint(out), "losses": losses, "log_history": history_file}


def evaluate(config) -> Dict[str, float]:
    """MindFormers' generation eval (Trainer.evaluate) scored with the suite's ADGEN metric; writes
    eval_predictions.jsonl and eval_metrics.json to the output folder."""
    from mindformers import Trainer

    from adgen_metric import SuiteADGENMetric

    loader = config.eval_dataset.data_loader
    check_data(loader.dataset_dir, loader.origin_columns)
    start(config)
    metric = SuiteADGENMetric()
    trainer = Trainer(args=config, compute_metrics={"adgen": metric})
    trainer.evaluate(eval_checkpoint=config.load_checkpoint)
    out = output_dir(config)
    atomic_write_text(out / "eval_predictions.jsonl", "".join(
        json.dumps({"prediction": p, "label": l}, ensure_ascii=False) + "\n"
        for p, l in zip(metric.predictions, metric.labels)))
    atomic_write_json(out / "eval_metrics.json", metric.result)
    return metric.result


def build_network(config):
    """MindFormers' network for the recipe's model section, weights from config.load_checkpoint (all of them:
    a missing parameter is an error, not a random initialisation)."""
    import mindspore as ms
    from mindformers.models.build_model import build_network as mindformers_build_network

    from mindformers.core.parallel_config import build_parallel_config

    build_parallel_config(config)  # dict sections -> the config objects the model's layers read
    network = mindformers_build_network(config.model, default_args={"parallel_config": config.parallel_config,
                                                                     "moe_config": config.moe_config})
    if not config.load_checkpoint:
        raise ConversionError("no checkpoint: pass --load_checkpoint or --model_dir")
    missing, _ = ms.load_param_into_net(network, ms.load_checkpoint(str(config.load_checkpoint)))
    # the paged KV cache is runtime state; LoRA deltas absent from a base checkpoint start as MindPet initialises
    # them (B = 0: the base model's output)
    missing = [name for name in missing if "paged_attention_mgr" not in name and "mindpet_delta" not in name]
    if missing:
        raise ConversionError(f"{config.load_checkpoint} lacks {len(missing)} parameter(s) of the recipe's model, "
                              f"e.g. {missing[:3]}: is it a checkpoint of this model (--model_dir)?")
    network.set_train(False)
    return network


def prompt_ids(tokenizer, query: str, history=None) -> List[int]:
    """THUDM's chat prompt for the tokenizer's generation (the same ids the Paddle suite's ChatGLM2/3 formats
    give): ChatGLM3 role tokens, ChatGLM2 `[Round n]` text."""
    if hasattr(tokenizer, "build_chat_input"):
        return [int(i) for i in np.asarray(tokenizer.build_chat_input(query, history=history)["input_ids"])[0]]
    return tokenizer.encode(tokenizer.build_prompt(query, history), add_special_tokens=True)


def predict(config, queries: List[str], max_new_tokens: int = None) -> List[Dict[str, object]]:
    """Greedy (or the recipe's sampling) answers to `queries` with MindFormers' generate, one at a time."""
    from mindformers.models.build_tokenizer import build_tokenizer

    start(config)
    tokenizer = build_tokenizer(config.processor.tokenizer)
    network = build_network(config)
    model_config = config.model.model_config
    results = []
    for query in queries:
        ids = prompt_ids(tokenizer, query)
        max_length = model_config["max_decode_length"]
        if max_new_tokens:
            max_length = min(len(ids) + max_new_tokens, model_config["seq_length"])
        if len(ids) >= max_length:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room under max_length {max_length}")
        output = network.generate([ids], max_length=max_length, do_sample=model_config.get("do_sample", False),
                                  top_k=model_config.get("top_k", 1), top_p=model_config.get("top_p", 1.0))
        new_ids = [int(i) for i in output[0][len(ids):]]
        if new_ids and new_ids[-1] == model_config["eos_token_id"]:
            new_ids = new_ids[:-1]
        results.append({"query": query, "answer": tokenizer.decode(new_ids, skip_special_tokens=True),
                        "token_ids": new_ids})
    return results


def export(config, file_stem: str = "glm2") -> Path:
    """MindIR of one forward pass over [batch_size, seq_length] token ids (mindspore.export)."""
    import mindspore as ms

    from glm_tune.safe_output import atomic_folder

    start(config)
    network = build_network(config)
    model_config = config.model.model_config
    ids = ms.Tensor(np.ones((model_config["batch_size"], model_config["seq_length"]), np.int32))
    target = output_dir(config) / "mindir"
    with atomic_folder(target, "ascend export") as staging:
        ms.export(network, ids, file_name=str(staging / file_stem), file_format="MINDIR")
    return target / f"{file_stem}.mindir"


def logits(network, ids: np.ndarray) -> np.ndarray:
    """[batch, seq, vocab] logits of a network built by `build_network` for int token ids [batch, seq]."""
    import mindspore as ms

    network.set_train(False)
    return network(ms.Tensor(np.asarray(ids, dtype=np.int32)))[0].asnumpy()


def network_for(recipe_path, model_dir, checkpoint, seq_length: int, batch_size: int = 1, output_dir=None):
    """A network from a recipe for a given input shape on the CPU (parity checks, debugging)."""
    from recipe import RecipeOverrides, load_recipe

    config = load_recipe(recipe_path, RecipeOverrides(model_dir=str(model_dir), load_checkpoint=str(checkpoint),
                                                       device_target="CPU", output_dir=output_dir), "forward")
    config.model.model_config["seq_length"] = seq_length
    config.model.model_config["batch_size"] = batch_size
    start(config)
    return build_network(config)
