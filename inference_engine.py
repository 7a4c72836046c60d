"""Engines that run an exported step graph: Paddle Inference's C++ predictor (the engine FastDeploy's Paddle
backend wraps) and, where its runtime is installed, FastDeploy. Each is a callable feeds -> (logits, k, v)."""
import json
from pathlib import Path


class EngineError(RuntimeError):
    """The exported model or the requested backend cannot be used; the message says what to do."""


def read_description(model_path, model_prefix: str) -> dict:
    path = Path(model_path) / f"{model_prefix}.generation.json"
    if not path.is_file():
        raise EngineError(f"{path} not found: export the model first with export_generation_model.py "
                          f"--output_path {Path(model_path) / model_prefix}")
    return json.loads(path.read_text(encoding="utf-8"))


class PaddleInferenceEngine:
    """Paddle Inference predictor with zero-copy input/output handles."""

    def __init__(self, model_path, model_prefix: str, threads: int = 2, enable_mkldnn: bool = False):
        from paddle import inference

        base = Path(model_path) / model_prefix
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
        self.predictor = inference.create_predictor(config)
        self.inputs = {n: self.predictor.get_input_handle(n) for n in self.predictor.get_input_names()}
        self.outputs = [self.predictor.get_output_handle(n) for n in self.predictor.get_output_names()]

    def __call__(self, feeds):
        for name, handle in self.inputs.items():
            array = feeds[name]
            handle.reshape(array.shape)
            handle.copy_from_cpu(array)
        self.predictor.run()
        return tuple(h.copy_to_cpu() for h in self.outputs)


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


BACKENDS = {"paddle": PaddleInferenceEngine, "fastdeploy": FastDeployEngine}


def create_engine(backend: str, model_path, model_prefix: str, threads: int = 2):
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[backend](model_path, model_prefix, threads=threads)
