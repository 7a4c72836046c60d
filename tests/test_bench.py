"""The benchmark scripts still run (smallest settings); their figures go in closing notes, not assertions."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_decode_throughput_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "decode_throughput.py"), "--sizes", "tiny",
                          "--new_tokens", "4", "--repeats", "1", "--work_dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    assert "decode x" in out and out.strip().splitlines()[-1].startswith("tiny")


@pytest.mark.slow
def test_train_throughput_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--hidden_size", "64",
                          "--vocab_size", "0", "--steps", "2", "--warmup", "1", "--work_dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    assert "LoRA/full: throughput x" in out
