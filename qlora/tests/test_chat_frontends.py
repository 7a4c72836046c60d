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


class Terminal:
    """The program's side of a pseudo-terminal: everything it printed, and waits for text to appear in it."""

    def __init__(self, fd):
        self.fd, self.seen = fd, b""

    def wait_for(self, text: str, since: int = 0, timeout: float = 120) -> int:
        """Read until `text` appears after byte offset `since`; returns the offset just past it."""
        target, deadline = text.encode(), time.time() + timeout
        while target not in self.seen[since:]:
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for {text!r}; got {self.seen[since:].decode(errors='replace')!r}")
            ready, _, _ = select.select([self.fd], [], [], 1)
            if ready:
                try:
                    self.seen += os.read(self.fd, 4096)
                except OSError:
                    break
        return self.seen.index(target, since) + len(target)

    def send(self, line: str) -> int:
        mark = len(self.seen)
        os.write(self.fd, (line + "\n").encode())
        return mark


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
                             "--max_new_tokens", "16"], stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    term = Terminal(master)
    try:
        # The terminal turns "\n" into "\r\n": an answer line ends with "\r\n", so a prefix cannot match.
        term.wait_for("用户: ")
        term.wait_for(f"ChatGLM: {first}\r\n", term.send("你好"))
        term.wait_for(f"ChatGLM: {second}\r\n", term.send("类型#裙*风格#复古"))
        term.wait_for("(conversation cleared)", term.send("clear"))
        term.wait_for(f"ChatGLM: {alone}\r\n", term.send("类型#裙*风格#复古"))
        term.send("exit")
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
