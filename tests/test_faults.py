"""Faults a long job meets on a shared cluster, on the session's real local Ray with real
processes killed: sampler actors, training workers and the driver itself. Each ends with
exactly the planned data (compared by content hash with an undisturbed run) and training
resumed, not restarted."""

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, SYNTHESIS, SYNTHESIZED_ROWS, copy_stages, run_cli, wait_for
from ray.util.state import list_actors
from test_synthesis_e2e import _rows

from ray_lt import commands
from ray_lt.config import load_config
from ray_lt.data import load_dataset
from ray_lt.errors import DataError
from ray_lt.generate.pixel import TRAINING_FILE
from ray_lt.generate.plan import MANIFEST_FILE
from ray_lt.generate.synthesize import SamplerStartError
from ray_lt.train import fit_classifier

DIGITS = ROOT / "configs" / "digits_lt.yaml"
SYNTH = SYNTHESIS
EPOCHS = 12  # after the first, a digits epoch takes about a second
PLANNED_ROWS = SYNTHESIZED_ROWS


def content_hashes(out: Path) -> dict[str, str]:
    """SHA-256 of each synthetic shard's rows (the table as one Arrow IPC stream)."""
    hashes = {}
    for path in sorted((out / "synthetic").glob("shard_*.parquet")):
        table = pq.read_table(path)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        hashes[path.name] = hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()
    return hashes


def popen_cli(*args: str) -> subprocess.Popen:
    """The ``ray-lt`` console script as a driver process of its own, to be killed."""
    exe = Path(sys.executable).with_name("ray-lt")
    return subprocess.Popen([str(exe), *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def alive_actors(class_name: str) -> list:
    """Live actors of the session's cluster (named: another cluster may run beside it)."""
    import ray

    address = ray.get_runtime_context().gcs_address
    return [a for a in list_actors(address=address, filters=[("state", "=", "ALIVE")])
            if class_name in a.class_name]


def registered(run: Path, key: str) -> int:
    """``key`` (epoch or step) of the run's latest checkpoint that Ray Train has registered
    (its snapshot, what a restore starts from; folders on disk may be ahead of it), or -1."""
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["metrics"][key])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


@pytest.fixture(scope="module")
def reference(synthesized):
    """Content hashes of the synthetic shards of an undisturbed run."""
    return content_hashes(synthesized)


def test_four_sampler_actors_of_five_asked_write_the_shards_of_one(trained, reference, tmp_path,
                                                                   caplog):
    out = copy_stages(trained, tmp_path / "four")
    # 5 x 0.4 CPU asked on the session's 2-CPU head: 4 fit beside the 0.25-CPU writer, and
    # the pool goes on with those.
    caplog.set_level(logging.WARNING, logger="ray_lt")
    commands.synthesize(load_config(DIGITS, [*SYNTH, "synthesis.num_actors=5",
                                             "synthesis.cpus_per_actor=0.4"]), out)
    assert "synthesis.num_actors: 5 asked, 4 fit beside the writer" in caplog.text
    planned = json.loads((out / "synthetic" / "plan.json").read_text())
    assert len(reference) == len(planned)
    assert content_hashes(out) == reference


def test_a_killed_sampler_actor_loses_and_duplicates_nothing(trained, reference, tmp_path):
    out = copy_stages(trained, tmp_path / "kill")
    cfg = load_config(DIGITS, SYNTH)
    errors = []

    def run():
        try:
            commands.synthesize(cfg, out)
        except Exception as err:  # surfaced by the assertion below
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    killed = None
    deadline = time.time() + 300
    while thread.is_alive() and killed is None and time.time() < deadline:
        if list((out / "synthetic").glob("shard_*.parquet")):
            for actor in alive_actors("GuidedSampler"):
                os.kill(actor.pid, signal.SIGKILL)
                killed = actor.pid
                break
        time.sleep(0.1)
    thread.join(timeout=600)
    assert killed is not None, "no sampler actor was seen alive"
    assert not errors, errors
    rows = _rows(out)
    assert len(rows) == PLANNED_ROWS
    assert not rows.duplicated(["shard_id", "seed"]).any()
    manifest = [json.loads(line) for line in
                (out / "synthetic" / MANIFEST_FILE).read_text().splitlines()]
    planned = json.loads((out / "synthetic" / "plan.json").read_text())
    assert {m["shard_id"] for m in manifest} == {s["shard_id"] for s in planned}
    assert content_hashes(out) == reference


def test_a_killed_driver_mid_synthesis_reruns_only_the_unfinished_shards(
        trained, reference, tmp_path, ray_session):
    out = copy_stages(trained, tmp_path / "driver")
    args = ["synthesize", "configs/digits_lt.yaml", "--out", str(out), "--set", *SYNTH,
            f"ray.address={ray_session['address']}"]
    driver = popen_cli(*args)
    wait_for(lambda: len(list((out / "synthetic").glob("shard_*.parquet"))) >= 4, 300, 0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    written = len(list((out / "synthetic").glob("shard_*.parquet")))
    assert written < len(reference), "the driver finished before it was killed"
    # Ray ends a dead driver's actors; the rerun must not find them holding the CPUs.
    wait_for(lambda: not alive_actors("GuidedSampler"), 120)

    done = run_cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"(\d+) shards already done, (\d+) to go", done.stdout)
    assert found, done.stdout
    kept, redone = int(found[1]), int(found[2])
    # Every shard file already written is kept, listed in the manifest or not.
    assert kept >= written and kept + redone == len(reference)
    assert content_hashes(out) == reference
    assert not list((out / "synthetic").glob(".shard_*.tmp"))  # a killed write's leftovers


def test_a_killed_classifier_worker_is_restarted_from_the_last_checkpoint(tmp_path,
                                                                          ray_session):
    cfg = load_config(DIGITS, [f"train.epochs={EPOCHS}", "scaling.max_failures=1"])
    data = load_dataset(cfg.dataset, cfg.seed)
    outcome = {}

    def fit():
        try:
            outcome["folder"] = fit_classifier(data, cfg.model, cfg.train, cfg.scaling, cfg.seed,
                                               tmp_path, "classifier", evaluate=cfg.evaluate)
        except Exception as err:  # surfaced by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=fit)
    thread.start()
    run = tmp_path / "ray_results" / "classifier"
    wait_for(lambda: registered(run, "epoch") >= 2, 300, 0.1)
    workers = alive_actors("RayTrainWorker")
    assert len(workers) == 1
    os.kill(workers[0].pid, signal.SIGKILL)
    last = registered(run, "epoch")
    thread.join(timeout=600)
    assert "error" not in outcome, outcome
    history = pd.read_csv(outcome["folder"] / "history.csv")
    assert history["epoch"].tolist() == list(range(EPOCHS))
    resumed = history["resumed_from"]
    assert resumed.max() >= last + 1, "the new worker started again from epoch 0"
    # Epochs before the restore come from the killed worker, the rest from its successor.
    assert (resumed[history["epoch"] < resumed.max()] == 0).all()
    assert (resumed[history["epoch"] >= resumed.max()] == resumed.max()).all()


def test_a_killed_generator_worker_then_a_killed_driver_resume_generator_training(
        tmp_path, ray_session):
    out = tmp_path / "run"
    args = ["train-generator", "configs/digits_lt.yaml", "--out", str(out), "--set",
            "generator.train_steps=60", "generator.checkpoint_every=10",
            "generator.block_out_channels=[16, 32]", "generator.batch_size=8",
            "scaling.max_failures=1", f"ray.address={ray_session['address']}"]
    run = out / "ray_results" / "generator"
    driver = popen_cli(*args)
    # A worker killed: FailureConfig starts a new one from the last registered checkpoint.
    wait_for(lambda: registered(run, "step") >= 20, 300, 0.1)
    workers = alive_actors("RayTrainWorker")
    assert len(workers) == 1
    os.kill(workers[0].pid, signal.SIGKILL)
    after_worker = registered(run, "step")
    # Then the driver killed: the same command again resumes the run where it was.
    wait_for(lambda: registered(run, "step") >= after_worker + 20, 300, 0.1)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    after_driver = registered(run, "step")
    assert after_driver < 60, "training finished before the driver was killed"
    wait_for(lambda: not alive_actors("RayTrainWorker"), 120)
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]

    training = json.loads((out / "generator" / TRAINING_FILE).read_text())
    assert training["steps"] == 60
    first, restored, rerun = training["starts"]
    assert first == 0 and restored >= after_worker >= 20 and restored % 10 == 0
    assert rerun == after_driver > restored
    losses = (out / "generator" / "loss.csv").read_text().splitlines()[1:]
    assert len(losses) == 60  # one loss per step, none lost and none repeated


def test_a_sampler_actor_that_cannot_start_fails_fast_naming_the_cause(trained, tmp_path):
    out = copy_stages(trained, tmp_path / "broken")
    # Present (the driver's checks pass) but unreadable: found only by the actor loading it.
    (out / "generator" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64)
    started = time.time()
    with pytest.raises(SamplerStartError, match=r"a sampler actor could not start: \S+") as err:
        commands.synthesize(load_config(DIGITS, SYNTH), out)
    assert time.time() - started < 120, "the failing actor was retried"
    assert "0 finished shard(s)" in str(err.value) and "rerun" in str(err.value)


NODE_LOSS = """
import json, socket, sys, threading, time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from ray_lt import commands
from ray_lt.config import load_config
from ray_lt.errors import DataError

out, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

# Not the default ports, which another cluster on this machine may hold.
cluster = Cluster(initialize_head=True,
                  head_node_args={"num_cpus": 1, "dashboard_port": free_port(),
                                  "dashboard_agent_listen_port": free_port()})
worker = cluster.add_node(num_cpus=1, dashboard_agent_listen_port=free_port())
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)
errors = []
# The state API answers once the head's dashboard is up, later than the nodes on a busy machine.
deadline = time.time() + 180
while True:
    try:
        list_actors(address=cluster.address)
        break
    except ConnectionError:
        if time.time() > deadline:
            raise
        time.sleep(1)

def run():
    try:
        commands.synthesize(load_config("configs/digits_lt.yaml", overrides), out)
    except Exception as err:
        errors.append(repr(err))

def on_worker():
    alive = list_actors(address=cluster.address, filters=[("state", "=", "ALIVE")])
    return [a.class_name for a in alive if a.node_id == worker.node_id]

thread = threading.Thread(target=run)
thread.start()
# Remove the node once a shard is written and a sampler actor runs there (the pool may
# start on the head first).
placed = []
while thread.is_alive() and not (list((out / "synthetic").glob("shard_*.parquet")) and
                                 any("GuidedSampler" in c for c in placed)):
    placed = on_worker()
    time.sleep(0.2)
written = len(list((out / "synthetic").glob("shard_*.parquet")))
cluster.remove_node(worker)
thread.join(timeout=900)
print(json.dumps({"on_worker": placed, "written_before": written, "errors": errors,
                  "hung": thread.is_alive()}))
ray.shutdown()
cluster.shutdown()
"""


def test_a_worker_node_removed_during_synthesis_still_fills_the_exact_quota(trained, reference,
                                                                            tmp_path):
    out = copy_stages(trained, tmp_path / "node")
    # One 0.75-CPU sampler actor fits per 1-CPU node: one runs on the node that goes.
    overrides = [*SYNTH, "synthesis.num_actors=2", "synthesis.cpus_per_actor=0.75"]
    done = subprocess.run([sys.executable, "-c", NODE_LOSS, str(out), json.dumps(overrides)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    # Ray's own lines (a raylet retrying a task) may share the subprocess's stdout.
    report = json.loads(next(line for line in done.stdout.splitlines()[::-1]
                             if line.startswith('{"on_worker"')))
    assert report["errors"] == [] and not report["hung"]
    assert "MapWorker(MapBatches(GuidedSampler))" in report["on_worker"]
    assert report["written_before"] < len(reference)
    assert len(_rows(out)) == PLANNED_ROWS
    assert content_hashes(out) == reference


@pytest.fixture
def small_disk(tmp_path):
    """A 48 KiB tmpfs: a disk that fills up after a few shards (needs mount rights)."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)  # Ray may still hold it


def test_a_disk_that_fills_up_during_synthesis_stops_clearly_and_keeps_its_shards(
        trained, reference, tmp_path, small_disk):
    out = copy_stages(trained, tmp_path / "full")
    (out / "synthetic").symlink_to(small_disk, target_is_directory=True)
    with pytest.raises(DataError, match=r"the disk holding .*synthetic is full \(No space left "
                                        r"on device.*finished shard\(s\) are kept") as err:
        commands.synthesize(load_config(DIGITS, SYNTH), out)
    kept = content_hashes(out)
    assert 0 < len(kept) < len(reference), str(err.value)
    assert all(reference[name] == digest for name, digest in kept.items())
    assert not list(small_disk.glob(".shard_*.tmp"))  # no partial shard file left behind
    # With room again the same command finishes, redoing only the missing shards.
    (out / "synthetic").unlink()
    (out / "synthetic").mkdir()
    for path in small_disk.iterdir():
        (out / "synthetic" / path.name).write_bytes(path.read_bytes())
    commands.synthesize(load_config(DIGITS, SYNTH), out)
    assert content_hashes(out) == reference
