"""What a refused or interrupted command leaves behind, and how it says why: the user's files
untouched, one command per run directory, numbers that cannot train refused, and one line
(exit 2, or 130 for Ctrl-C) instead of a traceback. None of these start Ray."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import pytest
import ray
from conftest import ROOT, imagenet_lt_folder, nico_folder, run_cli, wait_for

from ray_lt.cli import main, user_error
from ray_lt.cluster import ray_start_failure
from ray_lt.config import load_config
from ray_lt.data import LongTailData
from ray_lt.data.files import read_nico_metadata, read_split_list
from ray_lt.errors import ConfigError, DataError
from ray_lt.pipeline import STAGES, check_inputs
from ray_lt.rundir import LOCK_FILE, acquire_lock, release_lock, write_run_config
from ray_lt.stages import record_stage

DIGITS = ROOT / "configs" / "digits_lt.yaml"
CUSTOM = ROOT / "configs" / "custom_lt.yaml"


def _run(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


# -- nothing of the user's overwritten ---------------------------------------------------------

def test_a_refused_command_leaves_the_users_config_yaml_as_it_was(tmp_path, capsys,
                                                                   monkeypatch):
    own = tmp_path / "config.yaml"
    own.write_text("# my settings, with comments\n" + CUSTOM.read_text())
    before = own.read_bytes()
    monkeypatch.chdir(tmp_path)
    code, err = _run(capsys, "train", "config.yaml", "--out", ".", "--set",
                     "dataset.root=/nonexistent")
    assert code == 2 and "dataset.root: data folder /nonexistent does not exist" in err, err
    assert own.read_bytes() == before
    root = imagenet_lt_folder(tmp_path / "data", counts=(3, 2, 1))
    code, err = _run(capsys, "train", "config.yaml", "--out", ".", "--set",
                     "dataset.kind=imagenet_lt", f"dataset.root={root}",
                     "dataset.num_classes=3")
    assert code == 2, err  # the data is fine, but the run would overwrite config.yaml
    assert f"--out {tmp_path.resolve()}: {own.resolve()} is not a config that ray-lt wrote " \
           f"for a run" in err
    assert own.read_bytes() == before


def test_a_run_refused_by_a_finished_stage_keeps_that_runs_config(tmp_path, capsys):
    out = tmp_path / "run"
    finished = load_config(CUSTOM, [f"dataset.root={tmp_path}"])
    (out / "classifier").mkdir(parents=True)
    record_stage(finished, out, STAGES["classifier"])
    path = write_run_config(finished, out, "run")
    before = path.read_bytes()
    code, err = _run(capsys, "run", str(DIGITS), "--out", str(out))
    assert code == 2
    assert "its classifier stage was made with another config: dataset.kind: 'folder' " \
           "-> 'digits_lt'" in err, err
    assert path.read_bytes() == before
    assert load_config(path) == finished  # what ray-lt wrote reads back to the same config


# -- one command per run directory -------------------------------------------------------------

HOLD = ("import sys, time; from ray_lt.rundir import acquire_lock; "
        "acquire_lock(sys.argv[1], 'run'); print('held', flush=True); time.sleep(600)")


def test_a_second_command_in_a_busy_run_directory_is_refused_and_a_dead_holders_lock_taken(
        tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.perf_counter()
        code, err = _run(capsys, "train", str(DIGITS), "--out", str(out))
        assert code == 2
        assert (f"another ray-lt command is running in this run directory: PID {holder.pid} "
                f"on host {socket.gethostname()} (`ray-lt run`, since ") in err, err
        assert time.perf_counter() - started < 30  # at once, not after the training
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing else written
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the lock file stays, stale
        holder.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid
    path = acquire_lock(out, "train")  # the dead process's lock is taken over
    assert json.loads(path.read_text())["pid"] == os.getpid()
    release_lock(path)
    assert not path.exists()


def test_a_lock_of_a_live_process_on_another_host_is_never_taken(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps(
        {"pid": 1, "host": "gpu-node-7", "command": "tune", "started": "2026-12-01 10:00:00"}))
    with pytest.raises(ConfigError, match="PID 1 on host gpu-node-7 \\(`ray-lt tune`"):
        acquire_lock(tmp_path, "run")


# -- numbers that cannot train -----------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("train.lr=inf", "train.lr"), ("synthesis.guidance_scale=.inf", "synthesis.guidance_scale"),
    ("synthesis.guidance_scale=nan", "synthesis.guidance_scale"),
    ("synthesis.criteria={entropy: .nan}", "synthesis.criteria.entropy"),
    ("tune.space.guidance_scale=[0, .inf]", "tune.space.guidance_scale.1"),
    ("generator.lr=-.inf", "generator.lr")])
def test_inf_and_nan_are_refused_for_every_float(override, key, capsys, tmp_path):
    code, err = _run(capsys, "run", str(DIGITS), "--out", str(tmp_path / "never"), "--set",
                     override)
    assert code == 2
    assert f"{key}: must be a finite number, got " in err, err
    assert "(inf and nan are refused)" in err


def test_an_empty_out_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["run", str(DIGITS), "--out", ""])
    assert stop.value.code == 2
    assert "argument --out: the run directory is empty" in capsys.readouterr().err


def test_a_criterion_statistic_too_large_for_the_model_is_refused_before_ray(tmp_path):
    cfg = load_config(ROOT / "configs" / "imagenet_lt.yaml",
                      [f"dataset.root={tmp_path}", "synthesis.criteria={entropy: 0.5, "
                       "hardness: 0.5}", "synthesis.hardness_covariance=full"])
    table = pd.DataFrame({"path": ["a.jpg"], "label": [0], "group": [-1], "source": ["l:1"]})
    data = LongTailData({s: table for s in ("train", "val", "test")}, np.ones(1000, int),
                        [f"c{i}" for i in range(1000)], (224, 224, 3), root=tmp_path)
    with pytest.raises(ConfigError) as err:
        check_inputs(cfg, data)
    assert str(err.value).startswith(
        "synthesis.hardness_covariance: 'full' stores 1000 precisions of 2048 x 2048 float32 = "
        "15.6 GiB on every sampler")
    assert f"(model.name {cfg.model.name} has 2048 features, the data set 1000 classes)" in \
        str(err.value)
    check_inputs(cfg.model_copy(update={"synthesis": cfg.synthesis.model_copy(
        update={"hardness_covariance": "tied"})}), data)


def test_a_grid_class_the_data_set_lacks_is_refused_before_ray(capsys, tmp_path):
    code, err = _run(capsys, "run", str(DIGITS), "--out", str(tmp_path / "never"), "--set",
                     "synthesis.grid_class=12")
    assert code == 2
    assert "synthesis.grid_class: 12 is not a class of this data set (it has 10" in err, err
    assert not (tmp_path / "never").exists()  # nothing written: refused before Ray starts


# -- tracebacks gone ---------------------------------------------------------------------------

def test_a_config_with_a_latin1_byte_names_its_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(DIGITS.read_bytes() + "# caf\u00e9\n".encode("latin-1"))
    code, err = _run(capsys, "run", str(bad), "--out", str(tmp_path / "run"))
    lines = DIGITS.read_bytes().count(b"\n") + 1
    assert code == 2
    assert f"{bad}:{lines}: the config file is not UTF-8 text (byte 0xe9 at column 6); save " \
           f"it as UTF-8" in err, err
    assert "Traceback" not in err


def test_a_list_with_a_latin1_path_names_its_line(tmp_path):
    root = imagenet_lt_folder(tmp_path)
    listing = root / "ImageNet_LT_train.txt"
    listing.write_bytes(listing.read_bytes() + "train/n0000/\u00e9.JPEG 0\n".encode("latin-1"))
    lines = listing.read_bytes().count(b"\n")
    with pytest.raises(DataError, match=f"{listing}:{lines}: the split list is not UTF-8 text "
                                        r"\(byte 0xe9 at column 13\)"):
        read_split_list(listing, root, 3)


def test_a_truncated_stages_record_is_named(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "stages.json").write_text('{"config": {"classifier": {"seed": 0')
    code, err = _run(capsys, "run", str(DIGITS), "--out", str(out))
    assert code == 2
    assert f"{out / 'stages.json'}: not a valid stages record (" in err, err
    assert "Traceback" not in err


def test_errors_raised_on_ray_workers_are_told_in_one_line():
    cause = ConfigError("generator.pretrained: component folder /m/unet is empty")
    wrapped = ray.exceptions.RayTaskError("sample", "Traceback ...\nConfigError: ...", cause)
    assert user_error(wrapped.as_instanceof_cause()) == str(cause)
    assert user_error(ray.exceptions.RayTaskError("sample", "tb", cause)) == str(cause)
    failed = DataError("list.txt:3: unreadable image a.jpg")
    text_only = ray.exceptions.ActorDiedError(ray.exceptions.RayTaskError(  # keeps only text
        "GuidedSampler.__init__", 'Traceback (most recent call last):\n  File "x.py", line 1, '
        f"in <module>\nray_lt.errors.DataError: {failed}", failed))
    assert user_error(text_only) == str(failed)
    assert user_error(ValueError("a fault of ray_lt itself")) is None


def test_a_cluster_that_cannot_be_reached_is_named(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    done = run_cli("train", str(DIGITS), "--out", str(tmp_path / "never"), "--set",
                   f"ray.address=127.0.0.1:{port}", timeout=120)
    assert done.returncode == 2
    assert (f"ray.address '127.0.0.1:{port}': could not connect to the Ray cluster: nothing "
            f"answers at 127.0.0.1:{port}; check the address") in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert time.perf_counter() - started < 60  # not Ray's minutes of retries
    token = ray_start_failure("10.0.0.5:6379", "10.0.0.5:6379", ConnectionError(
        "Authentication failed: UNAUTHENTICATED: invalid token"))
    assert "the cluster refused this machine's authentication token" in token
    local = ray_start_failure("local", None, Exception(
        "The current node timed out during startup. This could happen because ..."))
    assert local.startswith("Ray could not start a local cluster on this machine: The current "
                            "node timed out during startup.")


@pytest.mark.slow
def test_ctrl_c_while_ray_starts_ends_in_one_line_and_stops_its_ray(tmp_path):
    temp = tempfile.mkdtemp(prefix="rl-", dir="/tmp")  # short: Ray's socket paths live here
    env = {**os.environ, "RAY_TMPDIR": temp}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "ray_lt.cli", "train", str(DIGITS), "--out",
               str(tmp_path / "run"), "--set", "ray.address=local"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)

    def ray_running() -> bool:
        return any(temp in " ".join(p.cmdline()) for p in _processes())

    wait_for(ray_running, timeout=120, every=0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "ray-lt train: interrupted; what has finished is kept in" in err, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    wait_for(lambda: not ray_running(), timeout=20, every=0.5)


def _processes():
    import psutil

    for p in psutil.process_iter():
        try:
            p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        yield p


# -- valid input accepted, invalid refused -----------------------------------------------------

def test_a_list_with_a_byte_order_mark_and_a_path_with_spaces_is_read(tmp_path):
    root = imagenet_lt_folder(tmp_path)
    (root / "train/n0001/my photo 1.JPEG").write_bytes(
        (root / "train/n0001/img_0.JPEG").read_bytes())
    listing = root / "ImageNet_LT_train.txt"
    listing.write_bytes(b"\xef\xbb\xbf" + listing.read_bytes()
                        + b"train/n0001/my photo 1.JPEG\t1\n")
    table = read_split_list(listing, root, 3)
    assert table["path"].iloc[0] == "train/n0000/img_0.JPEG"  # no BOM inside the first path
    assert table["path"].iloc[-1] == "train/n0001/my photo 1.JPEG"
    assert table["label"].tolist() == [0, 0, 0, 1, 1, 2, 1]


def test_nico_metadata_with_a_column_named_twice_is_refused(tmp_path):
    root = nico_folder(tmp_path)
    meta = root / "metadata.csv"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join([lines[0] + ",y"] + [line + ",1" for line in lines[1:]]) + "\n")
    with pytest.raises(DataError) as err:
        read_nico_metadata(meta, root, 2, 3)
    assert str(err.value) == (f"{meta}:1: the header names y (columns 3, 5) more than once; "
                              f"keep one column of each name")


# -- on Ray ------------------------------------------------------------------------------------

def test_a_loss_that_is_not_finite_stops_training_and_exports_nothing(tmp_path, ray_session,
                                                                    capsys):
    out = tmp_path / "run"
    code, err = _run(capsys, "train", str(DIGITS), "--out", str(out), "--set", "train.lr=1e30",
                     "train.epochs=3", f"ray.address={ray_session['address']}")
    assert code == 2
    assert "ray-lt train: error: classifier: the training loss became nan in epoch 1, so " \
           "training stopped there and nothing was exported; no epoch before it ended finite" \
           in err, err
    assert "Lower train.lr (now 1e+30)" in err and "Traceback" not in err
    assert not (out / "classifier").exists() and not (out / "metrics.json").exists()


def test_a_worker_whose_loss_is_not_finite_stops_every_worker_and_keeps_the_last_checkpoint(
        tmp_path, ray_session):
    """Two DDP workers; only rank 1's loss is NaN in epoch 2: both stop there (no hang in the
    all-reduce), nothing is reported for it, and epoch 1's checkpoint is the run's last."""
    import torch

    from ray_lt.config import ScalingSection
    from ray_lt.errors import TrainingError
    from ray_lt.train.trainer import run_trainer

    def loop(config):
        import tempfile
        from pathlib import Path

        import ray.train
        import torch

        from ray_lt.train.progress import finite_everywhere, report_divergence

        rank = ray.train.get_context().get_world_rank()
        for epoch in range(3):
            loss = float("nan") if (epoch, rank) == (1, 1) else 1.0
            if not finite_everywhere(loss, torch.device("cpu")):
                if rank == 0:
                    report_divergence(config, epoch + 1, float("nan"), epoch or None)
                return
            with tempfile.TemporaryDirectory() as folder:
                saved = None
                if rank == 0:
                    torch.save({"epoch": epoch}, Path(folder) / "state.pt")
                    saved = ray.train.Checkpoint.from_directory(folder)
                ray.train.report({"epoch": epoch}, checkpoint=saved)

    scaling = ScalingSection(num_workers=2, cpus_per_worker=0.5, checkpoints_to_keep=3)
    runs = tmp_path / "ray_results" / "toy"
    with pytest.raises(TrainingError) as err:
        run_trainer(loop, {}, {}, scaling, tmp_path, "toy", split=[], lr=("train.lr", 0.1))
    assert str(err.value).startswith(
        f"toy: the training loss became nan in epoch 2, so training stopped there and nothing "
        f"was exported; the last finite checkpoint (epoch 1) is kept in {runs}. Lower train.lr "
        f"(now 0.1), delete {runs} and train again")
    saved = [torch.load(p / "state.pt")["epoch"] for p in sorted(runs.glob("checkpoint_*"))
             if p.is_dir()]
    assert saved == [0]


def test_an_unreadable_image_without_verify_images_names_its_file_and_line(tmp_path,
                                                                           ray_session):
    from ray_lt import commands

    root = imagenet_lt_folder(tmp_path / "data")
    image = root / "train/n0000/img_1.JPEG"
    image.write_bytes(image.read_bytes()[:200])  # truncated
    listing = root / "ImageNet_LT_train.txt"
    line = listing.read_text().splitlines().index("train/n0000/img_1.JPEG 0") + 1
    cfg = load_config(CUSTOM, ["dataset.kind=imagenet_lt", f"dataset.root={root}",
                               "dataset.num_classes=3", "dataset.verify_images=false",
                               "train.epochs=1",
                               f"ray.address={ray_session['address']}"])
    with pytest.raises(Exception) as err:
        commands.train(cfg, tmp_path / "run")
    message = user_error(err.value)
    assert message is not None, err.value
    assert message.startswith(f"{listing}:{line}: unreadable image {image}: "), message
    assert message.endswith("(dataset.verify_images: true finds every such file before "
                            "training)")
