"""The HTTP search service under load: throughput and latency of a real ``editor-reid serve``.

Unless ``--weights`` and ``--index`` are given, a tiny EDITOR checkpoint (untrained, seeded; ViT
of width 64, 2 blocks, 4 heads at 256x128) and a gallery index are built in a temporary folder:
the features of a synthetic RGBNT201 test split, padded with random unit rows to ``--gallery``
entries, under the model's fingerprint. The server is started as a subprocess
(``python -m editor_reid serve --port 0``: a free port on 127.0.0.1) and, after a warm-up, sent
``--searches`` ``POST /search`` requests (RGB, NI and TI images of the synthetic split and the
camera) from ``--concurrency`` concurrent clients, with one ``POST /gallery`` addition after
every ``--add-every`` searches. It reports, from that one run:

* throughput: requests (searches and additions) per second of wall time, and searches per second;
* latency of searches and of additions, client-side, p50 / p95 / p99 and mean, in ms;
* the error count: any answer other than 200, or a failed connection (it must be 0; the exit
  status is 1 otherwise);
* the mean batch the server formed (from ``GET /healthz`` before and after the run).

The client runs on the same machine as the server (httpx, asyncio, one thread), so on a small
CPU the two compete for the cores; the server's figures alone would be better.

Examples::

    python benchmarks/bench_serve.py                                   # 500 searches, concurrency 8
    python benchmarks/bench_serve.py --searches 2000 --concurrency 32 --max-batch 32
    python benchmarks/bench_serve.py --weights best.pt --index gallery_index/ --images data/query_images/
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _machine import cpu_name  # benchmarks/ is on sys.path when a script runs


def build_model_and_index(work: Path, gallery: int, size: tuple[int, int]) -> tuple[Path, Path, Path]:
    """(checkpoint, index directory, data root): a tiny seeded EDITOR and an index of ``gallery``
    entries, the synthetic test split's features first."""
    import torch

    from editor_reid.config import config_to_dict, load_config
    from editor_reid.data.synthetic import make_synthetic
    from editor_reid.deploy.gallery import GalleryIndex
    from editor_reid.engine.checkpoint import save_checkpoint, weights_payload
    from editor_reid.features.extractor import FeatureExtractor
    from editor_reid.model import build_model

    data = work / "data"
    make_synthetic("rgbnt201", data, ids=20, views=2, seed=0)
    cfg = load_config(None, ["model.pretrain_choice=none", "model.embed_dim=64", "model.depth=2", "model.num_heads=4",
                             f"input.size_train=[{size[0]},{size[1]}]", f"input.size_test=[{size[0]},{size[1]}]",
                             f"datasets.root_dir={data}"])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=10, num_cameras=4)
    weights = save_checkpoint(work / "weights.pt", weights_payload(
        model.state_dict(), {}, config=config_to_dict(cfg), epoch=0, metrics=None, num_classes=10, num_cameras=4))
    extractor = FeatureExtractor(weights, device="cpu")
    samples = query_samples(data)
    feats = extractor([{**s["paths"], "camid": s["camid"]} for s in samples])
    pids = [s["pid"] for s in samples]
    camids = [s["camid"] for s in samples]
    extra = max(0, gallery - len(samples))
    if extra:
        noise = np.random.default_rng(0).standard_normal((extra, feats.shape[1])).astype(np.float32)
        feats = np.concatenate([feats, noise / np.linalg.norm(noise, axis=1, keepdims=True)])
        pids += list(range(100_000, 100_000 + extra))
        camids += [-1] * extra
    index_dir = work / "index"
    GalleryIndex.build(feats[:max(gallery, 1)], {"pid": pids[:max(gallery, 1)], "camid": camids[:max(gallery, 1)]},
                       fingerprint=extractor.fingerprint).save(index_dir)
    return weights, index_dir, data


def query_samples(data: Path) -> list[dict]:
    """The synthetic RGBNT201 test split: paths per modality, pid, camera (0-based)."""
    from editor_reid.data.layouts import load_dataset

    splits = load_dataset("rgbnt201", data)
    return [{"paths": dict(s.paths), "pid": s.pid, "camid": s.camid} for s in splits.gallery]


def image_folder_samples(folder: Path) -> list[dict]:
    """Every image under ``folder`` as an RGB-only query of an unknown camera."""
    suffixes = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes)
    if not files:
        raise SystemExit(f"bench_serve: no images under {folder}")
    return [{"paths": {"RGB": str(p)}, "pid": -1, "camid": -1} for p in files]


def start_server(command: list[str], env: dict) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = process.stdout.readline()
    match = re.match(r"serving (http://\S+) ", line)
    if not match:
        process.kill()
        raise SystemExit(f"bench_serve: the server did not start: {line!r}\n{process.stderr.read()[-3000:]}")
    return process, match.group(1)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "mean": float("nan"), "count": 0}
    array = np.asarray(values)
    p50, p95, p99 = np.percentile(array, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(array.mean()), "count": len(values)}


async def load(url: str, payloads: list[dict], *, searches: int, concurrency: int, add_every: int,
               warmup: int) -> dict:
    """Send the warm-up, then the timed searches and additions; latencies in ms."""
    import httpx

    plan = []
    for i in range(searches):
        plan.append(("search", i))
        if add_every and (i + 1) % add_every == 0:
            plan.append(("add", i))
    latencies: dict[str, list[float]] = {"search": [], "add": []}
    errors: list[str] = []

    def form(kind: str, i: int) -> tuple[str, dict, dict]:
        sample = payloads[i % len(payloads)]
        data = {"camid": str(sample["camid"])}
        if kind == "add":
            data["pid"] = str(200_000 + i)
            return "/gallery", sample["files"], data
        return "/search", sample["files"], data

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def send(kind: str, i: int, record: bool) -> None:
            path, files, data = form(kind, i)
            start = time.perf_counter()
            try:
                response = await client.post(path, files=files, data=data)
                ok = response.status_code == 200
                problem = f"{kind} {i}: HTTP {response.status_code} {response.text[:200]}"
            except httpx.HTTPError as exc:
                ok, problem = False, f"{kind} {i}: {type(exc).__name__}: {exc}"
            if record:
                latencies[kind].append((time.perf_counter() - start) * 1000)
                if not ok:
                    errors.append(problem)

        await asyncio.gather(*(send("search", i, False) for i in range(warmup)))
        stats_before = (await client.get("/healthz")).json()["batching"]
        queue = iter(plan)

        async def worker() -> None:
            for kind, i in queue:
                await send(kind, i, True)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        health = (await client.get("/healthz")).json()
    after = health["batching"]
    batches, samples = after["batches"] - stats_before["batches"], after["samples"] - stats_before["samples"]
    return {"elapsed_s": elapsed, "latencies": latencies, "errors": errors, "health": health,
            "batches": batches, "batched_samples": samples}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--searches", type=int, default=500, help="timed POST /search requests")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--add-every", type=int, default=10, help="one POST /gallery after every N searches (0: none)")
    parser.add_argument("--warmup", type=int, default=16, help="untimed searches first")
    parser.add_argument("--gallery", type=int, default=1000, help="entries of the built index")
    parser.add_argument("--size", default="256x128", help="input HxW of the built tiny model")
    parser.add_argument("--weights", type=Path, default=None, help="serve this checkpoint (with --index)")
    parser.add_argument("--index", type=Path, default=None, help="serve this index directory (with --weights); "
                                                                 "it receives the additions")
    parser.add_argument("--images", type=Path, default=None,
                        help="query with the images under this folder (RGB only; default: a synthetic split)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--server-threads", type=int, default=None, help="OMP/torch threads of the server process")
    parser.add_argument("--json", type=Path, default=None, help="write the report as JSON")
    args = parser.parse_args(argv)
    if (args.weights is None) != (args.index is None):
        parser.error("--weights and --index go together")
    height, width = (int(v) for v in args.size.lower().split("x"))

    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        work = Path(tmp)
        setup_start = time.perf_counter()
        if args.weights is None:
            weights, index_dir, data = build_model_and_index(work, args.gallery, (height, width))
            samples = image_folder_samples(args.images) if args.images else query_samples(data)
            model = f"tiny EDITOR (width 64, 2 blocks, 4 heads, {height}x{width}, untrained)"
        else:
            weights, index_dir = args.weights, args.index
            if args.images is None:
                data = work / "data"
                from editor_reid.data.synthetic import make_synthetic

                make_synthetic("rgbnt201", data, ids=20, views=2, seed=0)
                samples = query_samples(data)
            else:
                samples = image_folder_samples(args.images)
            model = str(weights)
        payloads = [{"files": {m: (Path(p).name, Path(p).read_bytes()) for m, p in s["paths"].items()},
                     "camid": s["camid"] if args.images is None else -1} for s in samples]
        setup_s = time.perf_counter() - setup_start

        env = dict(os.environ, HF_HUB_OFFLINE="1")
        if args.server_threads:
            env["OMP_NUM_THREADS"] = str(args.server_threads)
        command = [sys.executable, "-m", "editor_reid", "serve", "--index", str(index_dir), "--weights", str(weights),
                   "--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--max-batch", str(args.max_batch),
                   "--max-wait-ms", str(args.max_wait_ms)]
        started = time.perf_counter()
        process, url = start_server(command, env)
        startup_s = time.perf_counter() - started
        try:
            run = asyncio.run(load(url, payloads, searches=args.searches, concurrency=args.concurrency,
                                   add_every=args.add_every, warmup=args.warmup))
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            process.stdout.close()
            process.stderr.close()

    requests = len(run["latencies"]["search"]) + len(run["latencies"]["add"])
    report = {
        "cpu": cpu_name(), "cores": os.cpu_count(), "model": model, "gallery_entries_at_start": args.gallery
        if args.index is None else None, "gallery_entries_at_end": run["health"]["size"],
        "searches": len(run["latencies"]["search"]), "adds": len(run["latencies"]["add"]),
        "concurrency": args.concurrency, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
        "errors": len(run["errors"]), "error_samples": run["errors"][:5], "elapsed_s": run["elapsed_s"],
        "requests_per_s": requests / run["elapsed_s"], "searches_per_s": len(run["latencies"]["search"]) / run["elapsed_s"],
        "latency_ms": {kind: percentiles(values) for kind, values in run["latencies"].items()},
        "batches": run["batches"], "mean_batch": run["batched_samples"] / max(run["batches"], 1),
        "server_startup_s": startup_s, "setup_s": setup_s, "backend": run["health"]["backend"],
    }
    search, add = report["latency_ms"]["search"], report["latency_ms"]["add"]
    print(f"{report['model']}; gallery {report['gallery_entries_at_end']} entries at the end; CPU {report['cpu']} "
          f"({report['cores']} cores), server and client on it")
    print(f"{report['searches']} searches + {report['adds']} adds at concurrency {args.concurrency} in "
          f"{run['elapsed_s']:.2f} s: {report['requests_per_s']:.1f} requests/s ({report['searches_per_s']:.1f} "
          f"searches/s); mean batch {report['mean_batch']:.2f} over {report['batches']} batches "
          f"(max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms)")
    row = "{:<8}{:>10}{:>10}{:>10}{:>10}"
    print(row.format("latency", "p50 ms", "p95 ms", "p99 ms", "mean ms"))
    for name, stats in (("search", search), ("add", add)):
        print(row.format(name, *(f"{stats[key]:.1f}" for key in ("p50", "p95", "p99", "mean"))))
    print(f"errors: {report['errors']}" + "".join(f"\n  {e}" for e in report["error_samples"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
