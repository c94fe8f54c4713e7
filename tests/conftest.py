"""One local Ray head per test session (started with ``ray start --head`` so that jobs can be
submitted to it too); every test that needs Ray connects to it. Also tiny copies of the real
data sets' layouts, shared by the data tests."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
# The session's head uses Ray's token authentication (the default of local clusters); say so
# before ray is imported so that this process and its subprocesses send the token.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


# Tests that start Ray themselves or run the console script, beside those using the session's
# Ray head (marked through their fixtures below).
SLOW_WITHOUT_FIXTURE = {
    "test_config.py::test_real_data_runs_fail_clearly_without_weights_or_data[imagenet_lt]",
}


def pytest_collection_modifyitems(config, items):
    """``slow``: every test that starts or uses a Ray cluster or runs a whole pipeline, so that
    ``pytest -m "not slow"`` (``make test-fast``) is the quick tier."""
    for item in items:
        name = f"{Path(item.fspath).name}::{item.name}"
        if {"ray_session", "ray_head", "digits_run"} & set(item.fixturenames) or \
                name in SLOW_WITHOUT_FIXTURE:
            item.add_marker(pytest.mark.slow)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_head():
    """Address and dashboard URL of a 2-CPU Ray head on this machine.

    The head runs in the foreground (``--block``) in its own process group, so the session
    stops exactly its own Ray processes, never another Ray instance on the machine.
    """
    import urllib.error
    import urllib.request

    # `ray start` wants the token to exist already (a fresh machine has none); this keeps
    # one that does.
    subprocess.run([RAY, "get-auth-token", "--generate"], check=True, capture_output=True)
    port, dashboard = _free_port(), _free_port()
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=true", f"--dashboard-port={dashboard}",
         # not the default 52365, which another cluster on this machine may hold: the job
         # agent would not start and `ray job submit` would find none
         f"--dashboard-agent-listen-port={_free_port()}",
         "--dashboard-host=127.0.0.1", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"

    def dashboard_up() -> bool:
        assert head.poll() is None, "ray start --head exited"
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # up, and asking for the cluster's token
        except OSError:
            return False

    try:
        wait_for(dashboard_up, timeout=120)
        yield {"address": f"127.0.0.1:{port}", "dashboard": url}
    finally:
        import ray

        ray.shutdown()
        os.killpg(head.pid, signal.SIGTERM)
        try:  # nothing of the session is kept: no long grace period
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def ray_session(ray_head):
    """The test process connected to the session's Ray head."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_head["address"], log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray_head


def load_bench(name: str):
    """The module ``bench/<name>.py``, loaded once per session and registered under ``name``
    (pools pickle its functions by module name, so every test must share one copy)."""
    import importlib.util

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


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


def submit_and_wait(ray_session, command: str, timeout: float = 900) -> str:
    """``ray job submit`` of ``python <command>`` from the project folder to the session's
    head; returns the logs of a job that succeeded."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_session["dashboard"])
    deadline = time.time() + timeout
    while True:  # the head's job agent may still be starting on a busy machine
        try:
            job = client.submit_job(
                entrypoint=f"{sys.executable} {command}",
                runtime_env={"working_dir": str(ROOT),
                             "excludes": [".venv", ".git", "runs", "*.parquet"]})
            break
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.time() > deadline - timeout + 120:
                raise
            time.sleep(3)
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                         JobStatus.STOPPED}:
        assert time.time() < deadline, "job did not finish in time"
        time.sleep(3)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    return logs


def untrained_classifier(out: Path, num_classes: int, cfg, width: int = 32) -> Path:
    """``out/classifier`` holding a randomly initialised small CNN of the data set's shape (for
    synthesis tests that need a guide, not a good one)."""
    import json

    import torch

    from ray_lt.train.models import build_model
    from ray_lt.train.trainer import MODEL_FILE, SPEC_FILE

    classifier = Path(out) / "classifier"
    classifier.mkdir(parents=True)
    spec = {"name": "small_cnn", "num_classes": num_classes, "in_channels": 3, "width": width,
            "mean": cfg.model.mean, "std": cfg.model.std, "checkpoint": None}
    torch.manual_seed(0)
    torch.save(build_model(**spec).state_dict(), classifier / MODEL_FILE)
    (classifier / SPEC_FILE).write_text(json.dumps(spec))
    return classifier


# -- tiny copies of the real data sets' layouts, written with PIL -------------------------

def write_image(path: Path, colour: int, size=(20, 14), fmt="JPEG") -> None:
    """A plain RGB image whose colour encodes ``colour``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (colour, 255 - colour, 30)).save(path, format=fmt)


def imagenet_lt_folder(root: Path, counts=(3, 2, 1), prefix="ImageNet_LT") -> Path:
    """A tiny copy of the real layout: root/train/nXXXX/*.JPEG and the three split lists."""
    for split, per_class in (("train", counts), ("val", (1, 1, 1)), ("test", (2, 2, 2))):
        lines = []
        for label, n in enumerate(per_class):
            for i in range(n):
                rel = f"{split}/n{label:04d}/img_{i}.JPEG"
                write_image(root / rel, 40 * label + i)
                lines.append(f"{rel} {label}")
        (root / f"{prefix}_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def nico_folder(root: Path) -> Path:
    """NICO++'s layout: ``metadata.csv`` (filename,split,y,a) over 2 classes x 3 contexts."""
    lines = ["filename,split,y,a"]
    for split, n in ((0, 2), (1, 1), (2, 1)):
        for y in range(2):
            for a in range(3):
                if split == 0 and (y, a) == (1, 2):
                    continue  # an empty training group, as in NICO++
                for i in range(n):
                    rel = f"class{y}/ctx{a}/{split}_{i}.png"
                    write_image(root / rel, 50 * a + y, fmt="PNG")
                    lines.append(f"{rel},{split},{y},{a}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


# Small and quick settings of the synthesis tests on digits_lt.
BASE = ["train.epochs=1", "generator.train_steps=12", "generator.checkpoint_every=6",
        "generator.block_out_channels=[16, 32]", "generator.batch_size=16",
        "synthesis.num_steps=6", "synthesis.guidance_every=2", "synthesis.cpus_per_actor=0.5",
        "synthesis.max_shard_size=3", "synthesis.batch_size=3",
        "evaluate.cpus_per_actor=0.5",
        "synthesis.criteria={entropy: 0.5, hardness: 0.25, total_uncertainty: 0.25}"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, ray_session):
    """A run directory with a baseline classifier and a pixel generator (``BASE``), shared by
    the synthesis and fault tests: copy its stages, never write into it."""
    from ray_lt import commands
    from ray_lt.config import load_config

    out = tmp_path_factory.mktemp("run")
    cfg = load_config(ROOT / "configs" / "digits_lt.yaml", BASE)
    commands.train(cfg, out)
    commands.train_generator(cfg, out)
    # The criteria's class statistics and epistemic head, so that copies of these stages
    # sample at once.
    from ray_lt.data import load_dataset
    from ray_lt.pipeline import criterion_support

    criterion_support(cfg, out, load_dataset(cfg.dataset, cfg.seed))
    return out


def copy_stages(trained: Path, target: Path, stages=("classifier", "generator")) -> Path:
    """A new run directory ``target`` holding copies of ``stages`` of another run."""
    target.mkdir()
    for stage in stages:
        shutil.copytree(trained / stage, target / stage)
    return target


SYNTHESIS = [*BASE, "synthesis.quota_scale=0.1"]
SYNTHESIZED_ROWS = 73  # round(0.1 * (100 - n_c)) summed over the classes


@pytest.fixture(scope="session")
def synthesized(trained, tmp_path_factory):
    """``trained``'s stages and their synthetic set (``SYNTHESIS``: 73 rows), drawn once by an
    undisturbed ``ray-lt synthesize``: the synthesis tests check it, the fault tests compare
    their shards with it. Copy it, never write into it."""
    from ray_lt import commands
    from ray_lt.config import load_config

    out = copy_stages(trained, tmp_path_factory.mktemp("synthesized") / "run")
    commands.synthesize(load_config(ROOT / "configs" / "digits_lt.yaml", SYNTHESIS), out)
    return out


# -- a cluster that grows ----------------------------------------------------------------------

def autoscaler_config(gcs_address: str, idle_minutes: float) -> dict:
    """A whole autoscaler config for the fake multi-node provider: every key the autoscaler
    reads, with no commands to run."""
    return {
        "cluster_name": "ray-lt-test", "max_workers": 2, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_minutes, "docker": {},
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address,
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
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


@contextlib.contextmanager
def autoscaling_cluster(folder: Path):
    """A head without CPUs and an autoscaler that adds 2-CPU worker nodes (at most 2),
    removing them after 6 idle seconds; its processes are ours alone (own process group,
    own Ray temp folder) and are stopped when the block ends."""
    from ray._private.services import get_node_ip_address

    temp = tempfile.mkdtemp(prefix="rl-as-", dir="/tmp")  # Ray's socket paths stay short
    ip, port = get_node_ip_address(), _free_port()
    config = folder / "autoscaler.json"
    config.write_text(json.dumps(autoscaler_config(f"{ip}:{port}", idle_minutes=0.1)))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "disabled",
           "RAY_TMPDIR": temp, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=0",
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
        shutil.rmtree(temp, ignore_errors=True)


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


WATCH = r"""
import json, sys, time
from pathlib import Path

import ray
from ray.util.state import list_actors

address, log, stop = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
ray.init(address=address, log_to_driver=False)
started, timeline, samplers, gone = time.time(), [], {}, set()
alive_before = set()
while not stop.exists():
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0}
    gone |= alive_before - alive
    alive_before = alive
    if not timeline or timeline[-1][1] != len(alive):
        timeline.append((round(time.time() - started, 1), len(alive)))
    try:
        for a in list_actors(address=address, limit=1000, raise_on_missing_output=False):
            if "GuidedSampler" in a.class_name:  # node_id is None until it is placed
                samplers[a.actor_id] = a.node_id or samplers.get(a.actor_id)
    except Exception:  # the state API answers once the dashboard is up
        pass
    part = log.with_suffix(".part")
    part.write_text(json.dumps({"timeline": timeline, "sampler_actors": len(samplers),
                                "sampler_nodes": sorted(set(samplers.values()) - {None}),
                                "removed": sorted(gone)}))
    part.replace(log)  # what was seen so far, readable while the watch goes on
    time.sleep(0.5)
ray.shutdown()
"""


@contextlib.contextmanager
def watch_cluster(cluster: dict, folder: Path):
    """Yield a dict that, after the block, holds what a watcher connected to ``cluster`` saw
    every half second: ``timeline`` ([seconds, worker nodes alive] at each change),
    ``sampler_actors`` (the sampler pool's actors, placed or still waiting for a node),
    ``sampler_nodes`` (the nodes those placed ran on) and
    ``removed`` (worker nodes that went away). Inside the block, ``seen["now"]()`` reads what
    the watcher has seen so far."""
    log, stop = folder / "watch.json", folder / "watch.stop"
    watcher = subprocess.Popen([sys.executable, "-c", WATCH, cluster["address"], str(log),
                                str(stop)], env=cluster["env"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: dict = {"now": lambda: json.loads(log.read_text()) if log.is_file() else {}}
    try:
        yield seen
    finally:
        stop.touch()
        _, err = watcher.communicate(timeout=60)
        assert log.is_file(), err[-3000:]
        seen.update(json.loads(log.read_text()))
