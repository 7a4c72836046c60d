"""Generation eval of a GLM2 / ChatGLM3 checkpoint on AdvertiseGen-shaped data: ROUGE-1/2/L and BLEU-4 as THUDM
computes them (the Paddle suite's metric), with MindFormers' generate.

    python ascend/evaluate.py --config ascend/configs/eval_glm2_6b.yaml --model_dir ./chatglm2-6b \
        --load_checkpoint output/checkpoint/rank_0/glm2-6b_rank_0-1_1000.ckpt --eval_data AdvertiseGen/dev.json

Writes output_dir/eval_predictions.jsonl and output_dir/eval_metrics.json.
"""
from launch import parser_for, run
from recipe import add_seq_length_argument


def main(argv=None):
    parser = parser_for(__doc__, "eval_glm2_6b.yaml")
    add_seq_length_argument(parser)
    parser.add_argument("--eval_data", help="AdvertiseGen-shaped JSON lines (content/summary)")
    parser.add_argument("--max_decode_length", type=int, help="prompt + answer tokens at most (recipe: 256)")

    def body(config, args):
        import json

        import tasks

        scores = tasks.evaluate(config)
        print(json.dumps(scores))
        return scores

    return run(parser, "eval", body, argv)


if __name__ == "__main__":
    main()
