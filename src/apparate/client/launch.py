"""Starting and stopping `apparate serve` subprocesses on free loopback ports (loadgen --compare)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence


def start_server(bundle: str, policy: str, extra: Sequence[str] = (), log_dir: str | None = None,
                 timeout_s: float = 900.0, name: str | None = None) -> tuple[subprocess.Popen, str]:
    """Launch a server (port chosen by the OS, reported through a port file); wait until ready.
    `name` (default the policy) names its log and port files."""
    from .loadgen import wait_ready

    d = Path(log_dir or tempfile.mkdtemp(prefix="apparate-loadgen-"))
    d.mkdir(parents=True, exist_ok=True)
    name = name or policy
    port_file = d / f"{name}.port.json"
    port_file.unlink(missing_ok=True)
    log = open(d / f"{name}.log", "w")
    cmd = [sys.executable, "-m", "apparate", "serve", bundle, "--policy", policy, "--host", "127.0.0.1",
           "--port", "0", "--port-file", str(port_file), *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    end = time.monotonic() + timeout_s
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the {name} server exited with code {proc.returncode}; see {d / (name + '.log')}")
        if time.monotonic() > end:
            stop_server(proc)
            raise TimeoutError(f"the {name} server did not start within {timeout_s:.0f} s; see {d}")
        time.sleep(0.2)
    url = json.loads(port_file.read_text())["url"]
    wait_ready(url, timeout_s, proc)
    return proc, url


def stop_server(proc: subprocess.Popen, timeout_s: float = 60.0) -> int | None:
    """SIGINT (a graceful shutdown: in-flight requests answered, state checkpointed), then kill."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode
