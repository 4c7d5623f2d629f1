"""The benchmark scripts run end to end and report what their docstrings promise.

Only the shape and sanity of the reports are checked (keys present, times and FLOPs positive,
ratios finite and positive, patch counts within the patch grid); no timing is asserted and the
scripts' own arithmetic is not recomputed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)


def _run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, str(ROOT / "benchmarks" / script), *args])


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _plausible_ratio(value) -> bool:
    # EDITOR runs the backbone and more, on a shared machine: anything far outside this range
    # means a broken measurement, not a slow one.
    return _positive(value) and 0.05 < value < 100


def _run_bench_model(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    # A small reference matmul: the default 2048x2048 one is most of a CPU run's time.
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_model.py"), "--tiny", "--sizes", "64x32",
               "--threads", "1", "--matmul-size", "64", "--json", str(out), *args]
    result = _run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


def test_bench_model_reports_inference_flops_and_training(tmp_path):
    report, stdout = _run_bench_model(tmp_path, "--repeats", "2", "--train-repeats", "1", "--allocator", "reuse")
    assert report["config"]["allocator"].startswith("reuse")
    assert _positive(report["matmul_peak_gflops"]) and _positive(report["matmul_peak_gflops_end"])
    (res,) = report["results"]
    assert res["size"] == [64, 32]

    inf = res["inference"]
    for variant in ("backbone", "editor"):
        assert _positive(inf["time_per_triplet_s"][variant])
        assert len(inf["round_times_s"][variant]) == 2 and all(map(_positive, inf["round_times_s"][variant]))
        assert _positive(inf["gflops_per_triplet"][variant])
        assert _positive(inf["achieved_gflops"][variant])
        assert _positive(inf["fraction_of_matmul_peak"][variant])
    assert all(_plausible_ratio(inf[key]) for key in ("ratio", "median_ratio", "paired_ratio"))
    assert _positive(inf["matmul_peak_gflops"])
    # The per-module FLOPs split the EDITOR forward (the rest: a few small ops outside modules).
    by_module = inf["editor_gflops_by_module"]
    assert {"backbone", "hma"} <= set(by_module) and all(v >= 0 for v in by_module.values())
    assert sum(by_module.values()) == pytest.approx(inf["gflops_per_triplet"]["editor"], rel=0.05)
    # 64x32 with 16x16 patches is a 4x2 grid; SFTS keeps at least one patch.
    assert inf["num_patches"] == 8
    assert 1 <= inf["kept_patches_mean"] <= inf["kept_patches_max"] <= inf["num_patches"]

    train = res["train"]
    for variant in ("backbone", "editor"):
        assert _positive(train["step_time_s"][variant])
        assert len(train["round_times_s"][variant]) == 1
        assert _positive(train["step_peak_bytes"][variant])
        assert train["total_peak_bytes"][variant] >= train["step_peak_bytes"][variant]
    for key in ("time_ratio", "median_time_ratio", "paired_time_ratio", "memory_ratio", "total_memory_ratio"):
        assert _plausible_ratio(train[key]), key
    assert "backbone" in stdout and "EDITOR" in stdout and "train step" in stdout


def test_bench_model_skip_train_under_the_system_allocator(tmp_path):
    report, stdout = _run_bench_model(tmp_path, "--repeats", "1", "--skip-train", "--inputs", "random")
    assert report["config"]["allocator"].startswith("system") and report["config"]["inputs"] == "random"
    (res,) = report["results"]
    assert "train" not in res and "train step" not in stdout
    assert _positive(res["inference"]["time_per_triplet_s"]["editor"])


def test_bench_extract_reports_rates_per_worker_count(tmp_path):
    out = tmp_path / "extract.json"
    result = _run_script("bench_extract.py", "--images", "8", "--batch", "4", "--workers", "0", "--repeats", "1",
                         "--root", str(tmp_path / "data"), "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["layout"] == "rgbnt201" and report["batch"] == 4
    assert list(report["results"]) == ["0"]
    row = report["results"]["0"]
    assert row["triplets"] == 8
    for key in ("first_pass_s", "extract_s", "loader_triplets_per_s", "model_triplets_per_s", "extract_triplets_per_s",
                "run_extract_triplets_per_s", "run_extract_s", "setup_s"):
        assert _positive(row[key]), key
    assert _plausible_ratio(row["run_extract_ratio_to_model"])
    assert _plausible_ratio(report["feature_extractor_paths"]["ratio_to_model"])
    assert "extract trip/s" in result.stdout and "run_ext trip/s" in result.stdout


def test_bench_metrics_agrees_with_the_reference_evaluator():
    # The script itself asserts that evaluate_rank and the reference loop agree to 1e-6.
    result = _run_script("bench_metrics.py", "--queries", "40", "--gallery", "300", "--ids", "6", "--cameras", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "results identical" in result.stdout


def test_bench_memory_reports_the_rss_trend_of_a_training_run(tmp_path):
    out = tmp_path / "memory.json"
    result = _run_script("bench_memory.py", "--tiny", "--steps", "24", "--eval-every", "12", "--trim-after-eval",
                         "--threads", "1", "--print-every", "0", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["steps"] == 24 and 1 <= report["warmup_steps"] <= 12
    config = report["config"]
    assert config["loop"] == "trainer" and config["allocator"].startswith("system") and config["trim_after_eval"]
    assert _positive(report["seconds_per_step"])
    rss = report["rss_mib"]
    assert all(_positive(rss[key]) for key in ("first_step", "warmup_end", "end", "peak"))
    assert rss["peak"] >= max(rss["first_step"], rss["warmup_end"], rss["end"]) - 1  # sampled vs high-water
    assert math.isfinite(report["slope_mib_per_100_steps"])
    assert report["slope_window"] == [13, 24]
    assert len(report["samples"]["rss_mib"]) == 24
    if "heap_mib" in report:  # glibc only
        assert all(math.isfinite(report["heap_mib"][k]["slope_per_100_steps"]) for k in ("in_use", "free_held"))
    # 128x64 with 16x16 patches is an 8x4 grid; SFTS keeps at least the frequency budget.
    kept = report["kept_patches"]
    assert report["num_patches"] == 32
    assert 1 <= kept["min"] <= kept["mean"] <= kept["max"] <= 32 and kept["distinct_padded_lengths"] >= 1
    assert [e["step"] for e in report["evaluations"]] == [12, 24]
    assert "RSS slope" in result.stdout


def test_bench_serve_reports_throughput_latency_and_no_errors(tmp_path):
    out = tmp_path / "serve.json"
    result = _run_script("bench_serve.py", "--searches", "24", "--concurrency", "4", "--add-every", "6",
                         "--warmup", "2", "--gallery", "60", "--size", "64x32", "--json", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == 0 and report["searches"] == 24 and report["adds"] == 4
    assert report["gallery_entries_at_end"] == 60 + 4
    assert _positive(report["requests_per_s"]) and _positive(report["searches_per_s"])
    for kind in ("search", "add"):
        stats = report["latency_ms"][kind]
        assert all(_positive(stats[key]) for key in ("p50", "p95", "p99", "mean"))
        assert stats["p50"] <= stats["p95"] <= stats["p99"]
    assert report["batches"] >= 1 and 1 <= report["mean_batch"] <= 16
    assert "requests/s" in result.stdout and "errors: 0" in result.stdout


def test_bench_search_reports_every_kind_and_the_auto_choice(tmp_path):
    pytest.importorskip("faiss")
    out = tmp_path / "search.json"
    result = _run_script("bench_search.py", "--sizes", "2000", "--dim", "64", "--queries", "20", "--batch1", "3",
                         "--hnsw-max", "1000", "--workdir", str(tmp_path), "--json", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    entry = report["sizes"]["2000"]
    assert entry["auto"] == "flat"
    rows = entry["kinds"]
    assert rows["flat"]["recall_at_k"] == 1.0 and rows["flat"]["speedup_batched"] == 1.0
    assert "not built above --hnsw-max" in rows["hnsw"]["skipped"]
    ivfpq = rows["ivfpq"]
    assert 0 < ivfpq["recall_at_k"] <= 1 and ivfpq["params"]["nlist"] >= 16
    for key in ("build_s", "index_bytes", "batch1_ms_per_query", "batched_ms_per_query", "speedup_batch1"):
        assert _positive(ivfpq[key]), key
    assert "auto = flat" in result.stdout and "recall@10" in result.stdout
    assert list(tmp_path.iterdir()) == [out]  # the memory-mapped gallery is removed


def test_bench_onnx_reports_parity_and_speed_of_both_backends(tmp_path):
    out = tmp_path / "onnx.json"
    result = _run_script("bench_onnx.py", "--tiny", "--batches", "1,3", "--repeats", "1", "--threads", "1",
                         "--json", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["size"] == [64, 32] and _positive(report["export"]["seconds"]) and _positive(report["export"]["mib"])
    assert [p["batch"] for p in report["parity"]] == [1, 3] and [s["batch"] for s in report["speed"]] == [1, 3]
    for p in report["parity"]:
        assert p["masks_differ_untied"] == 0 and p["max_rel_error_all"] >= 0
        assert p["max_rel_error"] is None or p["max_rel_error"] < 1e-4
        assert 1 <= p["kept_min"] <= p["kept_max"] <= p["num_patches"] == 8
    for s in report["speed"]:
        assert all(_positive(s["triplets_per_s"][k]) for k in ("torch", "onnxruntime"))
        assert _positive(s["ratio"]) and _positive(s["median_ratio"])
    assert "onnxruntime trip/s" in result.stdout and "max rel err" in result.stdout


def test_bench_report_times_and_sizes_the_report(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    out = tmp_path / "report.json"
    for extra in ([], ["--random-features"]):
        result = _run_script("bench_report.py", "--ids", "8", "--views", "2", "--max-queries", "2", "--root",
                             str(tmp_path / "data"), "--out", str(tmp_path / "report.html"), "--json", str(out), *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(out.read_text())
        for key in ("report s", "size MB"):
            assert _positive(report[key]), key
        assert report["features s"] >= 0 and (extra or _positive(report["features s"]))
        assert report["report s / 60 s target"] == pytest.approx(report["report s"] / 60, abs=1e-3)
        assert report["size / 25 MB target"] == pytest.approx(report["size MB"] / 25, abs=1e-3)
        assert report["features"].startswith("random" if extra else "extracted")
        assert (tmp_path / "report.html").stat().st_size > 10_000


def test_bench_bf16_compares_fp32_and_bf16(tmp_path):
    out = tmp_path / "bf16.json"
    result = _run_script("bench_bf16.py", "--tiny", "--size", "64x32", "--batch", "4", "--train-batch", "4",
                         "--repeats", "1", "--train-repeats", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("fp32 triplets/s", "bf16 triplets/s", "fp32 train step s", "bf16 train step s"):
        assert _positive(report[key]), key
    assert 0 <= report["token-mask agreement"] <= 1
    assert 0.9 < report["feature cosine min"] <= 1.0 + 1e-6
    assert report["bf16"].startswith(("native", "emulated")) and "amp auto ->" in report["bf16"]


def test_bench_model_grad_checkpointing_flag(tmp_path):
    report, stdout = _run_bench_model(tmp_path, "--repeats", "1", "--train-repeats", "1", "--grad-checkpointing")
    assert report["config"]["grad_checkpointing"] is True
    assert "grad checkpointing True" in stdout


def test_bench_search_reports_milvus_beside_faiss_on_the_same_vectors(tmp_path):
    pytest.importorskip("faiss")
    pytest.importorskip("milvus_lite")
    out = tmp_path / "search.json"
    result = _run_script("bench_search.py", "--sizes", "2000", "--dim", "64", "--queries", "20", "--batch1", "3",
                         "--hnsw-max", "1000", "--backend", "faiss,milvus", "--params", "ivf:nprobe=2",
                         "--workdir", str(tmp_path), "--json", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["backends"] == ["faiss", "milvus"] and report["milvus"]["kinds"] == ["flat", "ivf", "hnsw"]
    assert set(report["sizes"]["2000"]["kinds"]) == {"flat", "ivfpq", "hnsw"}  # the FAISS rows are unchanged
    rows = report["sizes"]["2000"]["milvus"]["kinds"]
    flat, ivf = rows["flat"], rows["ivf"]
    assert flat["entries"] == flat["indexed_rows"] == 2000 and flat["server_index"]["index_type"] == "FLAT"
    assert flat["recall_at_k"] == 1.0 and flat["same_rows"] == 1.0 and flat["same_top_k_sets"] == 1.0
    assert 0 <= flat["max_abs_distance_diff"] < 1e-5
    assert ivf["params"] == {"nlist": 32, "nprobe": 2} and ivf["server_index"]["index_type"] == "IVF_FLAT"
    assert 0 < ivf["recall_at_k"] < 1  # nprobe 2 of at least 32 lists misses some of the exact top 10
    for row in (flat, ivf):
        assert math.isclose(row["build_s"], row["upsert_s"] + row["flush_s"])
        for key in ("upsert_s", "flush_s", "batch1_ms_per_query", "batched_ms_per_query", "speedup_batch1",
                    "speedup_batched"):
            assert _positive(row[key]), key
    assert "not built above --hnsw-max" in rows["hnsw"]["skipped"]
    assert "same rows" in result.stdout and "the server describes: index_type IVF_FLAT" in result.stdout
    assert list(tmp_path.iterdir()) == [out]  # the gallery and the Milvus Lite folder are removed


def test_bench_search_skips_milvus_above_its_limit_and_refuses_bad_options(tmp_path):
    result = _run_script("bench_search.py", "--sizes", "300", "--dim", "16", "--queries", "5", "--batch1", "1",
                         "--backend", "milvus", "--milvus-max", "100", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("not built above --milvus-max 100 entries") >= 3
    assert "  ivfpq:" not in result.stdout and "  flat:" in result.stdout  # milvus alone: FAISS runs only its exact reference
    for args, message in ((["--backend", "faiss,milvs"], "--backend takes a comma-separated list"),
                          (["--kinds", "flat,ivfq"], "--kinds: unknown kind 'ivfq'"),
                          (["--backend", "milvus", "--milvus-uri", "gallery"], "--milvus-uri")):
        bad = _run_script("bench_search.py", "--sizes", "100", "--dim", "8", *args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
