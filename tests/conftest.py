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
