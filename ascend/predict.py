"""Answer questions with a GLM2 / ChatGLM3 checkpoint through MindFormers' generate, in THUDM's chat format.

    python ascend/predict.py --model_dir ./chatglm2-6b --load_checkpoint glm2_6b.ckpt --query "你好"
    python ascend/predict.py --model_dir ./chatglm2-6b --input_file dev.json --output_file answers.jsonl

--input_file takes the suite's data formats (AdvertiseGen content, instruction/input); the answers are written
as JSON lines {"query", "answer", "token_ids"}.
"""
from launch import parser_for, run
from recipe import add_seq_length_argument


def main(argv=None):
    parser = parser_for(__doc__, "predict_glm2_6b.yaml")
    add_seq_length_argument(parser)
    parser.add_argument("--query", action="append", default=[], help="a question (repeatable)")
    parser.add_argument("--input_file", help="questions in any format the suite reads (data.py)")
    parser.add_argument("--output_file", help="where to write the answers (JSON lines); printed otherwise")
    parser.add_argument("--max_new_tokens", type=int, help="answer tokens at most (default: up to max_decode_length)")

    def body(config, args):
        import json

        import tasks
        from data import read_examples
        from glm_tune.safe_output import atomic_write_text

        queries = list(args.query)
        if args.input_file:
            queries += [example.src for example in read_examples(args.input_file, require_target=False)]
        if not queries:
            parser.error("give --query or --input_file")
        results = tasks.predict(config, queries, args.max_new_tokens)
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
        if args.output_file:
            atomic_write_text(args.output_file, lines)
            print(f"wrote {len(results)} answers to {args.output_file}")
        else:
            print(lines, end="")
        return results

    return run(parser, "predict", body, argv)


if __name__ == "__main__":
    main()
