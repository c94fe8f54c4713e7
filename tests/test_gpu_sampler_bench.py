"""``bench/gpu_sampler.py`` at its CPU size: the table, the FLOP counts and ratios it reports,
each model's tiny parts, the published shapes of the full ones, and that it runs without Ray,
pydantic or pandas (a bare GPU box has none of them)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, load_bench

# The smallest setting the tests below use: one DDIM step, one timed batch of two, 32 px
# (half the tiny parts' default size).
MINIMAL = ["--tiny", "--steps", "1", "--repeats", "1", "--batches", "2", "--sizes", "32"]


def test_bench_reports_speed_ratios_and_flops(tmp_path, capsys):
    bench = load_bench("gpu_sampler")
    # at the tiny parts' 64 px: at 32 the quarter-size decode rounds to no FLOPs
    report = bench.main(["--tiny", "--steps", "1", "--repeats", "1", "--batches", "2",
                         "--decoders", "vae", "latent_resize", "--micro-batch", "1",
                         "--one-by-one", "--json", str(tmp_path / "out.json")])
    printed = capsys.readouterr().out
    rows = {r["name"]: r for r in report["results"]}
    assert list(rows) == ["unguided", "guided k=5 (vae, micro-batch 1)",
                          "guided k=5 (latent_resize, micro-batch 1)"]
    assert rows["unguided"]["ratio_to_unguided"] == 1.0
    assert all(r["images_per_s"] > 0 and r["tflops"] > 0 for r in rows.values())
    unguided = rows["unguided"]["tflop_per_batch"]
    full = rows["guided k=5 (vae, micro-batch 1)"]["tflop_per_batch"]
    small = rows["guided k=5 (latent_resize, micro-batch 1)"]["tflop_per_batch"]
    # Guidance adds decodes and their backward; decoding a quarter-size latent costs less.
    assert unguided < small < full
    assert report["batched_vs_one"] > 0
    assert -1.0 <= report["gradient_cosine_to_vae"]["latent_resize"] <= 1.0
    assert json.loads((tmp_path / "out.json").read_text())["parts"] == "tiny"
    assert report["model"] == "unclip" and all(r["model"] == "unclip" for r in rows.values())
    assert "guided k=5 (latent_resize, micro-batch 1)" in printed
    assert "unguided batch 2 vs one by one" in printed


@pytest.mark.parametrize("model", ["sd15", "sd21", "sdxl"])
def test_each_model_runs_on_its_tiny_parts(model, tmp_path, capsys):
    bench = load_bench("gpu_sampler")
    out = tmp_path / "out.json"
    report = bench.main([*MINIMAL, "--model", model, "--decoders", "vae", "--json", str(out)])
    rows = report["results"]
    assert [r["name"] for r in rows] == ["unguided", "guided k=5 (vae)"]
    assert all(r["model"] == model and 0 < r["images_per_s"] < 1e4 for r in rows)
    assert rows[0]["tflop_per_batch"] < rows[1]["tflop_per_batch"]
    saved = json.loads(out.read_text())
    assert (saved["model"], saved["parts"]) == (model, "tiny")
    assert f"CPU, {model} tiny parts (unet " in capsys.readouterr().out


def test_full_shapes_have_the_published_parameter_counts():
    """Built on the meta device (no memory, no init): the UNets' published sizes, and the
    parts each generator needs. The text encoders' counts are the byte-level vocabulary's."""
    bench = load_bench("gpu_sampler")
    # model: UNet parameters (millions), latent side, prediction type
    published = {"unclip": (870.2, 96, "v_prediction"), "sd15": (859.5, 64, "epsilon"),
                 "sd21": (865.9, 96, "v_prediction"), "sdxl": (2567.5, 128, "epsilon")}
    for model, expected in published.items():
        parts = bench.full_components(model, device="meta")
        unet = parts["unet"]
        assert unet.device == torch.device("meta")
        assert (round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
                unet.config.sample_size, parts["scheduler"].config.prediction_type) == expected
    assert {"text_encoder_2", "tokenizer_2"} <= set(parts)  # sdxl, the last
    assert parts["vae"].config.scaling_factor == 0.13025


def test_suite_runs_its_settings_in_order_and_keeps_them_in_the_json(tmp_path, capsys):
    bench = load_bench("gpu_sampler")
    out = tmp_path / "suite.json"
    # at half the tiny parts' size (32 and 48 px), which the suite takes from --sizes
    report = bench.main(["--tiny", "--suite", "--no-compile", "--steps", "1", "--repeats", "1",
                         "--sizes", "32", "--json", str(out)])
    expected = [(s.size, s.batch, s.name) for _, settings in bench.suite_phases("tiny", False, 32)
                for s in settings]
    assert [(r["size"], r["batch"], r["name"]) for r in report["results"]] == expected
    assert expected[:2] == [(32, 2, "unguided"), (32, 2, "guided k=5 (vae, micro-batch 1)")]
    assert {size for size, _, _ in expected} == {32, 48}
    assert [s.size for s in bench.suite_phases("tiny", False)[0][1]] == [64] * 4  # default
    assert not any(r["out_of_memory"] or r["compiled"] for r in report["results"])
    assert report["skipped"] == []
    assert set(report["batched_vs_one"]) == {"2", "4"}
    assert json.loads(out.read_text())["results"] == report["results"]
    printed = capsys.readouterr().out
    assert "[eager, " in printed and "unguided batch 4 vs one by one" in printed
    # a spent budget starts nothing more and names what it left out
    bench.main(["--tiny", "--suite", "--no-compile", "--steps", "1", "--repeats", "1",
                "--sizes", "32", "--budget-s", "0", "--json", str(out)])
    left = json.loads(out.read_text())
    assert len(left["skipped"]) == len(expected) and left["results"] == []


def test_bench_imports_without_ray_pydantic_or_pandas():
    code = ("import sys\n"
            "for name in ('ray', 'pydantic', 'pandas', 'pyarrow'):\n"
            "    sys.modules[name] = None\n"
            f"sys.argv = ['gpu_sampler']\n"
            "import runpy\n"
            f"module = runpy.run_path({str(ROOT / 'bench' / 'gpu_sampler.py')!r})\n"
            "print(sorted(k for k in ('Setting', 'main', 'full_unclip_components') "
            "if k in module))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['Setting', 'full_unclip_components', 'main']"
