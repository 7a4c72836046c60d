"""Per-rank training memory of the ChatGLM 6B models, planned from their shapes and checked against measurement.

    python bench/memory_plan.py                  # the 6B table, then the check on the mid model in 5 layouts
    python bench/memory_plan.py --skip_measure   # the table only

The plan counts, per rank: weights, gradients, optimizer states (AdamW moments, fp32 master weights when the
weights are half precision) and activations, for tensor parallel degree t (this suite's split rules, including the
key/value copies past the groups), sharding stage 1 (optimizer states / D) or 2 (and gradients / D) over D
data-parallel ranks, full fine-tuning or LoRA. Activations use the transformer estimate of Korthikanti et al.
(2022), s*b*h*(10 + 24/t) + 5*a*s^2*b/t bytes per layer in half precision, plus the logits (half-precision
output, its fp32 copy when half, and the fp32 softmax) over the vocabulary shard; with recompute only each layer's input is kept.

The check: `finetune_generation.py` (the real path, under `paddle.distributed.launch` for t > 1) trains the mid
ChatGLM2 (4 layers, hidden 512, vocab 65024) and the tiny one in fp32 on CPU, in each layout (TP 1 / 2 / 4, 2
data-parallel replicas x TP 2, and the same with sharding stage 1), and reports each rank's peak RSS
(`metrics.json` train_peak_rss_mb). The tiny run measures what the framework itself holds at that degree; the
plan predicts the rest. Printed: planned vs measured per degree and their ratio.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GIB = 1024 ** 3
MODELS = {"ChatGLM-6B": "chatglm", "ChatGLM2-6B": "chatglm2", "ChatGLM3-6B": "chatglm3"}
LORA_LAYERS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")  # glm_family's LoRA targets
COLUMN_LAYERS = ("query_key_value", "dense_h_to_4h", "output_layer")  # split along their outputs
ROW_LAYERS = ("attention.dense", "self_attention.dense", "dense_4h_to_h")  # split along their inputs


@dataclass
class Recipe:
    degree: int = 1  # tensor parallel
    data_parallel: int = 1
    sharding: int = 0  # stage 0 (none), 1 (optimizer states), 2 (+ gradients), over the data-parallel ranks
    precision: str = "bf16"  # bf16 / fp16 (half weights, fp32 master + moments) or fp32
    method: str = "full"  # full / lora
    lora_rank: int = 8
    micro_batch: int = 1
    seq_len: int = 2048
    recompute: bool = False


# THUDM's config.json values where PaddleNLP's config defaults differ (its ChatGLMv2 default has 1 key/value
# group and no query_key_value bias).
SIX_B = {"chatglm": {},
         "chatglm2": {"multi_query_group_num": 2, "add_qkv_bias": True, "seq_length": 32768},
         "chatglm3": {"multi_query_group_num": 2, "add_qkv_bias": True, "seq_length": 8192}}
NOT_PARAMETERS = ("rotary_pos_emb.inv_freq", "lm_head.decoder_weight")  # a buffer; v1's head is the embedding


def full_shapes(generation: str, config=None) -> tuple:
    """(parameter name -> shape, config) of the model `config` describes, the 6B one by default."""
    from glm_tune.conversion.checkpoint_convert import expected_shapes
    from glm_tune.glm_family import get_generation

    if config is None:
        config = get_generation(generation).classes()[0](**SIX_B[generation])
    shapes = expected_shapes(config, generation)
    return {n: s for n, s in shapes.items() if not n.endswith(NOT_PARAMETERS)}, config


def shard_numel(name: str, shape: list, config, generation: str, degree: int) -> int:
    """Elements of `name` one rank holds at tensor parallel `degree`."""
    from glm_tune.tensor_parallel_layout import groups_of_rank

    numel = 1
    for n in shape:
        numel *= n
    if degree == 1:
        return numel
    layer = name.rsplit(".", 1)[0]
    if generation != "chatglm" and layer.endswith("self_attention.query_key_value"):
        groups, head_dim = config.multi_query_group_num, config.hidden_size // config.num_attention_heads
        columns = config.hidden_size // degree + 2 * head_dim * len(groups_of_rank(groups, degree, 0))
        return numel // shape[-1] * columns
    if "word_embeddings" in layer or layer.endswith(COLUMN_LAYERS):
        return numel // degree
    if layer.endswith(ROW_LAYERS) and name.endswith("weight"):
        return numel // degree
    return numel  # norms, row-layer biases: every rank holds them


def lora_numel(shapes: dict, config, generation: str, degree: int, rank: int) -> int:
    """Per-rank LoRA parameters: A (in x r) and B (r x out) per adapted layer, split as the layer is."""
    total = 0
    for name, shape in shapes.items():
        layer = name.rsplit(".", 1)[0]
        if not name.endswith("weight") or len(shape) != 2 or not layer.endswith(LORA_LAYERS):
            continue
        fan_in, fan_out = shape
        if layer.endswith(ROW_LAYERS):
            total += fan_in // degree * rank + rank * fan_out
        else:
            total += fan_in * rank + rank * shard_numel(name, shape, config, generation, degree) // fan_in
    return total


def activation_bytes(config, recipe: Recipe, vocab: int) -> float:
    s, b, h, t = recipe.seq_len, recipe.micro_batch, config.hidden_size, recipe.degree
    heads, layers = config.num_attention_heads, getattr(config, "num_layers", None) or config.num_hidden_layers
    per_layer = s * b * h * (10 + 24 / t) + 5 * heads * s * s * b / t
    layers_kept = s * b * h * 2 * layers + per_layer if recipe.recompute else per_layer * layers
    fp32 = recipe.precision == "fp32"
    # logits kept for the loss: the output itself (+ its fp32 copy when half) and the fp32 softmax
    logits = s * b * vocab / t * (4 + 4 if fp32 else 2 + 4 + 4)
    return layers_kept * (2 if fp32 else 1) + logits  # the layer estimate counts half-precision bytes


def plan(generation: str, recipe: Recipe, shapes_config=None) -> dict:
    """Bytes per rank: weights, gradients, optimizer, activations, total."""
    shapes, config = shapes_config or full_shapes(generation)
    per_rank = sum(shard_numel(n, s, config, generation, recipe.degree) for n, s in shapes.items())
    half = recipe.precision in ("bf16", "fp16")
    weight_bytes = 2 if half else 4
    trainable = per_rank if recipe.method == "full" else lora_numel(shapes, config, generation, recipe.degree,
                                                                     recipe.lora_rank)
    shard = max(recipe.data_parallel, 1) if recipe.sharding else 1
    weights = per_rank * weight_bytes + (trainable * weight_bytes if recipe.method == "lora" else 0)
    grads = trainable * weight_bytes / (shard if recipe.sharding >= 2 else 1)
    optimizer = trainable * (8 + (4 if half else 0)) / shard  # AdamW moments (+ fp32 master weights)
    vocab = getattr(config, "padded_vocab_size", None) or config.vocab_size
    activations = activation_bytes(config, recipe, vocab)
    return {"params_per_rank": per_rank, "trainable_per_rank": trainable, "weights": weights, "grads": grads,
            "optimizer": optimizer, "activations": activations,
            "total": weights + grads + optimizer + activations}


def gpus_needed(generation: str, gpu_gib: int, method: str, shapes_config, seq_len: int = 2048) -> str:
    """The smallest TP x sharding layout (1 to 8 GPUs) whose plan fits `gpu_gib` with a 1 GiB framework reserve
    and 10% allocator slack; micro-batch 1, recompute on, bf16."""
    for gpus in (1, 2, 4, 8):
        for degree in (d for d in (1, 2, 4, 8) if gpus % d == 0 and d <= gpus):
            dp = gpus // degree
            for stage in ((0,) if dp == 1 else (0, 1, 2)):
                recipe = Recipe(degree=degree, data_parallel=dp, sharding=stage, method=method, seq_len=seq_len,
                                recompute=True)
                need = plan(generation, recipe, shapes_config)["total"] * 1.1 + GIB
                if need <= gpu_gib * GIB:
                    return f"{gpus} (TP {degree}" + (f", DP {dp} sharding stage {stage}" if dp > 1 else "") + \
                        f"; {need / GIB:.1f} GiB each)"
    return "more than 8"


def print_table() -> None:
    print("Planned per-rank memory, GiB (bf16 weights, fp32 master weights and AdamW moments, micro-batch 1, "
          "sequence 2048, recompute):")
    print(f"{'model':<13}{'method':<7}{'TP':>3}{'stage':>6}{'DP':>4}{'weights':>9}{'grads':>8}{'optim':>8}"
          f"{'activ':>8}{'total':>8}")
    for name, generation in MODELS.items():
        shapes_config = full_shapes(generation)
        for method in ("full", "lora"):
            for degree, dp, stage in ((1, 1, 0), (2, 1, 0), (4, 1, 0), (8, 1, 0), (2, 2, 1), (2, 2, 2), (1, 8, 2)):
                r = plan(generation, Recipe(degree=degree, data_parallel=dp, sharding=stage, method=method,
                                            recompute=True), shapes_config)
                print(f"{name:<13}{method:<7}{degree:>3}{stage:>6}{dp:>4}" + "".join(
                    f"{r[k] / GIB:>{w}.2f}" for k, w in (("weights", 9), ("grads", 8), ("optimizer", 8),
                                                          ("activations", 8), ("total", 8))))
    print("\nGPUs needed (smallest layout that fits; 1 GiB framework reserve + 10% slack):")
    print(f"{'model':<13}{'method':<7}" + "".join(f"{g:<48}" for g in ("24 GB", "40 GB", "80 GB")))
    for name, generation in MODELS.items():
        shapes_config = full_shapes(generation)
        for method in ("full", "lora"):
            print(f"{name:<13}{method:<7}" + "".join(f"{gpus_needed(generation, g, method, shapes_config):<47} "
                                                    for g in (24, 40, 80)))


# ------------------------------------------------------------------------------------- measured check


# (name, tensor parallel degree, data-parallel replicas, sharding stage) of the measured layouts
LAYOUTS = {"tp1": (1, 1, 0), "tp2": (2, 1, 0), "tp4": (4, 1, 0), "tp2xdp2": (2, 2, 0), "tp2xdp2-stage1": (2, 2, 1)}


def run_finetune(model_dir: Path, data_dir: Path, out: Path, layout: tuple, batch: int, steps: int) -> list:
    degree, replicas, stage = layout
    argv = [str(ROOT / "finetune_generation.py"), "--model_name_or_path", str(model_dir), "--task_name_or_path",
            str(data_dir), "--output_dir", str(out), "--src_length", "64", "--tgt_length", "48",
            "--per_device_train_batch_size", str(batch), "--max_steps", str(steps), "--save_steps", "100000",
            "--logging_steps", "1", "--disable_tqdm", "True", "--report_to", "none", "--do_train",
            "--tensor_parallel_degree", str(degree)] + (["--sharding", f"stage{stage}"] if stage else [])
    processes = degree * replicas
    cmd = [sys.executable, *argv] if processes == 1 else [
        sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(processes), "--log_dir",
        str(out.parent / f"log_{out.name}"), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        logs = "".join(p.read_text(errors="replace")[-2000:] for p in (out.parent / f"log_{out.name}").glob("*"))
        raise RuntimeError(f"{' '.join(cmd[:6])} failed:\n{proc.stderr[-2000:]}{logs}")
    return json.loads((out / "metrics.json").read_text())["metrics"]["train_peak_rss_mb"]


def measured_check(layouts, batch: int, steps: int, work: Path) -> list:
    from tools.make_demo_data import make_demo_data
    from tools.make_tiny_model import make_tiny_model

    mid_sizes = {"hidden_size": 512, "num_layers": 4, "num_attention_heads": 8, "ffn_hidden_size": 1376,
                 "vocab_size": 65024}
    mid = make_tiny_model("chatglm2", work / "mid", sizes=mid_sizes)
    tiny = make_tiny_model("chatglm2", work / "tiny", sizes={"num_attention_heads": 8})
    data = make_demo_data(work / "data", num_train=batch * steps * 2, num_dev=4)
    rows = []
    for name in layouts:
        degree, replicas, stage = LAYOUTS[name]
        base = run_finetune(tiny, data, work / f"tiny_{name}", LAYOUTS[name], batch, steps)
        used = run_finetune(mid, data, work / f"mid_{name}", LAYOUTS[name], batch, steps)
        recipe = Recipe(degree=degree, data_parallel=replicas, sharding=stage, precision="fp32", micro_batch=batch,
                        seq_len=64 + 48)
        mid_plan = plan("chatglm2", recipe, full_shapes("chatglm2", _config(mid)))["total"]
        tiny_plan = plan("chatglm2", recipe, full_shapes("chatglm2", _config(tiny)))["total"]
        predicted = max(base) + (mid_plan - tiny_plan) / 2 ** 20
        rows.append({"layout": name, "measured_mb": max(used), "predicted_mb": predicted,
                     "framework_mb": max(base), "ratio": predicted / max(used)})
    return rows


def _config(model_dir: Path):
    from glm_tune.model_loading import load_config

    return load_config(str(model_dir), "chatglm2")


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help=f"layouts measured on the mid model, of: {', '.join(LAYOUTS)} (tpT: tensor parallel T; "
                             "xdp2: 2 data-parallel replicas; -stage1: optimizer states sharded over them)")
    parser.add_argument("--batch", type=int, default=4, help="micro-batch of the measured runs")
    parser.add_argument("--steps", type=int, default=3, help="training steps of the measured runs")
    parser.add_argument("--skip_measure", action="store_true", help="print the 6B plan only")
    parser.add_argument("--work_dir", default=None, help="scratch folder (default: a new temporary one)")
    args = parser.parse_args(argv)
    print_table()
    if args.skip_measure:
        return []
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="memory_plan_"))
    unknown = sorted(set(args.layouts.split(",")) - set(LAYOUTS))
    if unknown:
        parser.error(f"--layouts: unknown {unknown}; choose from {', '.join(LAYOUTS)}")
    rows = measured_check(args.layouts.split(","), args.batch, args.steps, work)
    print("\nPlan vs measured peak RSS per rank, mid ChatGLM2 (4 layers, hidden 512, vocab 65024), fp32 AdamW on CPU:")
    print(f"{'layout':<16}{'framework MB':>14}{'planned MB':>12}{'measured MB':>13}{'planned/measured':>18}")
    for r in rows:
        print(f"{r['layout']:<16}{r['framework_mb']:>14.0f}{r['predicted_mb']:>12.0f}{r['measured_mb']:>13.0f}"
              f"{r['ratio']:>18.2f}")
    return rows


if __name__ == "__main__":
    main()
