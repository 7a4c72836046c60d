"""The benchmark scripts still run (smallest settings); their figures go in closing notes, not assertions."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_decode_throughput_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "decode_throughput.py"), "--size", "tiny",
                          "--contexts", "16,40", "--new_tokens", "4", "--memory_limit", "--work_dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()
            or line.startswith(("dygraph", "paddle", "onnx-"))]
    assert [r[0] for r in rows if not r[0].isdigit()] == ["dygraph", "paddle", "onnx-fp32", "onnx-int8", "onnx-int4"]
    assert len(rows) == 10 and all(float(x) > 0 for r in rows for x in r[-4 if len(r) > 4 else -3:])


@pytest.mark.slow
def test_train_throughput_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--hidden_size", "64",
                          "--vocab_size", "0", "--steps", "2", "--warmup", "1", "--work_dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    assert "LoRA/full: throughput x" in out


@pytest.mark.slow
def test_serve_load_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_load.py"), "--size", "tiny", "--clients", "1,3",
                          "--requests", "2", "--max_tokens", "4", "--work_dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [(r[0], r[1]) for r in rows] == [("1", "2/2"), ("3", "6/6")]
    assert all(float(x) > 0 for r in rows for x in r[2:])


@pytest.mark.slow
def test_memory_plan_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "memory_plan.py"), "--layouts", "tp1", "--batch", "1",
                          "--steps", "1", "--work_dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, check=True).stdout
    assert "ChatGLM2-6B  full     4     0   1" in out and "GPUs needed" in out
    row = next(line.split() for line in out.splitlines()[::-1] if line.split() and line.split()[0] == "tp1")
    assert len(row) == 5 and all(float(x) > 0 for x in row[1:])


@pytest.mark.slow
def test_real_size_runs(tmp_path):
    """Every step of bench/real_size.py on tiny shapes (the real ones take ~15 min and 12 GB)."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "real_size.py"), "--shape", "tiny", "--layers", "1,2",
                          "--work_dir", str(tmp_path)], capture_output=True, text=True, timeout=900, check=True).stdout
    steps = {line.split()[0] for line in out.splitlines() if line and not line.startswith(" ") and
             len(line.split()) > 6}
    assert {"make", "from_hf", "to_hf", "lora", "lora:merge+export", "export", "dygraph", "infer:onnxruntime-int4",
            "serve:int8"} <= steps
    assert "ONNX fp32 answers equal dygraph's: True" in out and "argmax" in out


@pytest.mark.slow
def test_step_profile_runs(tmp_path):
    """bench/step_profile.py on the tiny model: every weight matmul of the int8 graph found by its K x N, with GB/s."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "step_profile.py"), "--size", "tiny", "--precisions",
                          "int8", "--steps", "4", "--work_dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, check=True).stdout
    rows = {" ".join(line.split()[:2]): line.split()[2:] for line in out.splitlines() if line.startswith("  ")}
    shapes = {name for name in rows if name.startswith("MatMulNBits")}
    # hidden 128, 4 heads of 32, 2 key/value groups, ffn 256, vocabulary 1216: qkv, dense, gate+up, down, output
    assert shapes == {"MatMulNBits 128x256", "MatMulNBits 128x128", "MatMulNBits 128x512", "MatMulNBits 256x128",
                      "MatMulNBits 128x1216"}, shapes
    assert all(float(rows[s][0]) > 0 and float(rows[s][2]) > 0 for s in shapes)  # ms per step and GB/s
    assert "host" in " ".join(rows) and "int8: a decode step" in out
