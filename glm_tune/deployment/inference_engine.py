"""Engines that run an exported step graph: ONNX Runtime (fp32, or weight-only int8/int4), Paddle Inference's C++
predictor (the engine FastDeploy's Paddle backend wraps) and, where its runtime is installed, FastDeploy. Each
is a callable feeds -> (logits, *the step's new keys and values). `choose_engine` picks one from what the export
holds."""
import json
from pathlib import Path

from glm_tune.errors import GlmTuneError, one_line


class EngineError(GlmTuneError):
    """The exported model or the requested backend cannot be used; the message says what to do."""


DESCRIPTION_KEYS = ("generation", "dtype", "defaults")


def read_description(model_path, model_prefix: str) -> dict:
    """PREFIX.generation.json of an export: what the graph holds and its generation defaults."""
    folder = Path(model_path)
    if not folder.is_dir():
        raise EngineError(f"--model_path {model_path} is not a folder; pass the folder export_generation_model.py "
                          "wrote (the folder part of its --output_path)")
    path = folder / f"{model_prefix}.generation.json"
    if not path.is_file():
        found = sorted(p.name[:-len(".generation.json")] for p in folder.glob("*.generation.json"))
        hint = f" (this folder holds --model_prefix {', '.join(found)})" if found else ""
        raise EngineError(f"{path} not found{hint}: export the model first with export_generation_model.py "
                          f"--output_path {folder / model_prefix}")
    try:
        info = json.loads(path.read_text(encoding="utf-8-sig"))
        missing = [k for k in DESCRIPTION_KEYS if k not in info]
        defaults = info["defaults"] if not missing else {}
        missing += [f"defaults.{k}" for k in ("src_length", "max_new_tokens") if k not in defaults]
    except (ValueError, TypeError, OSError) as err:
        raise EngineError(f"{path} is not a valid export description ({one_line(err)[:80]}); export the model "
                          "again") from None
    if missing:
        raise EngineError(f"{path} lacks {', '.join(missing)}; export the model again")
    from glm_tune.deployment.step_model import STEP_GRAPH_FORMAT

    if info.get("format") != STEP_GRAPH_FORMAT:
        raise EngineError(f"{path} describes a step graph from an earlier glm-tune ({info.get('format')!r}, not "
                          f"{STEP_GRAPH_FORMAT!r}: it returned the whole cache at every step); export the model again")
    return info


# Fastest first, as measured on CPU (bench/RESULTS.md): what runs when --backend is omitted.
SPEED_ORDER = (("onnxruntime", "int4"), ("onnxruntime", "int8"), ("onnxruntime", "fp32"), ("paddle", "fp32"))
FORMAT_OF = {("onnxruntime", "fp32"): "onnx", ("onnxruntime", "int8"): "onnx-int8",
             ("onnxruntime", "int4"): "onnx-int4", ("paddle", "fp32"): "paddle", ("fastdeploy", "fp32"): "paddle"}
EXPORT_FLAGS = {"onnx": "--onnx True", "onnx-int8": "--quantize int8", "onnx-int4": "--quantize int4",
                "paddle": ""}


def choose_engine(info: dict, backend: str = None, precision: str = None) -> tuple:
    """(backend, precision) to run: the ones asked for, or the fastest this export holds."""
    formats = info.get("formats") or {"paddle": {}}  # exports older than the ONNX backend hold the Paddle graph
    if backend is not None and backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose one of {sorted(BACKENDS)}")
    candidates = [(b, p) for b, p in SPEED_ORDER + (("fastdeploy", "fp32"),)
                  if (backend is None or b == backend) and (precision is None or p == precision)]
    for choice in candidates:
        if FORMAT_OF[choice] in formats:
            return choice
    wanted = FORMAT_OF.get(candidates[0]) if candidates else None
    if wanted is None:
        raise EngineError(f"--backend {backend} runs only fp32 graphs; drop --precision {precision} or use "
                          "--backend onnxruntime")
    known = set(FORMAT_OF.values())
    if backend is None and precision is None:  # nothing was asked for: say that nothing here is runnable
        raise EngineError(f"this export holds no graph this version can run (it lists {', '.join(sorted(formats))}; "
                          f"known: {', '.join(sorted(known))}); export the model again with "
                          "export_generation_model.py")
    raise EngineError(f"this export holds no {wanted} graph (it holds {', '.join(sorted(formats))}); export it with "
                      f"export_generation_model.py ... {EXPORT_FLAGS[wanted]}".rstrip())


def check_export_folder(model_path, model_prefix: str, generation: str, backend: str = "paddle",
                        precision: str = "fp32", formats: dict = None) -> None:
    """The graph, its weights and the tokenizer are all there before the engine is built."""
    from glm_tune.deployment.onnx_export import onnx_file_name
    from glm_tune.model_loading import check_tokenizer_file

    base, data = Path(model_path) / model_prefix, None
    if backend == "onnxruntime":
        needed = [(onnx_file_name(model_prefix, None if precision == "fp32" else precision), "ONNX graph")]
        # a graph past --onnx_inline_mb keeps its weights in a data file beside it
        data = (formats or {}).get(FORMAT_OF[(backend, precision)], {}).get("data")
        if data:
            needed.append((data["file"], "weights of the ONNX graph"))
    else:
        needed = [(f"{model_prefix}.json", "graph"), (f"{model_prefix}.pdiparams", "weights")]
    for name, what in needed:
        if not (Path(model_path) / name).is_file():
            raise EngineError(f"{Path(model_path) / name} (the exported {what}) is missing; export the model again "
                              f"with export_generation_model.py --output_path {base}")
    if data:
        size = (Path(model_path) / data["file"]).stat().st_size
        if size != data["bytes"]:
            raise EngineError(f"{Path(model_path) / data['file']} holds {size} bytes, the export wrote "
                              f"{data['bytes']}: it is truncated or from another export; export the model again "
                              f"with export_generation_model.py --output_path {base}")
    if not (Path(model_path) / "config.json").is_file():
        raise EngineError(f"{model_path} has no config.json; export the model again")
    try:
        check_tokenizer_file(model_path, generation)
    except GlmTuneError as err:
        raise EngineError(f"{err} (or export the model again)") from None


class PaddleInferenceEngine:
    """Paddle Inference predictor with zero-copy input/output handles."""

    def __init__(self, model_path, model_prefix: str, threads: int = 2, enable_mkldnn: bool = False):
        from paddle import inference

        base = self.base = Path(model_path) / model_prefix
        config = inference.Config(f"{base}.json", f"{base}.pdiparams")
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(threads)
        # oneDNN caches shapes per op and fails once the cache length changes between calls (seen:
        # "expand_v2 ... 26 vs 27"), and has given different rotary results; it stays off unless asked.
        if enable_mkldnn:
            config.enable_mkldnn()
        else:
            config.disable_mkldnn()
        config.switch_ir_optim(True)
        from glm_tune.console import verbose_requested

        if not verbose_requested():
            config.disable_glog_info()  # a line per graph pass at every engine build
        try:
            self.predictor = inference.create_predictor(config)
        except (RuntimeError, ValueError, OSError, MemoryError) as err:
            raise EngineError(unloadable(base, err)) from None
        self.inputs = {n: self.predictor.get_input_handle(n) for n in self.predictor.get_input_names()}
        self.outputs = [self.predictor.get_output_handle(n) for n in self.predictor.get_output_names()]

    def __call__(self, feeds):
        for name, handle in self.inputs.items():
            array = feeds[name]
            handle.reshape(array.shape)
            handle.copy_from_cpu(array)
        try:
            self.predictor.run()
        except (RuntimeError, ValueError, MemoryError) as err:
            raise EngineError(unloadable(self.base, err)) from None
        return tuple(h.copy_to_cpu() for h in self.outputs)


def unloadable(base, err) -> str:
    """One line for an engine that refuses the exported files (truncated, garbage or another model's weights)."""
    detail = next((line.strip() for line in str(err).splitlines() if "Error" in line or "error" in line),
                  one_line(err))
    return (f"Paddle Inference cannot run {base}.json with {base}.pdiparams ({detail[:160]}): the files are "
            "truncated, damaged or from different exports; export the model again")


class OnnxRuntimeEngine:
    """ONNX Runtime's CPU execution provider on PREFIX.onnx (or a weight-only quantized PREFIX.int8/int4.onnx)."""

    def __init__(self, model_path, model_prefix: str, threads: int = 2, precision: str = "fp32"):
        import onnxruntime as ort

        from glm_tune.console import verbose_requested
        from glm_tune.deployment.onnx_export import onnx_file_name

        self.base = Path(model_path) / model_prefix
        path = Path(model_path) / onnx_file_name(model_prefix, None if precision == "fp32" else precision)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 0 if verbose_requested() else 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, ...) for bad files
            raise EngineError(f"ONNX Runtime cannot load {path} ({one_line(err)[:160]}): the file is truncated "
                              "or damaged; export the model again") from None
        self.names = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds):
        """(next_logits, *the step's new keys and values) as numpy. onnxruntime reads contiguous numpy inputs
        where they lie, so the host's cache buffers are not copied at a step."""
        try:
            return tuple(self.session.run(self.outputs, {name: feeds[name] for name in self.names}))
        except Exception as err:
            raise EngineError(f"ONNX Runtime failed on {self.base} ({one_line(err)[:160]}); export the model "
                              "again") from None


class FastDeployEngine:
    """FastDeploy Runtime with its Paddle Inference backend (only where FastDeploy's runtime is installed; PyPI's
    fastdeploy-python is a 2022 stub without it)."""

    def __init__(self, model_path, model_prefix: str, threads: int = 2):
        try:
            import fastdeploy as fd
        except ImportError as err:
            raise EngineError("--backend fastdeploy needs FastDeploy's runtime (not on PyPI as a working wheel); "
                              "use --backend paddle, the same engine FastDeploy wraps") from err
        option = fd.RuntimeOption()
        base = Path(model_path) / model_prefix
        option.set_model_path(f"{base}.json", f"{base}.pdiparams", fd.ModelFormat.PADDLE)
        option.use_cpu()
        option.use_paddle_infer_backend()
        option.set_cpu_thread_num(threads)
        self.runtime = fd.Runtime(option)
        self.names = [self.runtime.get_input_info(i).name for i in range(self.runtime.num_inputs())]

    def __call__(self, feeds):
        return tuple(self.runtime.infer({n: feeds[n] for n in self.names}))


BACKENDS = {"onnxruntime": OnnxRuntimeEngine, "paddle": PaddleInferenceEngine, "fastdeploy": FastDeployEngine}


def create_engine(backend: str, model_path, model_prefix: str, threads: int = 2, precision: str = "fp32"):
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose one of {sorted(BACKENDS)}")
    if backend == "onnxruntime":
        return OnnxRuntimeEngine(model_path, model_prefix, threads=threads, precision=precision)
    return BACKENDS[backend](model_path, model_prefix, threads=threads)
