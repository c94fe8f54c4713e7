"""One local Ray head per test session (started with ``ray start --head`` so that jobs can be
submitted to it too); every test that needs Ray connects to it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
# The session's head uses Ray's token authentication (the default of local clusters); say so
# before ray is imported so that this process and its subprocesses send the token.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """Address and dashboard URL of a 2-CPU Ray head on this machine."""
    port, dashboard = _free_port(), _free_port()
    env = dict(os.environ)
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2",
                    "--include-dashboard=true", f"--dashboard-port={dashboard}",
                    "--dashboard-host=127.0.0.1", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True)
    address = f"127.0.0.1:{port}"
    try:
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dashboard}"}
    finally:
        import ray

        ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)


@pytest.fixture(scope="session")
def ray_session(ray_head):
    """The test process connected to the session's Ray head."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_head["address"], log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray_head


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed ``ray-lt`` console script."""
    exe = shutil.which("ray-lt") or str(Path(sys.executable).with_name("ray-lt"))
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def wait_for(predicate, timeout: float, every: float = 1.0):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("condition not met in time")
