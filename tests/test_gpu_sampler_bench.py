"""``bench/gpu_sampler.py`` at its CPU size: the table, the FLOP counts and ratios it reports,
and that it runs without Ray, pydantic or pandas (a bare GPU box has none of them)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, load_bench


def test_bench_reports_speed_ratios_and_flops(tmp_path, capsys):
    bench = load_bench("gpu_sampler")
    report = bench.main(["--tiny", "--steps", "5", "--repeats", "1", "--batches", "2",
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
    assert "guided k=5 (latent_resize, micro-batch 1)" in printed
    assert "unguided batch 2 vs one by one" in printed


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
