"""Fixtures of the QLoRA sibling's suite (runs in qlora/.venv). Tiny models are built by the main suite's own
command in the main venv (.venv), in transformers' GLM layout: the qlora stack never imports Paddle."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

QLORA = Path(__file__).resolve().parents[1]
ROOT = QLORA.parent
MAIN_PYTHON = ROOT / ".venv" / "bin" / "python"
sys.path.insert(0, str(QLORA))  # the sibling's scripts import one another by name, as when run from qlora/


def run_main_venv(*args, **kwargs):
    """Run a command with the Paddle suite's interpreter (make test builds it first)."""
    return subprocess.run([str(MAIN_PYTHON), *map(str, args)], cwd=ROOT, check=True, capture_output=True,
                          text=True, timeout=600, **kwargs)


@pytest.fixture(scope="session")
def tiny_glm(tmp_path_factory):
    built = {}

    def get(model_type):
        if model_type not in built:
            out = tmp_path_factory.mktemp("glm") / model_type
            run_main_venv("tools/make_tiny_model.py", "--model_type", model_type, "--output_dir", out,
                          "--format", "glm")
            built[model_type] = out
        return built[model_type]

    return get


@pytest.fixture(scope="session")
def instruction_data(tmp_path_factory):
    """The main suite's demo records as instruction data with history (a JSON list)."""
    import random

    from tools.make_demo_data import make_record

    rng = random.Random(0)
    records = []
    for i in range(64):
        record = make_record(rng)
        history = [["你好", "你好！"]] if i % 3 == 0 else []
        records.append({"instruction": record["content"], "input": "", "output": record["summary"],
                        "history": history})
    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path
