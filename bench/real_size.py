"""What a real 6B needs: every step of the pipeline on models with ChatGLM2-6B's layer shapes (hidden 4096, 32 heads,
2 key/value groups, ffn 13696, vocabulary 65024) and 2 and 3 layers, each step's peak RSS against the model's fp32
weight bytes W and its time, the per-layer slope from the two sizes, and the projection to the real 28 layers.

    python bench/real_size.py                               # 2 and 3 layers under build/real (~15 min, ~12 GB RAM)
    python bench/real_size.py --layers 2 --steps make,from_hf,export,infer
    python bench/real_size.py --input_dtype float16                 # the user's start: THUDM's float16 shards
    python bench/real_size.py --peer build/chatglm_cpp      # + chatglm.cpp's converter (f32, q8_0, q4_0), same folder
                                                            # (~27 GB of disk at 3 layers with the peer's files; each
                                                            # size's files are deleted once measured unless --keep)

Each step is its own process, run as a user would run the command, and measured by the kernel (the child's maximum
resident set from wait4; wall time around it). The model starts as a user's does: a Hugging Face folder sharded as
THUDM's repositories are (several model-0000K-of-0000N.safetensors), converted to Paddle, converted back, exported
(Paddle graph, ONNX, int8, int4), then every engine answers 3 prompts with 32 new tokens and the server one request.
The ONNX fp32 answers are checked against dygraph's (predict_generation.py) token for token.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # make_tiny_model.py flags; "tiny" only checks that the bench runs
    "6b": ["--model_type", "chatglm2", "--hidden_size", "4096", "--num_attention_heads", "32", "--ffn_hidden_size",
           "13696", "--vocab_size", "65024"],
    "tiny": ["--model_type", "chatglm2"],
}
STEPS = ("make", "from_hf", "to_hf", "lora", "export", "dygraph", "infer", "serve", "logits", "peer")
PROMPTS = ["类型#裙*风格#复古*图案#刺绣", "你好，请介绍一下你自己", "如何学习编程"]
GB = 2 ** 30  # GiB: the figures are printed in GiB


# Linux keeps ru_maxrss across exec: a command started straight from this process would report at least this
# process's own peak (the logits step loads engines here). A small launcher in between starts from its own
# fresh image, so the command's figure is its own.
LAUNCHER = ("import os, subprocess, sys\n"
            "child = subprocess.Popen(sys.argv[2:])\n"
            "_, status, usage = os.wait4(child.pid, 0)\n"
            "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
            "sys.exit(os.waitstatus_to_exitcode(status))\n")


def measured(argv, log: Path, env=None) -> dict:
    """Run one command; its peak RSS (GiB, the kernel's wait4 figure) and wall seconds. Exits with its log's tail
    on failure."""
    started = time.perf_counter()
    peak_file = log.with_suffix(".peak")
    with open(log, "w") as out:
        code = subprocess.call([sys.executable, "-c", LAUNCHER, peak_file, *map(str, argv)], cwd=ROOT, stdout=out,
                               stderr=subprocess.STDOUT, env=env)
    if code:
        sys.exit(f"error: {' '.join(map(str, argv[:3]))} failed; the end of {log}:\n" + log.read_text()[-2000:])
    return {"peak_gb": int(peak_file.read_text()) / 2 ** 20, "seconds": time.perf_counter() - started}


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def serve_once(export: Path, log: Path) -> dict:
    """serve_generation.py on the int8 graph: peak RSS after one answered request."""
    import urllib.request

    from tools.local_server import start_server

    started = time.perf_counter()
    proc, url = start_server(export, log, "--backend", "onnxruntime", "--precision", "int8", timeout=600)
    try:
        body = json.dumps({"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 32,
                           "temperature": 0}).encode()
        request = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=600).read()
        status = Path(f"/proc/{proc.pid}/status").read_text()
        peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 2 ** 20
    finally:
        proc.terminate()
        proc.wait(60)
    return {"peak_gb": peak, "seconds": time.perf_counter() - started}


def quantized_logits(export: Path) -> dict:
    """int8 / int4 against fp32 on ONNX Runtime: the prefill's last-position logits of the 3 prompts, max |diff|
    and whether the argmax agrees (one engine loaded at a time)."""
    import numpy as np
    from paddlenlp.transformers import AutoConfig, AutoTokenizer

    from data import get_prompt_format
    from glm_tune.deployment.inference_engine import create_engine
    from glm_tune.deployment.step_feeds import StepFeeds

    tokenizer, config = AutoTokenizer.from_pretrained(str(export)), AutoConfig.from_pretrained(str(export))
    fmt = get_prompt_format("chatglm2", tokenizer)
    feeds = StepFeeds(tokenizer, "chatglm2", config)
    logits = {}
    for precision in ("fp32", "int8", "int4"):
        engine = create_engine("onnxruntime", export, "chatglm", 2, precision)
        logits[precision] = np.concatenate([engine(feeds.prefill([fmt.prompt_ids(p, [], 64)]))[0][:, -1] for p in PROMPTS])
        del engine
    return {p: {"max_abs_diff": float(np.abs(logits[p] - logits["fp32"]).max()),
                "argmax_agrees": int((logits[p].argmax(-1) == logits["fp32"].argmax(-1)).sum()),
                "of": len(PROMPTS)} for p in ("int8", "int4")}


def run_size(layers: int, args) -> dict:
    py = sys.executable
    work = args.work_dir / (f"{args.shape}-{layers}l" + ("" if args.input_dtype == "float32" else f"-{args.input_dtype}"))
    work.mkdir(parents=True, exist_ok=True)
    hf, paddle, back, export = work / "hf", work / "paddle", work / "hf-back", work / "infer"
    prompts = work / "prompts.json"
    prompts.write_text("".join(json.dumps({"content": p}, ensure_ascii=False) + "\n" for p in PROMPTS),
                       encoding="utf-8")
    rows = {}

    def step(name, argv, env=None):
        if name.split(":")[0] in args.steps:
            rows[name] = measured(argv, work / f"{name.replace(':', '-')}.log", env)
            print(f"  {layers} layers, {name}: {rows[name]['peak_gb']:.2f} GiB, {rows[name]['seconds']:.0f} s",
                  flush=True)

    step("make", [py, "tools/make_tiny_model.py", *SHAPES[args.shape], "--num_layers", layers, "--format", "hf",
                  "--max_shard_size", "1GB", "--dtype", args.input_dtype, "--output_dir", hf, "--overwrite"])
    step("from_hf", [py, "tools/convert_checkpoint.py", "--input_dir", hf, "--output_dir", paddle, "--overwrite"])
    step("to_hf", [py, "tools/convert_checkpoint.py", "--input_dir", paddle, "--output_dir", back, "--to", "hf",
                   "--overwrite"])
    shutil.rmtree(back, ignore_errors=True)  # only measured: a 6B's copy would take 25 GB of disk
    if "lora" in args.steps:  # 2 LoRA steps on the demo data, then the adapter merged into an export
        data = work / "data" / "AdvertiseGen"
        subprocess.run([py, "tools/make_demo_data.py", "--output_dir", data, "--overwrite"], cwd=ROOT, check=True,
                       capture_output=True)
        step("lora", [py, "finetune_generation.py", "--model_name_or_path", paddle, "--task_name_or_path", data,
                      "--output_dir", work / "lora", "--lora", "True", "--max_steps", "2", "--src_length", "32",
                      "--tgt_length", "32", "--per_device_train_batch_size", "1", "--learning_rate", "1e-4",
                      "--logging_steps", "1", "--save_steps", "1000", "--report_to", "none", "--disable_tqdm", "True",
                      "--do_train", "--overwrite_output_dir", "True"])
        step("lora:merge+export", [py, "export_generation_model.py", "--model_name_or_path", paddle, "--lora_path",
                              work / "lora", "--output_path", work / "infer-lora" / "chatglm", "--onnx", "False",
                              "--overwrite", "True"])
        shutil.rmtree(work / "infer-lora", ignore_errors=True)
    step("export", [py, "export_generation_model.py", "--model_name_or_path", paddle, "--output_path",
                    export / "chatglm", "--quantize", "int8,int4", "--src_length", "64", "--tgt_length", "32",
                    "--overwrite", "True"])
    step("dygraph", [py, "predict_generation.py", "--model_name_or_path", paddle, "--data_file", prompts,
                     "--output_file", work / "dygraph.json", "--src_length", "64", "--tgt_length", "32",
                     "--overwrite", "True"])
    for backend, precision in (("paddle", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"),
                               ("onnxruntime", "int4")):
        step(f"infer:{backend}-{precision}", [
            py, "infer_generation.py", "--model_path", export, "--backend", backend, "--precision", precision,
            "--data_file", prompts, "--output_file", work / f"{backend}-{precision}.json", "--overwrite", "True"])
    if "serve" in args.steps:
        rows["serve:int8"] = serve_once(export, work / "serve.log")
        print(f"  {layers} layers, serve:int8: {rows['serve:int8']['peak_gb']:.2f} GiB", flush=True)
    logits = None
    if "logits" in args.steps:  # in a process of its own: the engines would raise this one's peak (see LAUNCHER)
        out = subprocess.run([sys.executable, __file__, "--logits_of", export], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
        logits = json.loads(out.strip().splitlines()[-1])
    parity = None
    if (work / "dygraph.json").is_file() and (work / "onnxruntime-fp32.json").is_file():
        parity = (work / "dygraph.json").read_bytes() == (work / "onnxruntime-fp32.json").read_bytes()
    weight_gb = weight_bytes(hf) / GB * (1 if args.input_dtype == "float32" else 2)  # W: the fp32 bytes
    # A size's copies take ~22 GB (2 layers) to ~27 GB (3) of disk with the peer's: each goes once it is not needed.
    if not args.keep:
        shutil.rmtree(paddle, ignore_errors=True)
        shutil.rmtree(export, ignore_errors=True)
    if args.peer and "peer" in args.steps:
        env = {**os.environ, "PEER": str(Path(args.peer).resolve())}
        rows["chatglm.cpp convert"] = measured([py, ROOT.parent / "shared" / "peers" / "chatglm_cpp" / "to_ggml.py",
                                                hf, work / "ggml"], work / "peer-convert.log", env)
        print(f"  {layers} layers, chatglm.cpp convert: {rows['chatglm.cpp convert']['peak_gb']:.2f} GiB", flush=True)
    if not args.keep:
        shutil.rmtree(hf, ignore_errors=True)
        for ggml in work.glob("ggml-*.bin"):
            ggml.unlink()
    result = {"layers": layers, "weight_gb": weight_gb, "steps": rows, "onnx_fp32_equals_dygraph": parity,
              "quantized_logits": logits}
    (work / "result.json").write_text(json.dumps(result, indent=1))
    return result


def fits(peak_gib: float, machine_gb: int) -> bool:
    """A peak fits a machine of `machine_gb` GB when it leaves 10% of it to the system and the page cache."""
    return peak_gib * 2 ** 30 <= 0.9 * machine_gb * 1e9


def report(sizes: list) -> None:
    print("\nstep                      " + "".join(f"{s['layers']} layers: peak GiB (x W), s     " for s in sizes)
          + ("28 layers (projected): peak GiB, fits a 32 / 64 GB machine" if len(sizes) == 2 else ""))
    names = [n for n in sizes[0]["steps"] if all(n in s["steps"] for s in sizes)]
    for name in names:
        line = f"{name:<26}"
        for s in sizes:
            row = s["steps"][name]
            line += f"{row['peak_gb']:>8.2f} ({row['peak_gb'] / s['weight_gb']:.2f}x) {row['seconds']:>7.0f}       "
        if len(sizes) == 2:
            a, b = sizes
            slope = (b["steps"][name]["peak_gb"] - a["steps"][name]["peak_gb"]) / (b["layers"] - a["layers"])
            projected = a["steps"][name]["peak_gb"] + slope * (28 - a["layers"])
            if slope < 0:  # a constant cost (casts, runtime) hides the growth at 2-3 layers: no line to draw
                line += f"{'n/a':>8}   (the peak fell with a layer more)"
            else:
                line += f"{projected:>8.1f}   " + " / ".join("yes" if fits(projected, ram) else "no" for ram in (32, 64))
        print(line)
    for s in sizes:
        print(f"{s['layers']} layers: W = {s['weight_gb']:.2f} GiB fp32; ONNX fp32 answers equal dygraph's: "
              f"{s['onnx_fp32_equals_dygraph']}; last-position logits against fp32: " + ", ".join(
                  f"{p} max |diff| {v['max_abs_diff']:.4f}, argmax {v['argmax_agrees']}/{v['of']}"
                  for p, v in (s["quantized_logits"] or {}).items()))
    if len(sizes) == 2:
        a, b = sizes
        per_layer = (b["weight_gb"] - a["weight_gb"]) / (b["layers"] - a["layers"])
        print(f"28 layers: W = {a['weight_gb'] + per_layer * (28 - a['layers']):.1f} GiB fp32 "
              f"({per_layer:.2f} GiB a layer)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="2,3", help="comma-separated numbers of layers (two give the slope)")
    parser.add_argument("--shape", default="6b", choices=sorted(SHAPES), help="layer shapes (tiny: a quick check)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    parser.add_argument("--peer", default=None, help="folder chatglm.cpp was built into: its converter measured too")
    parser.add_argument("--work_dir", default="build/real", help="where the models and exports go")
    parser.add_argument("--input_dtype", default="float32", choices=["float32", "float16"],
                        help="dtype of the Hugging Face folder the pipeline starts from (THUDM ships float16); the "
                             "conversion keeps it, the export and dygraph steps load it as float32. W stays the "
                             "fp32 bytes")
    parser.add_argument("--keep", action="store_true",
                        help="keep each size's model, conversions and exports (default: deleted once measured)")
    parser.add_argument("--logits_of", default=None, help=argparse.SUPPRESS)  # one export, in its own process
    args = parser.parse_args(argv)
    if args.logits_of:
        print(json.dumps(quantized_logits(Path(args.logits_of))))
        return
    args.work_dir = (ROOT / args.work_dir).resolve()
    args.steps = set(args.steps.split(","))
    sizes = [run_size(int(n), args) for n in args.layers.split(",")]
    report(sizes)
    print(json.dumps(sizes), file=sys.stderr)


if __name__ == "__main__":
    main()
