"""Start serve_generation.py on a free 127.0.0.1 port and wait until /health answers (the demos and benches)."""
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from glm_tune.errors import GlmTuneError

ROOT = Path(__file__).resolve().parents[1]


def start_server(model_path, log_file, *flags, timeout: float = 120.0):
    """(process, base url) of a server on the export at `model_path`; its output goes to `log_file`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_file, "w")
    proc = subprocess.Popen([sys.executable, "serve_generation.py", "--model_path", str(model_path), "--port",
                             str(port), *map(str, flags)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise GlmTuneError(f"the server exited; see {log_file}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except urllib.error.HTTPError:  # up, and asking for its API key
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise GlmTuneError(f"the server did not start in {timeout:.0f} s; see {log_file}")
