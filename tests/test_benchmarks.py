"""The benchmark scripts run end to end and report consistent numbers (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, env=env, timeout=600, check=False)


@pytest.mark.parametrize("allocator", ["reuse", "system"])
def test_bench_model_tiny(tmp_path, allocator):
    out = tmp_path / "bench.json"
    args = ["--tiny", "--sizes", "64x32", "--repeats", "2", "--train-repeats", "1", "--threads", "1",
            "--allocator", allocator, "--json", str(out)]
    if allocator == "system":
        args.append("--skip-train")
    result = _run("bench_model.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["config"]["allocator"].startswith(allocator)
    (res,) = report["results"]
    inf = res["inference"]
    assert res["size"] == [64, 32] and inf["num_patches"] == 8
    flops = inf["gflops_per_triplet"]
    assert flops["backbone"] > 0 and flops["editor"] > 0
    # The per-module split covers the EDITOR forward (the rest: a few small ops outside modules).
    assert sum(inf["editor_gflops_by_module"].values()) == pytest.approx(flops["editor"], rel=0.05)
    assert set(inf["editor_gflops_by_module"]) >= {"backbone", "hma"}
    for name in ("backbone", "editor"):
        assert len(inf["round_times_s"][name]) == 2
        assert inf["time_per_triplet_s"][name] == pytest.approx(min(inf["round_times_s"][name]) / inf["batch_triplets"])
    rounds = inf["round_times_s"]
    paired = sorted(e / b for e, b in zip(rounds["editor"], rounds["backbone"]))
    assert inf["paired_ratio"] == pytest.approx(sum(paired) / 2)
    assert 1 <= inf["kept_patches_mean"] <= 8
    assert "backbone" in result.stdout and "EDITOR" in result.stdout
    if allocator == "reuse":
        train = res["train"]
        assert train["step_peak_bytes"]["editor"] > 0 and train["step_peak_bytes"]["backbone"] > 0
        assert train["memory_ratio"] == pytest.approx(
            train["step_peak_bytes"]["editor"] / train["step_peak_bytes"]["backbone"])
    else:
        assert "train" not in res


def test_bench_extract_tiny(tmp_path):
    out = tmp_path / "extract.json"
    result = _run("bench_extract.py", "--images", "8", "--batch", "4", "--workers", "0", "--repeats", "1",
                  "--root", str(tmp_path / "data"), "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    (row,) = report["results"].values()  # one worker count
    assert list(report["results"]) == ["0"]
    assert row["triplets"] == 8
    assert row["extract_s"] > 0
    for key in ("loader_triplets_per_s", "model_triplets_per_s", "extract_triplets_per_s"):
        assert row[key] > 0
    assert row["extract_triplets_per_s"] == pytest.approx(8 / row["extract_s"])
