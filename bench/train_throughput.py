"""Training throughput and peak memory: full fine-tuning vs LoRA on the same mid-size ChatGLM, same run, on CPU.

    python bench/train_throughput.py                       # ChatGLM2, 4 layers, hidden 512, vocab 65024
    python bench/train_throughput.py --steps 10 --hidden_size 256 --vocab_size 0

Each mode runs in its own process (peak RSS is per process) through the same steps as finetune_generation.py:
data.py features, DataCollator batches, AdamW, forward/backward/step. Prints tokens/s and peak RSS per mode
and the LoRA/full ratios.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from memory import peak_rss_mb


def measure(args) -> dict:
    import paddle

    from data import DataCollator, get_prompt_format, read_examples, tokenize_example
    from glm_tune.model_loading import apply_lora
    from tools.make_demo_data import make_demo_data
    from tools.make_tiny_model import build_tiny_model

    sizes = {"hidden_size": args.hidden_size, "num_layers": args.num_layers, "num_attention_heads": 8,
             "ffn_hidden_size": args.hidden_size * 2, "vocab_size": args.vocab_size or None}
    model, tokenizer = build_tiny_model(args.model_type, sizes=sizes)
    if args.mode == "lora":
        model = apply_lora(model, args.model_type, rank=8, alpha=16)
    model.train()
    data_dir = make_demo_data(Path(args.work_dir) / "data", num_train=args.batch_size * (args.steps + args.warmup),
                              num_dev=1)
    fmt = get_prompt_format(args.model_type, tokenizer)
    feats = [tokenize_example(fmt, e, 64, 48) for e in read_examples(data_dir / "train.json")]
    collate = DataCollator(tokenizer, args.model_type)
    batches = [collate(feats[i:i + args.batch_size]) for i in range(0, len(feats), args.batch_size)]
    params = [p for p in model.parameters() if not p.stop_gradient]
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=params)
    tokens, elapsed = 0, 0.0
    for step, batch in enumerate(batches[: args.warmup + args.steps]):
        inputs = {k: paddle.to_tensor(v) for k, v in batch.items()}
        started = time.perf_counter()
        loss = model(**inputs, use_cache=False, return_dict=True).loss
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        float(loss)  # waits for the step to finish
        if step >= args.warmup:
            elapsed += time.perf_counter() - started
            tokens += int((batch["attention_mask"] != 0).sum()) if batch["attention_mask"].ndim == 2 else \
                int((batch["input_ids"] != tokenizer.pad_token_id).sum())
    return {"mode": args.mode, "tokens_per_s": tokens / elapsed, "peak_rss_mb": peak_rss_mb(),
        "trainable_params": int(sum(p.size for p in params)),
        "total_params": int(sum(p.size for p in model.parameters()))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_type", default="chatglm2", choices=["chatglm", "chatglm2", "chatglm3"],
                        help="architecture to measure")
    parser.add_argument("--hidden_size", type=int, default=512, help="model width")
    parser.add_argument("--num_layers", type=int, default=4, help="transformer blocks")
    parser.add_argument("--vocab_size", type=int, default=65024, help="output rows (0: the tiny tokenizer's)")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per step")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--work_dir", default="build/bench", help="scratch folder for data")
    parser.add_argument("--mode", choices=["full", "lora"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode:
        print(json.dumps(measure(args)))
        return
    results = {}
    for mode in ("full", "lora"):
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--mode", mode]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "GLOG_v": "0"})
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{args.model_type} {args.num_layers} layers, hidden {args.hidden_size}, vocab {args.vocab_size or 'tiny'}, "
          f"batch {args.batch_size}, {args.steps} timed steps")
    print(f"{'mode':<6}{'tokens/s':>12}{'peak RSS MB':>14}{'trainable':>14}")
    for mode, r in results.items():
        print(f"{mode:<6}{r['tokens_per_s']:>12.1f}{r['peak_rss_mb']:>14.0f}{r['trainable_params']:>14,}")
    full, lora = results["full"], results["lora"]
    print(f"LoRA/full: throughput x{lora['tokens_per_s'] / full['tokens_per_s']:.2f}, "
          f"peak RSS x{lora['peak_rss_mb'] / full['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
