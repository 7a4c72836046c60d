"""The terminal chat through a pseudo-terminal, and the Gradio page through gradio_client and headless Chromium."""
import os
import pty
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import common

QLORA = Path(__file__).resolve().parents[1]


def read_until(fd, marker: str, timeout: float = 120) -> str:
    seen, deadline = b"", time.time() + timeout
    while marker.encode() not in seen:
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {marker!r}; got {seen.decode(errors='replace')[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return seen.decode(errors="replace")


@pytest.mark.slow
def test_cli_demo_answers_and_keeps_history(tiny_glm):
    folder = tiny_glm("chatglm3")
    model, tokenizer = common.load_model(folder), common.load_tokenizer(folder)
    first = common.chat(model, tokenizer, "chatglm3", "你好", [], 16)
    second = common.chat(model, tokenizer, "chatglm3", "类型#裙*风格#复古", [("你好", first)], 16)
    alone = common.chat(model, tokenizer, "chatglm3", "类型#裙*风格#复古", [], 16)
    assert second != alone  # so the check below can tell whether the history was used

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(QLORA / "cli_demo.py"), "--model_path", str(folder),
                             "--max_new_tokens", "16"], stdin=slave, stdout=slave, stderr=slave,
                            close_fds=True)
    os.close(slave)
    try:
        read_until(master, "用户: ")
        os.write(master, "你好\n".encode())
        out = read_until(master, "用户: ")
        assert f"ChatGLM: {first}" in out.replace("\r", "")
        os.write(master, "类型#裙*风格#复古\n".encode())
        out = read_until(master, "用户: ")
        assert f"ChatGLM: {second}" in out.replace("\r", "")
        os.write(master, b"clear\n")
        read_until(master, "(conversation cleared)")
        os.write(master, "类型#裙*风格#复古\n".encode())
        out = read_until(master, "用户: ")
        assert f"ChatGLM: {alone}" in out.replace("\r", "")
        os.write(master, b"exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(master)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gradio_server(tiny_glm, tmp_path):
    folder = tiny_glm("chatglm2")
    port = free_port()
    log = open(tmp_path / "gradio.log", "w")
    proc = subprocess.Popen([sys.executable, str(QLORA / "gradio_ui.py"), "--model_path", str(folder), "--port",
                             str(port), "--max_new_tokens", "24"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None:
                raise AssertionError((tmp_path / "gradio.log").read_text())
            time.sleep(0.5)
    yield url, folder
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.mark.slow
def test_gradio_streams_an_answer_on_loopback(gradio_server):
    from gradio_client import Client

    url, folder = gradio_server
    expected = common.chat(common.load_model(folder), common.load_tokenizer(folder), "chatglm2", "你好", [], 24)
    job = Client(url, verbose=False).submit("你好", api_name="/chat")
    partials = [p for p in job]
    assert partials[-1].strip() == expected and len(partials) > 1  # streamed: several growing updates
    assert all(expected.startswith(p.strip()) for p in partials if p.strip())


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_page_shows_the_chat_with_an_answer_in_headless_chromium(gradio_server, tmp_path):
    from .screenshot import chat_screenshot

    url, folder = gradio_server
    expected = common.chat(common.load_model(folder), common.load_tokenizer(folder), "chatglm2", "你好", [], 24)
    png, page_text = chat_screenshot(CHROMIUM, url, "你好", tmp_path / "chat.png", profile=tmp_path / "profile")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "你好" in page_text and expected[:8] in page_text
