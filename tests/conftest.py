"""Shared fixtures: tiny models of all three generations, built once per test session."""
import os

import pytest

os.environ.setdefault("FLAGS_use_mkldnn", "0")

GENERATIONS = ["chatglm", "chatglm2", "chatglm3"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Folder of the tiny paddle-layout model of a generation: tiny_dir("chatglm2")."""
    from tools.make_tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    built = {}

    def get(model_type):
        if model_type not in built:
            built[model_type] = make_tiny_model(model_type, root / model_type)
        return built[model_type]

    return get


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from paddlenlp.transformers import AutoTokenizer

    cache = {}

    def get(model_type):
        if model_type not in cache:
            cache[model_type] = AutoTokenizer.from_pretrained(str(tiny_dir(model_type)))
        return cache[model_type]

    return get


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    from tools.make_demo_data import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("data") / "AdvertiseGen")


@pytest.fixture(scope="session")
def trained(tiny_dir, demo_data, tmp_path_factory):
    """A tiny model of each generation after 150 steps on the demo data: its greedy answers vary with the prompt
    (an untrained v1 repeats one token), so token-level comparisons mean something."""
    import finetune_generation
    from .test_finetune import finetune_argv

    built = {}

    def get(model_type):
        if model_type not in built:
            out = tmp_path_factory.mktemp(f"trained_{model_type}")
            finetune_generation.main(finetune_argv(tiny_dir(model_type), demo_data, out, max_steps=150,
                                                   learning_rate=5e-3, per_device_train_batch_size=16))
            built[model_type] = out
        return built[model_type]

    return get


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory):
    """The trained tiny model of a generation exported (Paddle + ONNX fp32 graphs, 96 prompt / 24 new tokens):
    exported("chatglm3") is the export folder, model prefix "chatglm"."""
    import export_generation_model

    built = {}

    def get(model_type):
        if model_type not in built:
            out = export_generation_model.main(["--model_name_or_path", str(trained(model_type)), "--output_path",
                                                str(tmp_path_factory.mktemp(f"export_{model_type}") / "chatglm"),
                                                "--src_length", "96", "--tgt_length", "24"])
            built[model_type] = out.parent
        return built[model_type]

    return get
