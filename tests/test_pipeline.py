"""``ray-lt run`` and ``ray-lt tune`` end to end on real local Ray clusters: every stage, the
report, on an autoscaling cluster that starts with no worker node; skipping finished stages,
refusing a changed config, a 2-trial Optuna search whose best config ``ray-lt plan`` accepts
at the run's quota, and a folder of the user's own images through ``jobs/balance.py`` and
``ray job submit``."""

import contextlib
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import (
    ROOT,
    autoscaling_cluster,
    run_cli,
    submit_and_wait,
    wait_for,
    watch_cluster,
)

from ray_lt.config import load_config
from ray_lt.pipeline import RUN_STAGES

SMALL = ["train.epochs=2", "generator.train_steps=16", "generator.block_out_channels=[16, 32]",
         "generator.batch_size=16", "synthesis.num_steps=4", "synthesis.guidance_every=2",
         "synthesis.quota_scale=0.2", "synthesis.cpus_per_actor=0.5",
         "synthesis.grid_samples=1", "synthesis.grid_scales=[0, 0.1]",
         "synthesis.sweep_scales=[0, 1]", "synthesis.sweep_samples=3",
         "synthesis.grid_criteria=[entropy, loss]", "evaluate.cpus_per_actor=0.5"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """``ray-lt run`` on the digits on an autoscaling cluster with no worker node at the start
    (stopped once the run is done); two sampler actors of 1.5 CPU need both of its 2-CPU
    worker nodes."""
    folder = tmp_path_factory.mktemp("pipeline")
    out = folder / "run"
    exe = str(Path(sys.executable).with_name("ray-lt"))
    with autoscaling_cluster(folder) as cluster, watch_cluster(cluster, folder) as seen:
        started = time.perf_counter()
        done = subprocess.run(
            [exe, "run", "configs/digits_lt.yaml", "--out", str(out), "--set", *SMALL,
             "synthesis.num_actors=2", "synthesis.cpus_per_actor=1.5",
             f"ray.address={cluster['address']}"],
            capture_output=True, text=True, timeout=900, cwd=ROOT, env=cluster["env"])
        elapsed = time.perf_counter() - started
        seen["removed_during_run"] = len(seen["now"]().get("removed", []))
        if done.returncode == 0:  # idle nodes go, whether the run left one idle or not
            with contextlib.suppress(TimeoutError):
                wait_for(lambda: seen["now"]().get("removed"), timeout=90)
    seen["seconds"] = elapsed
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done, seen


def test_a_run_from_zero_worker_nodes_grows_the_cluster_and_fills_the_exact_quota(digits_run):
    out, _, seen = digits_run
    print(f"autoscaling run: {seen}")
    timeline = seen["timeline"]
    assert timeline[0][1] == 0 and max(n for _, n in timeline) == 2, timeline
    # The pool asked for its two actors at once, and the autoscaler added a node for the second
    # (which joins the sampling if it is up before the last shard is taken).
    assert seen["sampler_actors"] == 2 and len(seen["sampler_nodes"]) >= 1, seen
    # A node left idle was removed: between stages while the run went on when a stage left
    # one idle (how the stages overlap decides that), at the latest once the run ended.
    # Nothing was lost: the exact quota, and every later stage finished.
    assert seen["removed"], seen
    plan = json.loads((out / "synthetic" / "plan.json").read_text())
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in (out / "synthetic").glob("shard_*"))
    assert rows == sum(shard["n"] for shard in plan) == 146
    assert (out / "report.md").is_file()


def test_run_writes_every_stage_and_the_report(digits_run):
    out, done, _ = digits_run
    stages = [stage.name for stage in RUN_STAGES if stage.enabled(load_config(
        ROOT / "configs" / "digits_lt.yaml", SMALL))]
    assert len(stages) == 10 and stages[-1] == "report"
    for step in range(1, 11):
        assert f"[ray-lt] stage {step}/10" in done.stdout
    # Every stage of the registry that ran is timed, and those that make outputs recorded.
    record = json.loads((out / "stages.json").read_text())
    assert set(record["timings"]) == {"data", *stages}
    assert {"classifier", "generator", "synthesis", "final", "grid"} <= set(record["config"])
    # Quiet by default: banners, results, warnings; Ray's lines stay in the logs.
    printed = done.stdout + done.stderr
    assert printed.count("\n") <= 100, printed[-3000:]
    assert "Dataset " not in printed and "execution finished" not in printed
    log = (out / "logs" / "ray-lt.log").read_text()
    assert "stage 10/10 report" in log and "Ray session logs" in log
    baseline = json.loads((out / "metrics.json").read_text())
    final = json.loads((out / "final" / "metrics.json").read_text())
    for key in ("overall", "many", "medium", "few", "worst_group", "per_class"):
        assert key in final
    assert final["num_rows"] == 500 and final["worst_group"] is None
    synthetic = pd.concat(pd.read_parquet(p) for p in (out / "synthetic").glob("shard_*"))
    expected = np.round(0.2 * (100 - np.array([100, 64, 41, 27, 17, 11, 7, 4, 3, 2])))
    assert synthetic.groupby("label").size().reindex(range(10), fill_value=0).tolist() == \
        expected.astype(int).tolist()
    history = pd.read_csv(out / "final" / "classifier" / "history.csv")
    assert {"val_few", "val_acc"} <= set(history.columns) and len(history) == 2

    report = (out / "report.md").read_text()
    row = f"| baseline (real) | {baseline['overall']:.3f} | {baseline['many']:.3f} |"
    assert row in report
    assert f"| final (real + synthetic) | {final['overall']:.3f} |" in report
    assert "![per-class accuracy](report/per_class_accuracy.png)" in report
    assert "| nine | 2 | 20 | 22 |" in report  # real, synthetic, total of the rarest class
    html = (out / "report.html").read_text()
    assert html.count("<table>") >= 3 and 'src="grid_class9.png"' in html
    for image in ("report/per_class_accuracy.png", "report/synthetic_samples.png",
                  "grid_class9.png"):
        assert (out / image).stat().st_size > 3000, image
    # The guidance sweep: the grid's two scales and the sweep's, per grid criterion.
    sweep = pd.read_csv(out / "report" / "guidance_sweep.csv")
    assert sweep["criterion"].tolist() == ["entropy"] * 3 + ["loss"] * 3
    assert sweep["scale"].tolist() == [0, 0.1, 1] * 2 and (sweep["samples"] == 3).all()
    assert sweep["in_grid"].tolist() == [True, True, False] * 2
    for column in ("guide_in_class", "judge_in_class"):
        assert sweep[column].between(0, 1).all() and (sweep[column] * 3 % 1 == 0).all()
    assert (sweep["nearest_train"] > 0).all() and sweep["judge_in_group"].isna().all()
    assert "## What guidance does" in report and "report/guidance_sweep.png" in report
    assert (out / "report" / "guidance_sweep.png").stat().st_size > 3000
    quality = pd.read_csv(out / "report" / "quality.csv")
    assert quality["criterion"].tolist() == ["all"]
    assert quality["samples"].iloc[0] == len(synthetic)
    assert np.isfinite(quality[["fid", "density", "coverage"]].to_numpy()).all()
    assert 0.0 <= quality["coverage"].iloc[0] <= 1.0


def test_stages_ran_side_by_side_and_a_sequential_run_makes_the_same_bits(digits_run,
                                                                          ray_session, tmp_path):
    """The graph trained the generator beside the baseline classifier; the same config run
    with --sequential (on another cluster, one stage at a time) writes the same models,
    samples and metrics, bit for bit."""
    out, done, _ = digits_run
    timings = json.loads((out / "stages.json").read_text())["timings"]
    span = {k: (v[-1]["started_after"], v[-1]["started_after"] + v[-1]["seconds"])
            for k, v in timings.items()}
    assert span["generator"][0] < span["classifier"][1]  # overlapped
    assert "generator: pixel; beside baseline classifier" in done.stdout
    for stage, reads in (("statistics", "classifier"), ("synthesis", "generator"),
                         ("final", "synthesis"), ("report", "evaluation")):
        assert span[stage][0] >= span[reads][1], (stage, reads)

    again = tmp_path / "sequential"
    sequential = run_cli("run", "configs/digits_lt.yaml", "--out", str(again), "--sequential",
                         "--set", *SMALL, "synthesis.num_actors=2",
                         "synthesis.cpus_per_actor=1.5", "report.grid=false",
                         "report.quality=false", f"ray.address={ray_session['address']}")
    assert sequential.returncode == 0, sequential.stderr[-3000:]
    assert "; beside " not in sequential.stdout and "stage 2/8 baseline evaluation [" in \
        sequential.stdout
    order = json.loads((again / "stages.json").read_text())["timings"]
    starts = sorted(order, key=lambda k: order[k][-1]["started_after"])
    assert starts[:4] == ["data", "classifier", "baseline_evaluation", "statistics"]
    for name in ("classifier/model.pt", "generator/unet/diffusion_pytorch_model.safetensors",
                 "final/classifier/model.pt", "metrics.json", "final/metrics.json"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name

    def samples(run):
        frame = pd.concat(pd.read_parquet(p, columns=["shard_id", "seed", "image"])
                          for p in (run / "synthetic").glob("shard_*"))
        return frame.sort_values(["shard_id", "seed"]).reset_index(drop=True)

    pd.testing.assert_frame_equal(samples(out), samples(again))


def test_rerun_skips_finished_stages_and_refuses_a_changed_config(digits_run, ray_session):
    out, _, _ = digits_run
    model = out / "final" / "classifier" / "model.pt"
    shards = sorted((out / "synthetic").glob("shard_*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in [model, *shards]]
    started = time.perf_counter()
    again = run_cli("run", "configs/digits_lt.yaml", "--out", str(out), "--set", *SMALL,
                    f"ray.address={ray_session['address']}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert time.perf_counter() - started < 120
    for text in ("baseline classifier already trained", "generator already trained",
                 "shards already done, 0 to go", "final classifier already trained",
                 "sample grid already drawn"):
        assert text in again.stdout, text
    assert [p.stat().st_mtime_ns for p in [model, *shards]] == stamps

    changed = run_cli("run", "configs/digits_lt.yaml", "--out", str(out), "--set", *SMALL,
                      "synthesis.guidance_scale=0.1", f"ray.address={ray_session['address']}")
    assert changed.returncode == 2
    assert "its synthesis stage was made with another config: synthesis.guidance_scale: " \
           "0.03 -> 0.1" in changed.stderr
    assert "[ray-lt] stage 1/10" not in changed.stdout  # refused before any stage ran


def test_the_readme_driver_runs_on_a_finished_run(digits_run, ray_session, capsys, caplog):
    """The README's Python example, executed with its config overrides and run directory
    replaced by the finished run's: every stage is found complete, and the run handle reads
    its metrics, draws guided samples in process and opens the synthetic set."""
    out, _, _ = digits_run
    readme = (ROOT / "README.md").read_text()
    code = readme.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    replaced = {'ray_lt.load_config("configs/digits_lt.yaml")':
                'ray_lt.load_config("configs/digits_lt.yaml", OVERRIDES)',
                '"runs/digits_lt"': "RUN", "'runs/digits_lt'": "RUN"}
    for old, new in replaced.items():
        assert old in code or old.startswith("'"), old
        code = code.replace(old, new)
    namespace = {"OVERRIDES": [*SMALL, f"ray.address={ray_session['address']}"],
                 "RUN": str(out)}
    caplog.set_level(logging.INFO, logger="ray_lt")
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    printed = capsys.readouterr().out
    final = json.loads((out / "final" / "metrics.json").read_text())
    assert namespace["metrics"] == final and f"final {final['few']:.3f}" in printed
    assert "146 synthetic rows; (8, 16, 16, 1)" in printed, printed[-2000:]
    assert "baseline classifier already trained" in caplog.text
    run, images = namespace["run"], namespace["images"]
    assert images.dtype == np.uint8 and images.shape == (8, 16, 16, 1)
    again = run.sample(label=9, n=8, scale=0.1)
    assert np.array_equal(again, images)  # a sample is a function of its seed and settings
    assert not np.array_equal(run.sample(label=9, n=8, scale=0.0), images)
    with pytest.raises(ValueError, match="not a class of this run"):
        run.sample(label=10)
    import torch

    assert run.classifier("baseline")(torch.zeros(1, 1, 16, 16)).shape == (1, 10)


def test_tune_two_trials_and_plan_the_best_config(digits_run, ray_session, tmp_path):
    out, _, _ = digits_run
    done = run_cli("tune", "configs/digits_lt.yaml", "--out", str(out), "--set", *SMALL,
                   "tune.num_trials=2", "tune.quota_scale=0.1",
                   "tune.space.criteria=[entropy, loss]", f"ray.address={ray_session['address']}",
                   timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "baseline classifier already trained" in done.stdout  # shared, not retrained
    table = pd.read_csv(out / "tune" / "results.csv")
    assert len(table) == 2
    for column in ("config/synthesis/guidance_scale", "config/mixture/entropy",
                   "config/train/synthetic_weight", "val_few", "test_few", "pareto"):
        assert column in table, column
    assert table["val_few"].between(0, 1).all() and table["pareto"].any()
    assert table["config/synthesis/guidance_scale"].between(0.003, 0.3).all()
    assert len(list((out / "trials").iterdir())) == 2
    assert list((out / "tune").rglob("events.out.tfevents*")), "no TensorBoard logs"
    assert (out / "tune" / "search.png").stat().st_size > 3000

    best_file = out / "best_config.yaml"
    best = load_config(best_file)
    winner = table[table["pareto"]].sort_values("val_few", ascending=False).iloc[0]
    assert best.synthesis.guidance_scale == pytest.approx(
        winner["config/synthesis/guidance_scale"])
    assert best.synthesis.quota_scale == pytest.approx(0.2)  # the run's quota, not the trial's
    # ray-lt accepts it as a run config: planned at the run's quota (0.2), not the trial's.
    planned = run_cli("plan", str(best_file), "--out", str(tmp_path / "plan"))
    assert planned.returncode == 0, planned.stderr[-3000:]
    assert "quota: 146 synthetic images to 100 per class (quota_scale 0.2)" in planned.stdout


def test_run_on_a_folder_with_contexts(tmp_path, ray_session):
    """Every stage on the user's own images: a folder per class and a context level below it
    (drawn shapes on coloured grounds, made here), with groups as NICO++ has them. The
    group-aware guide: trained with group DRO, guiding with the group criteria; the final
    model reweights the groups; the class x context generator, trained on an external pool of
    other shapes, fills each group."""
    from ray_lt.data.shapes import write_shapes

    root = tmp_path / "shapes"
    write_shapes(root, {"train": [24, 12, 6, 3], "val": [6] * 4, "test": [9] * 4},
                 contexts=["sand", "sky", "grass"], size=16)
    # The generator learns from a pool of other shapes in every class x context, the groups
    # empty in training included (generator.train_on: external).
    write_shapes(tmp_path / "pool", {"pool": [6] * 4}, contexts=["sand", "sky", "grass"],
                 size=16, seed=5)
    out = tmp_path / "groups"
    # Submitted to the session's head as a Ray job (jobs/balance.py), as on a cluster.
    settings = [*SMALL, f"dataset.root={root}", "dataset.contexts=true",
                "dataset.image_size=16", "scaling.cpus_per_worker=0.5",
                "generator.condition_on=class+context", "generator.train_on=external",
                f"generator.external={tmp_path / 'pool' / 'pool'}", "synthesis.balance=group",
                "synthesis.target=4", "train.group_objective=dro",
                "final.group_objective=reweight",
                "synthesis.criteria={target_group: 0.5, group_entropy: 0.5}",
                "synthesis.grid_criteria=[target_group, entropy]", "synthesis.grid_scales=null",
                "train.epochs=1",
                "evaluate.many_threshold=20", "evaluate.few_threshold=5", "report.quality=false"]
    logs = submit_and_wait(ray_session, f"jobs/balance.py --config configs/custom_lt.yaml "
                                        f"--out {out} --set " + " ".join(
                                            f"'{item}'" for item in settings))
    assert "stage 9/9 report" in logs, logs[-3000:]
    history = pd.read_csv(out / "classifier" / "history.csv")
    assert (history["dro_q_max"] > 1 / 12).all()  # q left the uniform start
    assert "dro_q_max" not in pd.read_csv(out / "final" / "classifier" / "history.csv")
    assert (out / "classifier" / "context_head.safetensors").is_file()
    final = json.loads((out / "final" / "metrics.json").read_text())
    assert final["worst_group"] is not None and len(final["per_group"]) == 12
    baseline = json.loads((out / "metrics.json").read_text())
    assert all(a is not None for a in baseline["per_group"])  # every group has test images
    assert baseline["worst_group"] == pytest.approx(min(baseline["per_group"]))
    assert sum(baseline["group_counts"]) == 45 and final["num_rows"] == 36  # train, test
    # classes sorted by folder name: circle 24, diamond 3, square 12, triangle 6
    assert baseline["class_counts"] == [24, 3, 12, 6]
    spec = json.loads((out / "generator" / "generator.json").read_text())
    assert spec["num_contexts"] == 3 and spec["num_conditions"] == 4
    trained_on = json.loads((out / "generator" / "training.json").read_text())["trained_on"]
    assert trained_on["source"] == "external" and trained_on["images"] == 24
    assert trained_on["per_group"] == [2] * 12
    counts = np.asarray(final["group_counts"])
    synthetic = pd.concat(pd.read_parquet(p) for p in (out / "synthetic").glob("shard_*"))
    written = synthetic.groupby("group").size().reindex(range(12), fill_value=0).to_numpy()
    plan = pd.DataFrame(json.loads((out / "synthetic" / "plan.json").read_text()))
    planned = plan.groupby("group")["n"].sum().reindex(range(12), fill_value=0).to_numpy()
    assert (written == planned).all()
    assert (planned[counts == 0] >= 1).all() and (planned[counts >= 4] == 0).all()
    assert (synthetic["group"] // 3 == synthetic["label"]).all()
    assert set(synthetic["criterion"]) == {"target_group", "group_entropy"}
    assert np.isfinite(synthetic["criterion_after"]).all()
    assert synthetic.groupby("criterion")["criterion_after"].mean()["target_group"] < 0
    report = (out / "report.md").read_text()
    assert "ray_lt report: folder" in report and "five worst groups" in report
    assert "external pool of 24 real images" in report and "12 of 12 class x context groups, " \
        "4 of the 4 empty in training among them" in report
    assert f"{final['worst_group']:.3f} |" in report
    # The grid draws the rarest class (diamond) in its empty context.
    assert "grid_class1.png" in report and (out / "grid_class1.png").stat().st_size > 3000
    # Its columns were chosen from the sweep (both of its scales: the judge's rate can only
    # have fallen at the last one), and the judge also tells the group.
    sweep = pd.read_csv(out / "report" / "guidance_sweep.csv")
    assert sweep["in_grid"].all() and sweep["judge_in_group"].between(0, 1).all()
