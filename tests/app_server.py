"""A real `python app.py --demo` for the app's tests: on a free port, offline, everything it writes under one
temporary folder, its output kept in a log that failures quote."""

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120


@dataclass
class AppServer:
    url: str
    output_dir: Path
    process: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_app(root: Path, arguments=(), env=None, launcher: list = ()):
    """Start the app (the demo model is built on first use, in WAN_STUDIO_CACHE) and stop it afterwards; `arguments`
    are added to its command line, `env` replaces the environment it starts with. `launcher`: the command it runs
    under (mlx.launch ... --), in a session of its own that ends with it."""
    output_dir, log = root / "outputs", root / "server.log"
    port = free_port()
    env = {**(env or os.environ), "HF_HUB_OFFLINE": "1", "GRADIO_TEMP_DIR": str(root / "gradio-files")}
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [*launcher, sys.executable, "app.py", "--demo", "--port", str(port), "--output-dir", str(output_dir),
             *arguments],
            cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if launcher else None, start_new_session=bool(launcher),
        )
    server = AppServer(f"http://127.0.0.1:{port}/", output_dir, process, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "is running at" not in server.log_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the app did not start:\n{server.log_text()}")
            time.sleep(0.2)
        yield server
    finally:
        if launcher:  # mlx.launch and every process it started
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
