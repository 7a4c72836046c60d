"""Decode speed: dygraph `generate` vs the exported step graph on Paddle Inference, same weights, same prompt ids.

    python bench/decode_throughput.py                      # tiny and mid (4 layers, hidden 512, vocab 65024) ChatGLM2
    python bench/decode_throughput.py --sizes mid --new_tokens 64 --model_type chatglm3

First-token latency (prefill of the prompt) and decode tokens/s (tokens after the first) are measured
separately, with generation forced to run the full length. Prints each system and the engine/dygraph ratios.
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    "tiny": {"hidden_size": 128, "num_layers": 2, "num_attention_heads": 4, "ffn_hidden_size": 256, "vocab_size": None},
    "mid": {"hidden_size": 512, "num_layers": 4, "num_attention_heads": 8, "ffn_hidden_size": 1024, "vocab_size": 65024},
}


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def dygraph_times(model, tokenizer, generation, prompt, new_tokens, repeats):
    import paddle

    from data import DataCollator

    batch = {k: paddle.to_tensor(v) for k, v in DataCollator(tokenizer, generation)([{"input_ids": prompt}]).items()}

    def gen(n):
        with paddle.no_grad():
            out = model.generate(**batch, max_new_tokens=n, min_new_tokens=n, decode_strategy="greedy_search",
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 use_cache=True)
        return out[0].numpy()

    gen(2)  # warm-up
    first = best_of(lambda: gen(1), repeats)
    full = best_of(lambda: gen(new_tokens), repeats)
    return first, (new_tokens - 1) / (full - first)


def engine_times(engine, feeds_builder, prompt, new_tokens, repeats):
    def run(n):
        feeds = feeds_builder.prefill([prompt])
        for step in range(n):
            logits, cache_k, cache_v = engine(feeds)
            if step + 1 < n:
                feeds = feeds_builder.advance(feeds, logits.argmax(-1), cache_k, cache_v)

    run(2)
    first = best_of(lambda: run(1), repeats)
    full = best_of(lambda: run(new_tokens), repeats)
    return first, (new_tokens - 1) / (full - first)


def measure(size_name, args):
    import export_generation_model
    from argument import DataArgument
    from glm_tune.deployment.inference_engine import PaddleInferenceEngine
    from glm_tune.deployment.step_model import StepFeeds
    from tools.make_tiny_model import build_tiny_model

    model, tokenizer = build_tiny_model(args.model_type, sizes=SIZES[size_name])
    model.eval()
    out = Path(args.work_dir) / f"{size_name}-{args.model_type}" / "chatglm"
    export_generation_model.export(model, args.model_type, tokenizer, out, "float32", DataArgument())
    engine = PaddleInferenceEngine(out.parent, "chatglm", threads=args.threads)
    feeds = StepFeeds(tokenizer, args.model_type, model.config)
    from data import get_prompt_format

    prompt = get_prompt_format(args.model_type, tokenizer).prompt_ids("类型#上衣*材质#牛仔布*颜色#白色*风格#简约")
    dy = dygraph_times(model, tokenizer, args.model_type, prompt, args.new_tokens, args.repeats)
    en = engine_times(engine, feeds, prompt, args.new_tokens, args.repeats)
    return dy, en, len(prompt)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_type", default="chatglm2", choices=["chatglm", "chatglm2", "chatglm3"],
                        help="architecture to measure")
    parser.add_argument("--sizes", default="tiny,mid", help="comma-separated: tiny, mid")
    parser.add_argument("--new_tokens", type=int, default=48, help="tokens generated per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--threads", type=int, default=2, help="engine CPU threads")
    parser.add_argument("--work_dir", default="build/bench", help="where the exported graphs go")
    args = parser.parse_args(argv)
    rows = []
    for size in args.sizes.split(","):
        (dy_first, dy_rate), (en_first, en_rate), prompt_len = measure(size.strip(), args)
        rows.append((size, prompt_len, dy_first, dy_rate, en_first, en_rate))
    print(f"\n{args.model_type}, {args.new_tokens} new tokens, greedy, batch 1, {args.threads} threads, fp32")
    print(f"{'size':<6}{'prompt':>7}{'dygraph 1st ms':>16}{'dygraph tok/s':>15}{'engine 1st ms':>15}"
          f"{'engine tok/s':>14}{'decode x':>10}{'1st-token x':>13}")
    for size, plen, dyf, dyr, enf, enr in rows:
        print(f"{size:<6}{plen:>7}{dyf * 1000:>16.1f}{dyr:>15.1f}{enf * 1000:>15.1f}{enr:>14.1f}"
              f"{enr / dyr:>10.2f}{dyf / enf:>13.2f}")


if __name__ == "__main__":
    main()
