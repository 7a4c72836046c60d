"""Prediction, TP-shard merging, export and the C++ engine, for all three generations on tiny models."""
import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import paddle
import pytest

import export_generation_model
import finetune_generation
import infer_generation
import predict_generation
from data import Example, read_examples
from glm_tune.glm_family import get_generation
from glm_tune.model_loading import load_model, load_tokenizer
from glm_tune.conversion.tp_merge import ShardMergeError, merge_tp_shards

from .conftest import GENERATIONS
from .test_finetune import batch_logits, finetune_argv

ROOT = Path(__file__).resolve().parents[1]


def varied_prompts(demo_data, count=24):
    """Dev prompts of varied length, a few with history, and short chat prompts."""
    dev = read_examples(demo_data / "dev.json")[:count - 4]
    return dev + [Example("你好"), Example("晚上睡不着应该怎么办", history=[("你好", "你好！")]),
                  Example("类型#裙", history=[("类型#上衣*颜色#白色", "这款衬衫白色调清爽干净。")] * 2),
                  Example("a" * 3)]


def predict_argv(model_dir, **extra):
    argv = ["--model_name_or_path", str(model_dir), "--src_length", "96", "--tgt_length", "24"]
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    return argv


def write_prompts(path, examples):
    path.write_text("".join(json.dumps({"content": e.src, "history": [list(h) for h in e.history]},
                                       ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("model_type", GENERATIONS)
def test_batched_generation_equals_one_by_one(model_type, trained, demo_data, tmp_path):
    examples = varied_prompts(demo_data, 12)
    data_file = write_prompts(tmp_path / "prompts.json", examples)
    batched = predict_generation.main(predict_argv(trained(model_type), data_file=data_file, batch_size=6))
    single = predict_generation.main(predict_argv(trained(model_type), data_file=data_file, batch_size=1))
    assert batched == single
    assert len(set(batched)) > 3  # the answers differ with the prompt, so equality is informative


@pytest.mark.slow
@pytest.mark.parametrize("model_type", GENERATIONS)
def test_exported_engine_is_token_identical_to_dygraph(model_type, trained, demo_data, tmp_path):
    examples = varied_prompts(demo_data, 24)
    data_file = write_prompts(tmp_path / "prompts.json", examples)
    dy_file, engine_file = tmp_path / "dygraph.json", tmp_path / "engine.json"
    predictor = predict_generation.build_predictor(*predict_generation.parse_arguments(
        predict_argv(trained(model_type), batch_size=4)))
    dygraph_ids = predictor.predict_ids(examples)
    predict_generation.main(predict_argv(trained(model_type), data_file=data_file, output_file=dy_file, batch_size=4))

    out = export_generation_model.main(["--model_name_or_path", str(trained(model_type)), "--output_path",
                                        str(tmp_path / "infer" / "chatglm"), "--src_length", "96",
                                        "--tgt_length", "24"])
    info = json.loads((out.parent / "chatglm.generation.json").read_text())
    assert info["generation"] == model_type and info["inputs"][0] == "input_ids"
    assert set(info["formats"]) == {"paddle", "onnx"}
    assert sum(len(ids) for ids in dygraph_ids) > 100
    for backend in ("paddle", "onnxruntime"):
        for batch_size in ("4", "1"):  # batched and one by one: padding must not change a row's tokens
            engine_predictor = infer_generation.build_predictor(*infer_generation.parse_arguments(
                ["--model_path", str(out.parent), "--model_prefix", "chatglm", "--batch_size", batch_size,
                 "--backend", backend, "--precision", "fp32"]))
            assert engine_predictor.predict_ids(examples) == dygraph_ids, (backend, batch_size)
        infer_generation.main(["--model_path", str(out.parent), "--model_prefix", "chatglm", "--data_file",
                               str(data_file), "--output_file", str(engine_file), "--batch_size", "4",
                               "--backend", backend, "--precision", "fp32"])
        assert engine_file.read_bytes() == dy_file.read_bytes(), backend


@pytest.mark.slow
def test_interactive_mode_answers_and_keeps_history(trained, tmp_path):
    import io

    out = export_generation_model.main(["--model_name_or_path", str(trained("chatglm3")), "--output_path",
                                        str(tmp_path / "chatglm"), "--tgt_length", "8"])
    predictor = infer_generation.build_predictor(*infer_generation.parse_arguments(
        ["--model_path", str(out.parent), "--model_prefix", "chatglm"]))
    seen = []
    original = predictor.predict
    predictor.predict = lambda examples: seen.append(examples[0]) or original(examples)
    stdout = io.StringIO()
    infer_generation.chat(predictor, io.StringIO("你好\n类型#裙\nclear\n你好\nexit\n"), stdout)
    assert stdout.getvalue().count("ChatGLM: ") == 3
    assert [len(e.history) for e in seen] == [0, 1, 0]
    assert seen[1].history[0][0] == "你好"


# ------------------------------------------------------------------------------------------- TP merging


def split_into_shards(model_dir, out_dir, degree=2):
    """Write `model_dir` as a tensor-parallel checkpoint with PaddleNLP's own split functions."""
    from glm_tune.glm_family import detect_generation, get_generation

    generation = detect_generation(model_dir)
    config_class, model_class, _ = get_generation(generation).classes()
    config = config_class.from_pretrained(str(model_dir))
    config.tensor_parallel_degree = degree
    state = paddle.load(str(Path(model_dir) / "model_state.pdparams"), return_numpy=True)
    prefix = model_class.base_model_prefix + "."
    shutil.copytree(model_dir, out_dir)
    (Path(out_dir) / "model_state.pdparams").unlink()
    for rank in range(degree):
        config.tensor_parallel_rank = rank
        fns = model_class._get_tensor_parallel_mappings(config, is_split=True)
        shard = {}
        for name, value in state.items():
            fn = fns.get(name) or fns.get(name[len(prefix):])
            # PaddleNLP's ChatGLM2 split functions concatenate with paddle ops: give them tensors.
            part = fn(paddle.to_tensor(value)) if fn else value
            shard[name] = np.asarray(part.numpy() if hasattr(part, "numpy") else part)
        paddle.save(shard, str(Path(out_dir) / f"model_state.tp{rank:02d}.pdparams"))
    cfg = json.loads((Path(out_dir) / "config.json").read_text())
    cfg["tensor_parallel_degree"] = degree
    (Path(out_dir) / "config.json").write_text(json.dumps(cfg))
    return Path(out_dir)


def assert_same_weights(model_dir, merged_dir):
    """The merged checkpoint holds exactly the tensors the single-shard one does, bit for bit."""
    original = paddle.load(str(Path(model_dir) / "model_state.pdparams"), return_numpy=True)
    result = paddle.load(str(Path(merged_dir) / "model_state.pdparams"), return_numpy=True)
    assert set(original) == set(result)
    for name in original:
        np.testing.assert_array_equal(original[name], result[name], err_msg=name)


@pytest.mark.parametrize("model_type", GENERATIONS)
def test_split_then_merge_is_exact_and_loads(model_type, tiny_dir, tmp_path):
    shards = split_into_shards(tiny_dir(model_type), tmp_path / "tp")
    merged = merge_tp_shards(shards, tmp_path / "merged")
    assert_same_weights(tiny_dir(model_type), merged)
    tok = load_tokenizer(str(merged), model_type)
    np.testing.assert_array_equal(batch_logits(load_model(str(merged), model_type), tok, model_type),
                                  batch_logits(load_model(str(tiny_dir(model_type)), model_type), tok, model_type))


@pytest.mark.parametrize("damage", ["missing", "extra", "shape", "degree"])
def test_merge_refuses_bad_shards_and_leaves_output_untouched(damage, tiny_dir, tmp_path):
    shards = split_into_shards(tiny_dir("chatglm2"), tmp_path / "tp")
    if damage == "missing":
        (shards / "model_state.tp01.pdparams").unlink()
        expected = r"missing \['tp01'\]"
    elif damage == "extra":
        shutil.copy(shards / "model_state.tp01.pdparams", shards / "model_state.tp02.pdparams")
        expected = r"unexpected \['tp02'\]"
    elif damage == "shape":
        state = paddle.load(str(shards / "model_state.tp01.pdparams"), return_numpy=True)
        name = "chatglm_v2.encoder.layers.0.mlp.dense_4h_to_h.weight"
        state[name] = state[name][:-1]
        paddle.save(state, str(shards / "model_state.tp01.pdparams"))
        expected = "dense_4h_to_h.weight: merged"
    else:
        cfg = json.loads((shards / "config.json").read_text())
        cfg["tensor_parallel_degree"] = 4
        (shards / "config.json").write_text(json.dumps(cfg))
        expected = r"tensor_parallel_degree=4.*missing \['tp02', 'tp03'\]"
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises((ShardMergeError, ValueError), match=expected):
        merge_tp_shards(shards, out, overwrite=True)  # past the folder guard: the shard check refuses
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"


def test_cli_merge_refusal_message(tiny_dir, tmp_path):
    shards = split_into_shards(tiny_dir("chatglm3"), tmp_path / "tp")
    (shards / "model_state.tp00.pdparams").unlink()
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "merge_tp_shards.py"), str(shards),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "missing ['tp00']" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_sharded_checkpoint_without_launcher_is_refused(tiny_dir, tmp_path):
    shards = split_into_shards(tiny_dir("chatglm2"), tmp_path / "tp")
    with pytest.raises(ValueError, match="split into 2 tensor-parallel shards.*merge_tp_shards.py"):
        predict_generation.main(predict_argv(shards))


@pytest.mark.slow
def test_weight_only_quantization_keeps_the_demo_models_answers(tiny_dir, demo_data, tmp_path, capsys):
    """The `make demo` recipe (300 steps), exported with int8 and int4: answers and ADGEN metrics of the 100 dev
    records against fp32 on the same engine (docs/export-and-inference.md)."""
    from utils import compute_metrics

    tuned = tmp_path / "tuned"
    finetune_generation.main(finetune_argv(tiny_dir("chatglm2"), demo_data, tuned, max_steps=300,
                                           per_device_train_batch_size=16, learning_rate=3e-3, warmup_steps=20,
                                           logging_steps=50, src_length=64, tgt_length=48))
    export = export_generation_model.main(["--model_name_or_path", str(tuned), "--output_path",
                                           str(tmp_path / "infer" / "chatglm"), "--src_length", "64",
                                           "--tgt_length", "48", "--quantize", "int8,int4"])
    dev = read_examples(demo_data / "dev.json")
    answers = {}
    for precision in ("fp32", "int8", "int4"):
        answers[precision] = infer_generation.main(["--model_path", str(export.parent), "--data_file",
                                                    str(demo_data / "dev.json"), "--batch_size", "16",
                                                    "--precision", precision])
    scores = {p: compute_metrics(a, [e.tgt for e in dev]) for p, a in answers.items()}
    same = {p: sum(a == b for a, b in zip(answers[p], answers["fp32"])) for p in ("int8", "int4")}
    with capsys.disabled():
        print(f"\nquantized vs fp32 on 100 dev answers: identical {same}; metrics {scores}")
    assert len(dev) == 100 and scores["fp32"]["rouge-1"] > 50  # the model learned the task
    assert same["int8"] >= 95
    # A dev answer moves a mean metric by at most 1 point; int8 changes 2-3 of them (rouge-2 moved 0.51 with 98
    # identical), so 1 point still says "the same quality" while leaving room for the kernel's rounding.
    for precision, bound in (("int8", 1.0), ("int4", 1.5)):
        for metric, value in scores[precision].items():
            assert abs(value - scores["fp32"][metric]) <= bound, (precision, metric, value, scores["fp32"][metric])


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["chatglm2", "chatglm3"])
def test_step_graph_reads_the_cache_where_it_lies(model_type, exported, tmp_path):
    """In ONNX Runtime's optimized ChatGLM2/3 graph the cache inputs feed only matmuls (and Shape): no concat,
    transpose or copy of the whole cache per step; a step returns only its own columns, and the same step on a
    cache with a masked unused tail gives the same logits as on the exact cache."""
    import onnx
    import onnxruntime as ort

    from glm_tune.deployment.inference_engine import OnnxRuntimeEngine
    from glm_tune.deployment.kv_cache import KVCache
    from glm_tune.deployment.step_feeds import StepFeeds, append_step

    folder = exported(model_type)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(folder / "chatglm.onnx"), options, providers=["CPUExecutionProvider"])
    readers = {node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node
               if any(name.startswith("cache_") for name in node.input)}
    assert readers and readers <= {"MatMul", "FusedMatMul", "Shape"}, readers

    config_class, _, tokenizer_class = get_generation(model_type).classes()
    tokenizer = tokenizer_class.from_pretrained(str(folder))
    engine = OnnxRuntimeEngine(folder, "chatglm")
    feeds = StepFeeds(tokenizer, model_type, config_class.from_pretrained(str(folder)))
    prompts = [tokenizer.encode("类型#裙*风格#复古")["input_ids"], tokenizer.encode("你好")["input_ids"]]
    prefill = feeds.prefill(prompts)
    logits, *new = engine(prefill)
    assert all(column.shape[2] == prefill["input_ids"].shape[1] for column in new)
    valid = append_step(feeds.cache, feeds.valid, new)
    exact = KVCache([b[:, :, :feeds.cache.length] for b in feeds.cache.buffers], feeds.cache.length, 2)
    assert feeds.cache.capacity > exact.capacity  # the first has an unused, masked tail
    steps = [engine(feeds.next_feeds(valid, prefill["position_ids"][..., -1:], logits[:, -1].argmax(-1), cache))
             for cache in (feeds.cache, exact)]
    assert all(column.shape[2] == 1 for column in steps[0][1:])
    np.testing.assert_allclose(steps[0][0], steps[1][0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- ONNX past protobuf's 2 GB


def test_the_weight_only_graphs_equal_onnxruntimes_own_quantizer(tiny_dir, tmp_path):
    """int8 / int4 are written one weight at a time (a 6B graph never fits in memory at once); the result is what
    onnxruntime's MatMulNBitsQuantizer makes of the whole fp32 graph: the same initializers, bit for bit, and the
    same nodes."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from glm_tune.deployment.onnx_export import ACCURACY_LEVEL, BLOCK_SIZES, converter_constant_matmuls

    out = export_generation_model.main(["--model_name_or_path", str(tiny_dir("chatglm3")), "--output_path",
                                        str(tmp_path / "infer" / "chatglm"), "--quantize", "int8,int4"])
    fp32 = onnx.load(str(out.parent / "chatglm.onnx"))
    for precision, bits in (("int8", 8), ("int4", 4)):
        reference = onnx.ModelProto()
        reference.CopyFrom(fp32)
        config = DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZES[precision], is_symmetric=True,
                                              accuracy_level=ACCURACY_LEVEL,
                                              bits=bits)
        quantizer = MatMulNBitsQuantizer(reference, algo_config=config,
                                         nodes_to_exclude=converter_constant_matmuls(reference))
        quantizer.process()
        expected, ours = quantizer.model.model.graph, onnx.load(str(out.parent / f"chatglm.{precision}.onnx")).graph
        arrays = {i.name: numpy_helper.to_array(i) for i in ours.initializer}
        reference_arrays = {i.name: numpy_helper.to_array(i) for i in expected.initializer}
        assert arrays.keys() == reference_arrays.keys()
        assert all(arrays[k].dtype == v.dtype and np.array_equal(arrays[k], v) for k, v in reference_arrays.items())
        nodes = lambda g: sorted((n.op_type, tuple(n.input), tuple(n.output), tuple(sorted(  # noqa: E731
            (a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute))) for n in g.node)
        assert nodes(ours) == nodes(expected) and sum(n.op_type == "MatMulNBits" for n in ours.node) == 9


@pytest.mark.slow
@pytest.mark.parametrize("model_type", GENERATIONS)
def test_onnx_weights_in_data_files_answer_as_dygraph_and_the_inline_graphs(model_type, trained, demo_data,
                                                                           tmp_path):
    """--onnx_inline_mb 0 forces what a 6B export does (issue 25): every ONNX graph keeps its weights in its own
    data file. fp32 answers token for token as dygraph, int8 / int4 as the inline graphs of the same export
    recipe (equal to onnxruntime's quantizer, above), batched and one by one; the server answers from it."""
    examples = varied_prompts(demo_data, 12)
    dygraph_ids = predict_generation.build_predictor(*predict_generation.parse_arguments(
        predict_argv(trained(model_type), batch_size=4))).predict_ids(examples)
    exports = {}
    for layout, limit in (("inline", "1800"), ("external", "0")):
        exports[layout] = export_generation_model.main([
            "--model_name_or_path", str(trained(model_type)), "--output_path", str(tmp_path / layout / "chatglm"),
            "--src_length", "96", "--tgt_length", "24", "--quantize", "int8,int4", "--onnx_inline_mb", limit]).parent
    info = json.loads((exports["external"] / "chatglm.generation.json").read_text())
    for key, graph in (("onnx", "chatglm.onnx"), ("onnx-int8", "chatglm.int8.onnx"), ("onnx-int4", "chatglm.int4.onnx")):
        data = exports["external"] / info["formats"][key]["data"]["file"]
        assert data.name == graph + ".data" and data.stat().st_size == info["formats"][key]["data"]["bytes"]
        # the graph file holds no large weight; the inline one holds them all
        assert (exports["external"] / graph).stat().st_size < (exports["inline"] / graph).stat().st_size / 2
    assert not list(exports["inline"].glob("*.data"))
    for precision in ("fp32", "int8", "int4"):
        for batch_size in ("4", "1"):
            answers = {layout: infer_generation.build_predictor(*infer_generation.parse_arguments(
                ["--model_path", str(folder), "--backend", "onnxruntime", "--precision", precision, "--batch_size",
                 batch_size])).predict_ids(examples) for layout, folder in exports.items()}
            assert answers["external"] == answers["inline"], (precision, batch_size)
            if precision == "fp32":
                assert answers["external"] == dygraph_ids
    if model_type == "chatglm3":
        from tools.local_server import start_server

        proc, url = start_server(exports["external"], tmp_path / "server.log", "--backend", "onnxruntime",
                                 "--precision", "int4")
        try:
            body = json.dumps({"messages": [{"role": "user", "content": examples[0].src}], "temperature": 0})
            request = urllib.request.Request(f"{url}/v1/chat/completions", data=body.encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                served = json.loads(response.read())["choices"][0]["message"]["content"]
        finally:
            proc.terminate()
            proc.wait(30)
        expected = infer_generation.build_predictor(*infer_generation.parse_arguments(
            ["--model_path", str(exports["external"]), "--precision", "int4"])).predict([Example(examples[0].src)])
        assert served == expected[0]
    # a data file that is missing or cut short is named in one line, before the engine is built
    from glm_tune.deployment.export_format import EngineError

    damaged = Path(shutil.copytree(exports["external"], tmp_path / "damaged"))
    with open(damaged / "chatglm.int8.onnx.data", "r+b") as f:
        f.truncate(1000)
    (damaged / "chatglm.int4.onnx.data").unlink()
    for precision, message in (("int8", r"chatglm\.int8\.onnx\.data holds 1000 bytes, the export wrote \d+: it is "
                                        r"truncated or from another export; export the model again"),
                               ("int4", r"chatglm\.int4\.onnx\.data \(the exported weights of the ONNX graph\) is "
                                        r"missing; export the model again")):
        with pytest.raises(EngineError, match=message) as caught:
            infer_generation.build_predictor(*infer_generation.parse_arguments(
                ["--model_path", str(damaged), "--precision", precision]))
        assert "\n" not in str(caught.value)


def test_the_params_file_is_read_by_its_headers_and_a_damaged_one_is_named(tiny_dir, tmp_path):
    from glm_tune.deployment.paddle_params import ParamsFileError, read_tensor, stored_tensors

    out = export_generation_model.main(["--model_name_or_path", str(tiny_dir("chatglm2")), "--output_path",
                                        str(tmp_path / "infer" / "chatglm"), "--onnx", "False"])
    prefix = out.parent / "chatglm"
    tensors = stored_tensors(prefix)
    model = load_model(str(tiny_dir("chatglm2")), "chatglm2")
    assert sum(t.nbytes for t in tensors) == sum(int(np.prod(p.shape)) * 4 for p in model.parameters())
    embedding = model.chatglm_v2.embedding.word_embeddings.weight.numpy()
    found = [read_tensor(Path(f"{prefix}.pdiparams"), t) for t in tensors if t.shape == embedding.shape]
    assert any(np.array_equal(f, embedding) for f in found)
    params = Path(f"{prefix}.pdiparams")
    params.write_bytes(params.read_bytes()[:-100])
    with pytest.raises(ParamsFileError, match="chatglm.pdiparams: .* the file is truncated or from another export"):
        stored_tensors(prefix)
