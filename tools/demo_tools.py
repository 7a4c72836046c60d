"""`make demo-tools`: ChatGLM3 tool use end to end on a tiny model, on CPU: tune, score, export, serve, call.

    python tools/demo_tools.py --work_dir build/demo-tools [--max_steps 2000] [--nproc_per_node 2] [--lora False]

Steps, each through the project's own scripts as a user runs them:
  1. tools/make_demo_data.py --kind tools   weather / calculator / unit-conversion conversations (zh + en)
  2. tools/make_tiny_model.py               a random tiny ChatGLM3 whose tokenizer also learned tool text
  3. finetune_generation.py                 dev tool-call accuracy of the untrained model
  4. finetune_generation.py                 fine-tuning on the conversations (data parallel over --nproc_per_node
                                            CPU processes through paddle.distributed.launch), then the same scores
  5. export_generation_model.py             the tuned model as a step graph (Paddle + ONNX)
  6. serve_generation.py + openai client    the model returns tool_calls; the client runs the tool, sends the
                                            result back as a `tool` message and prints the final answer
"""
import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from glm_tune.errors import run_cli
from glm_tune.safe_output import check_output_dir, write_owner
from tools.demo import run
from tools.local_server import start_server
from tools.tool_use_data import TOOLS, run_tool

COMMAND = "demo_tools"
SCORES = ["tool-name-acc", "tool-args-em", "rouge-1", "bleu-4"]
# Numbers inside the data's range (1-99): asked 128 times 7, the tiny model called calculator(a=18, ...).
QUESTIONS = ["上海今天天气怎么样？", "What is 64 times 7?", "Convert 42 km to mile."]
GLOBAL_BATCH = 16  # examples per training step, however many processes share it


def finetune_args(model_dir, data_dir, output_dir, args) -> list:
    return ["finetune_generation.py", "--model_name_or_path", model_dir, "--task_name_or_path", data_dir,
            "--output_dir", output_dir, "--model_type", "chatglm3", "--src_length", "256", "--tgt_length", "64",
            "--per_device_train_batch_size", str(GLOBAL_BATCH // args.nproc_per_node),
            "--per_device_eval_batch_size", "25", "--do_eval", "--do_generation", "True", "--max_eval_samples",
            str(args.eval_samples), "--disable_tqdm", str(args.disable_tqdm), "--logging_steps", "20",
            "--report_to", "none", "--overwrite_output_dir", "True"]


def scores(output_dir: Path) -> dict:
    metrics = json.loads((output_dir / "metrics.json").read_text(encoding="utf-8"))["metrics"]
    return {k: metrics.get(f"eval_{k}", float("nan")) for k in SCORES}


def serve(export_dir: Path, log_file: Path):
    return start_server(export_dir, log_file, "--backend", "onnxruntime", "--precision", "fp32")


def tool_round_trip(url: str, question: str) -> dict:
    """Ask, run the tool the model calls, send its result back, return what happened."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="demo", max_retries=0, timeout=300)
    tools = [{"type": "function", "function": tool} for tool in TOOLS]
    messages = [{"role": "user", "content": question}]
    model = client.models.list().data[0].id  # the server answers only the model it serves
    reply = client.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=64).choices[0]
    if reply.finish_reason != "tool_calls":
        return {"question": question, "call": None, "answer": reply.message.content}
    call = reply.message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    try:
        result = run_tool(call.function.name, arguments)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, StopIteration) as err:
        result = {"error": f"{type(err).__name__}: {err}"}
    messages += [reply.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result, ensure_ascii=False)}]
    final = client.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=64)
    return {"question": question, "call": f"{call.function.name}({call.function.arguments})", "result": result,
            "answer": final.choices[0].message.content}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="build/demo-tools", help="where data, models and outputs go")
    parser.add_argument("--max_steps", type=int, default=2000, help=f"training steps (batch {GLOBAL_BATCH})")
    parser.add_argument("--nproc_per_node", type=int, default=2, choices=[1, 2, 4, 8, 16],
                        help=f"data-parallel CPU processes for fine-tuning (each takes {GLOBAL_BATCH} / N of a batch; "
                             "Paddle's CPU training uses about one core per process)")
    parser.add_argument("--num_train", type=int, default=4000, help="training conversations generated")
    parser.add_argument("--learning_rate", default="3e-3", help="peak learning rate")
    parser.add_argument("--lora", default="False", help="LoRA instead of full fine-tuning (True/False)")
    parser.add_argument("--eval_samples", type=int, default=100, help="dev conversations scored (each: a call "
                                                                       "and a final answer)")
    parser.add_argument("--disable_tqdm", default="False", help="hide progress bars (True/False)")
    parser.add_argument("--overwrite", action="store_true",
                        help="use an existing --work_dir that no tools demo made (its outputs are replaced)")
    args = parser.parse_args(argv)
    work = check_output_dir((ROOT / args.work_dir).resolve(), COMMAND, "--work_dir", overwrite=args.overwrite)
    write_owner(work, COMMAND)
    data_dir, model_dir = work / "data" / "tools", work / "models" / "tiny-chatglm3-tools"
    before_dir, out_dir, export_dir = work / "eval_before", work / "output", work / "infer"
    started = time.time()

    run("1. tool-use data", ["tools/make_demo_data.py", "--output_dir", data_dir, "--kind", "tools",
                             "--num_train", args.num_train, "--overwrite"])
    run("2. tiny ChatGLM3", ["tools/make_tiny_model.py", "--model_type", "chatglm3", "--output_dir", model_dir,
                             "--tokenizer_corpus", "adgen,tools", "--overwrite"])
    run("3. score the untrained model", finetune_args(model_dir, data_dir, before_dir, args))
    launch = ["-m", "paddle.distributed.launch", "--nproc_per_node", args.nproc_per_node, "--log_dir",
              work / "launch_logs"] if args.nproc_per_node > 1 else []
    run("4. fine-tune", launch + finetune_args(model_dir, data_dir, out_dir, args) + [  # one eval: at the end
        "--do_train", "--max_steps", args.max_steps, "--learning_rate", args.learning_rate, "--warmup_steps", "20",
        "--lora", args.lora, "--eval_steps", 10 * args.max_steps, "--save_steps", args.max_steps])
    tuned = ["--model_name_or_path", model_dir, "--lora_path", out_dir] if args.lora == "True" else [
        "--model_name_or_path", out_dir]
    run("5. export", ["export_generation_model.py", *tuned, "--output_path", export_dir / "chatglm",
                      "--src_length", "256", "--tgt_length", "64", "--overwrite", "True"])
    print("\n=== 6. serve and call tools through the openai client", flush=True)
    proc, url = serve(export_dir, work / "server.log")
    try:
        trips = [tool_round_trip(url, q) for q in QUESTIONS]
    finally:
        proc.terminate()
        proc.wait(30)
    for trip in trips:
        print(f"user: {trip['question']}\n  tool call: {trip['call']}\n  tool result: {trip.get('result')}\n"
              f"  answer: {trip['answer']}")
    before, after = scores(before_dir), scores(out_dir)
    print(f"\n=== dev tool calls ({args.eval_samples} conversations, {args.max_steps} steps, "
          f"{time.time() - started:.0f}s in all)")
    print(f"{'score':<15}{'before':>10}{'after':>10}")
    for key in SCORES:
        print(f"{key:<15}{before[key]:>10.2f}{after[key]:>10.2f}")
    print(f"\nfine-tuned: {out_dir}\nexported:   {export_dir} (python serve_generation.py --model_path {export_dir})")
    return {"before": before, "after": after, "trips": trips}


if __name__ == "__main__":
    run_cli(main)
