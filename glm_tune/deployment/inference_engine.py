"""Engines that run an exported step graph: ONNX Runtime (fp32, or weight-only int8/int4), Paddle Inference's C++
predictor (the engine FastDeploy's Paddle backend wraps) and, where its runtime is installed, FastDeploy. Each
is a callable feeds -> (logits, *the step's new keys and values). `choose_engine` picks one from what the export
holds."""
from pathlib import Path

from glm_tune.deployment.export_format import EXPORT_FLAGS, FORMAT_OF, EngineError, onnx_file_name
from glm_tune.errors import one_line


# Fastest first, as measured on CPU (bench/RESULTS.md): what runs when --backend is omitted.
SPEED_ORDER = (("onnxruntime", "int4"), ("onnxruntime", "int8"), ("onnxruntime", "fp32"), ("paddle", "fp32"))
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

    def __init__(self, model_path, model_prefix: str, threads: int = 2, precision: str = "fp32",
                 profile_prefix: str = None):
        """`profile_prefix`: record every node's time (onnxruntime's profiler; bench/step_profile.py reads it)."""
        import onnxruntime as ort

        from glm_tune.console import verbose_requested

        self.base = Path(model_path) / model_prefix
        path = Path(model_path) / onnx_file_name(model_prefix, None if precision == "fp32" else precision)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 0 if verbose_requested() else 3
        if profile_prefix:
            options.enable_profiling, options.profile_file_prefix = True, str(profile_prefix)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, ...) for bad files
            raise EngineError(f"ONNX Runtime cannot load {path} ({one_line(err)[:160]}): the file is truncated "
                              "or damaged; export the model again") from None
        self.names = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds):
        """(logits [B, K, V], *the step's new keys and values) as numpy. onnxruntime reads contiguous numpy inputs
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
