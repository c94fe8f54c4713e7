"""``ray-lt`` on a cluster that grows: Ray's local autoscaling cluster (the fake multi-node
provider), whose head has no CPU and whose one worker type (2 CPUs, ``min_workers: 0``,
``max_workers: 2``) is added by the autoscaler on demand, as ``ray up cluster.yaml`` does
with its worker types. The test starts and stops only its own Ray processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, wait_for

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaler_config(gcs_address: str, idle_minutes: float) -> dict:
    """A whole autoscaler config for the fake multi-node provider: every key the autoscaler
    reads, with no commands to run."""
    return {
        "cluster_name": "ray-lt-test", "max_workers": 2, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_minutes, "docker": {},
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address},
        "auth": {"ssh_user": "ray"},
        "available_node_types": {
            "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0,
                           "max_workers": 2}},
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": []}


DRIVER = r"""
import json, sys, threading, time
from pathlib import Path

import ray
from ray.util.state import list_actors

from ray_lt import commands
from ray_lt.config import load_config

address, out, overrides = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
ray.init(address=address, log_to_driver=False)
timeline, seen, stop = [], {}, threading.Event()

def workers():
    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0}

def watch():
    while not stop.wait(0.5):
        now = workers()
        for node in now:
            seen.setdefault(node, time.time())
        if not timeline or timeline[-1][1] != len(now):
            timeline.append((round(time.time() - started, 1), len(now)))

started = time.time()
thread = threading.Thread(target=watch, daemon=True)
thread.start()
cfg = load_config("configs/digits_lt.yaml", overrides)
commands.train(cfg, out)
trained_on = set(seen)
# Between stages: the worker nodes go idle and the autoscaler removes them.
deadline = time.time() + 120
while workers() and time.time() < deadline:
    time.sleep(0.5)
removed_between = not workers()
commands.run(cfg, out)
stop.set()
samplers = [a for a in list_actors(address=address, limit=1000, detail=True)
            if "GuidedSampler" in a.class_name]
print(json.dumps({"timeline": timeline, "trained_on": len(trained_on), "nodes": len(seen),
                  "removed_between": removed_between,
                  "sampler_actors": len(samplers),
                  "sampler_nodes": len({a.node_id for a in samplers}),
                  "seconds": round(time.time() - started, 1)}))
ray.shutdown()
"""


@pytest.fixture
def autoscaling_cluster(tmp_path):
    """A head without CPUs and an autoscaler that adds 2-CPU worker nodes (at most 2),
    removing them after 6 idle seconds; its processes are ours alone (own process group,
    own Ray temp folder) and are stopped at the end."""
    from ray._private.services import get_node_ip_address

    temp = tempfile.mkdtemp(prefix="rl-as-", dir="/tmp")  # Ray's socket paths stay short
    ip, port = get_node_ip_address(), _free_port()
    config = tmp_path / "autoscaler.json"
    config.write_text(json.dumps(autoscaler_config(f"{ip}:{port}", idle_minutes=0.1)))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "disabled",
           "RAY_TMPDIR": temp, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    ray = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", f"--port={port}", "--num-cpus=0",
         f"--autoscaling-config={config}", "--include-dashboard=true",
         f"--dashboard-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: _listening(ip, port), timeout=120)
        yield {"address": f"{ip}:{port}", "env": env, "config": config}
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        _kill_by_temp_folder(temp)  # worker nodes the fake provider started


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _kill_by_temp_folder(temp: str) -> None:
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        try:
            if temp in " ".join(process.info.get("cmdline") or []):
                process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def test_a_run_from_zero_worker_nodes_grows_the_cluster_and_fills_the_exact_quota(
        autoscaling_cluster, tmp_path):
    from test_faults import PLANNED_ROWS, SYNTH, _rows

    out = tmp_path / "run"
    # Two sampler actors of 1.5 CPU: one per 2-CPU node, so the pool needs both nodes.
    overrides = [*SYNTH, "synthesis.num_actors=2", "synthesis.cpus_per_actor=1.5",
                 "report.grid=false", "report.quality=false"]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", DRIVER, autoscaling_cluster["address"],
                           str(out), json.dumps(overrides)],
                          cwd=ROOT, env=autoscaling_cluster["env"], capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(next(line for line in done.stdout.splitlines()[::-1]
                             if line.startswith('{"timeline"')))
    print(f"autoscaling run: {time.perf_counter() - started:.0f} s, {report}")
    assert report["trained_on"] >= 1 and report["removed_between"], report
    assert report["sampler_actors"] >= 2 and report["sampler_nodes"] == 2, report
    assert report["timeline"][0][1] == 0  # it started with no worker node
    assert len(_rows(out)) == PLANNED_ROWS
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    assert 0.0 <= metrics["few"] <= 1.0
