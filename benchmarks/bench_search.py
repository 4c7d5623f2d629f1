"""Benchmark the gallery index kinds (`editor_reid.deploy.gallery`) against exact search.

Default run (7 minutes on the 2-core machine of docs/gallery.md; at 1M it needs about 10 GB of
memory and 19 GB of free disk, for the memory-mapped gallery and one saved index)::

    python benchmarks/bench_search.py                        # 100,000 and 1,000,000 x 2304-d

For each gallery size and index kind it reports the build time (training included), the index
file size and the growth of the resident set (anonymous memory, so the memory-mapped gallery
does not count), the query latency one query at a time and for the whole query batch, recall@10
against the exact (flat) search, and the speed-up over it. Then the choice of ``kind="auto"``
with a PASS/FAIL line for its promise at 1M: recall@10 >= 0.95 and >= 10x faster than exact
search, both one query at a time and batched.

The features are synthetic but shaped like learned ReID embeddings: every identity has a centre
in a low-dimensional latent space (``--latent``, 64), mapped to the full width by a fixed random
matrix; each gallery entry is one of ``--views`` noisy views of an identity (latent noise plus
isotropic noise in the full width), L2-normalised; the queries are fresh views of gallery
identities. The gallery is written in chunks to a memory-mapped ``.npy`` file in a temporary
folder (``--workdir``), so 1M x 2304 float32 (9.2 GB) is never held twice in memory.

HNSW is skipped above ``--hnsw-max`` entries (default 200,000): its graph is built one insertion
at a time, and at 1M x 2304 that takes far too long on two cores.

``--backend faiss,milvus`` adds the Milvus backend (`editor_reid.deploy.milvus`) over the same
vectors, in a Milvus Lite file (``--milvus-uri``, default ``milvus.db`` in the work folder; a
server ``http://HOST:19530`` works too; its ``bench_search_*`` collections are replaced, then
dropped). Its kinds (``--kinds``: flat, ivf, hnsw; the FAISS backend builds flat, ivfpq and hnsw
of the same list) get their documented parameters (`milvus_params`, or ``--params``). Each is
built as a gallery is, the entries upserted and then flushed (the flush seals the segments, and
Milvus Lite builds its per-segment index then), so its build time is the two together; the
searches come after the flush. Recall@10 and the speed-ups are against the exact FAISS flat search
(which always runs), and Milvus flat is checked against it: the share of (query, rank) slots that
hold the same gallery row, and the largest difference of their distances. The index the server
describes is printed beside the parameters asked for, so a server that built with other ones
(its defaults) shows it: Milvus Lite 3.2.2 reads build parameters only from a JSON ``params``
entry, which ``MilvusGallery.create`` sends beside the flat keys a Milvus server reads.

Milvus is skipped above ``--milvus-max`` entries (default 50,000), and its HNSW above
``--hnsw-max`` as well: Milvus Lite is pure Python behind gRPC, in this process, and writing
2304-d vectors through it costs about 1.5-2 ms per entry, for each kind. On the 2-core machine of
docs/gallery.md (shared with other work while measured)::

    python benchmarks/bench_search.py --sizes 20000 --backend faiss,milvus    # 3 min 10 s

of which about 2 min 10 s is Milvus (3 builds of 30-43 s each, searches) and 3.5 GB peak
resident memory; the Milvus part at 100,000 entries would take about 9-10 min, hence the default
limit.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from editor_reid.deploy.gallery import (
    AUTO_FLAT_MAX, GalleryIndex, GalleryIndexError, SearchResult, default_params, resolve_kind)
from _machine import cpu_name  # benchmarks/ is on sys.path when a script runs

KIND_ORDER = ("flat", "ivfpq", "hnsw")
MILVUS_KIND_ORDER = ("flat", "ivf", "hnsw")
BACKENDS = ("faiss", "milvus")
TARGET_SIZE = 1_000_000
TARGET_RECALL = 0.95
TARGET_SPEEDUP = 10.0


class Features:
    """Identity-clustered synthetic features, generated chunk by chunk from a seed."""

    def __init__(self, size: int, dim: int, views: int, latent: int, seed: int,
                 view_noise: float = 0.45, isotropic_noise: float = 0.6):
        rng = np.random.default_rng(seed)
        self.size, self.dim, self.seed = size, dim, seed
        self.identities = max(1, size // views)
        self.mixing = (rng.standard_normal((latent, dim)) / math.sqrt(latent)).astype(np.float32)  # [L, D]
        self.centres = rng.standard_normal((self.identities, latent)).astype(np.float32)  # [I, L]
        self.view_noise, self.isotropic_noise = view_noise, isotropic_noise

    def views(self, identities: np.ndarray, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        z = self.centres[identities] + self.view_noise * rng.standard_normal(
            (len(identities), self.centres.shape[1]), dtype=np.float32)
        x = z @ self.mixing
        x += self.isotropic_noise * rng.standard_normal(x.shape, dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def write_gallery(self, path: Path, chunk: int = 50_000) -> np.ndarray:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(self.size, self.dim))
        for start in range(0, self.size, chunk):
            rows = np.arange(start, min(start + chunk, self.size))
            out[rows] = self.views(rows % self.identities, seed=self.seed * 1_000_003 + start + 1)
        out.flush()
        del out
        return np.load(path, mmap_mode="r")

    def queries(self, count: int) -> np.ndarray:
        rng = np.random.default_rng(self.seed + 7)
        return self.views(rng.integers(0, self.identities, count), seed=self.seed + 8)


def rss_anon_bytes() -> int:
    """Anonymous resident memory (Linux); 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(kind: str, gallery: np.ndarray, queries: np.ndarray, batch1: int, k: int, workdir: Path,
            params: dict | None) -> tuple[dict, SearchResult]:
    rss0 = rss_anon_bytes()
    start = time.perf_counter()
    index = GalleryIndex.build(gallery, kind=kind, params=params)
    build_s = time.perf_counter() - start
    rss_delta = rss_anon_bytes() - rss0
    start = time.perf_counter()
    index_dir = index.save(workdir / f"index-{kind}")
    save_s = time.perf_counter() - start
    index_bytes = sum(p.stat().st_size for p in index_dir.iterdir())
    shutil.rmtree(index_dir)
    batch1_ms, batched_ms, result = time_searches(index, queries, batch1, k)
    row = {"kind": kind, "params": index.params, "build_s": build_s, "save_s": save_s, "index_bytes": index_bytes,
           "rss_delta_bytes": rss_delta, "batch1_ms_per_query": batch1_ms, "batched_ms_per_query": batched_ms}
    del index
    return row, result


def time_searches(index, queries: np.ndarray, batch1: int, k: int) -> tuple[float, float, SearchResult]:
    """(ms per query one at a time over the first ``batch1`` queries, ms per query of one batched
    search of them all, that search's result), after one warm-up search (first touch of the code
    and the memory). Either backend."""
    index.search(queries[:1], k)
    start = time.perf_counter()
    for i in range(batch1):
        index.search(queries[i:i + 1], k)
    batch1_ms = (time.perf_counter() - start) / batch1 * 1e3
    start = time.perf_counter()
    result = index.search(queries, k)
    batched_ms = (time.perf_counter() - start) / len(queries) * 1e3
    return batch1_ms, batched_ms, result


def measure_milvus(kind: str, gallery: np.ndarray, queries: np.ndarray, batch1: int, k: int, uri: str, client,
                   params: dict | None) -> tuple[dict, SearchResult]:
    """As :func:`measure` for a collection of ``uri``; ``client`` reads what the server built."""
    from editor_reid.deploy.milvus import MilvusGallery

    collection = f"bench_search_{kind}"
    start = time.perf_counter()
    index = MilvusGallery.build(gallery, uri=uri, collection=collection, kind=kind, params=params, overwrite=True)
    upsert_s = time.perf_counter() - start
    try:
        start = time.perf_counter()
        index.save()
        flush_s = time.perf_counter() - start
        described = client.describe_index(collection, "vector")
        batch1_ms, batched_ms, result = time_searches(index, queries, batch1, k)
        entries = index.size
    finally:
        index.drop()
        index.close()
    server_index = {key: value for key, value in described.items()
                    if key not in ("field_name", "index_name", "total_rows", "indexed_rows", "pending_index_rows")}
    row = {"kind": kind, "params": index.params, "server_index": server_index, "entries": entries,
           "indexed_rows": int(described.get("indexed_rows", -1)), "upsert_s": upsert_s, "flush_s": flush_s,
           "build_s": upsert_s + flush_s, "batch1_ms_per_query": batch1_ms, "batched_ms_per_query": batched_ms}
    return row, result


def recall_at(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """The mean share of each query's exact top ``k`` rows that ``found`` holds (-1: no match)."""
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / k for a, b in zip(found, exact)]))


def release_lite(uri: str) -> None:
    """Stop the in-process Milvus Lite server of ``uri`` so that nothing writes to its folder
    after the benchmark removes it (Milvus Lite would close it at exit)."""
    from editor_reid.deploy.milvus import is_lite

    if not is_lite(uri):
        return
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:
        return
    server_manager_instance.release_server(uri)


def parse_params(items: list[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for item in items:
        kind, _, assignments = item.partition(":")
        for assignment in filter(None, assignments.split(",")):
            key, _, value = assignment.partition("=")
            out.setdefault(kind, {})[key] = int(value)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated gallery sizes")
    parser.add_argument("--dim", type=int, default=2304, help="feature width (EDITOR: 3 x 768)")
    parser.add_argument("--queries", type=int, default=200, help="queries, searched as one batch")
    parser.add_argument("--batch1", type=int, default=20, help="queries timed one at a time")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--views", type=int, default=10, help="gallery entries per identity")
    parser.add_argument("--latent", type=int, default=64, help="dimension of the identity space")
    parser.add_argument("--backend", default="faiss",
                        help="comma-separated backends: faiss, milvus (FAISS flat always runs, as the reference)")
    parser.add_argument("--kinds", default="flat,ivfpq,ivf,hnsw",
                        help="comma-separated kinds; each backend builds those it has (faiss: ivfpq, hnsw; milvus: "
                             "flat, ivf, hnsw)")
    parser.add_argument("--hnsw-max", type=int, default=200_000, help="skip HNSW above this many entries")
    parser.add_argument("--milvus-uri", default=None,
                        help="Milvus Lite file PATH.db or server http://HOST:19530 (default: milvus.db in the work "
                             "folder); its bench_search_* collections are replaced and dropped")
    parser.add_argument("--milvus-max", type=int, default=50_000,
                        help="skip the Milvus backend above this many entries")
    parser.add_argument("--params", action="append", default=[], metavar="KIND:KEY=V[,KEY=V]",
                        help="override index parameters, e.g. ivfpq:nprobe=64,k_factor=10 or ivf:nprobe=32 (hnsw: "
                             "both backends)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the memory-mapped gallery")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        parser.error(f"--backend takes a comma-separated list of {', '.join(BACKENDS)}, got {args.backend!r}")
    asked = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    unknown = [kind for kind in asked if kind not in KIND_ORDER + MILVUS_KIND_ORDER]
    if unknown:
        parser.error(f"--kinds: unknown kind {unknown[0]!r} (faiss: {', '.join(KIND_ORDER)}; milvus: "
                     f"{', '.join(MILVUS_KIND_ORDER)})")
    kinds = ["flat"] + ([kind for kind in KIND_ORDER[1:] if kind in asked] if "faiss" in backends else [])
    milvus_kinds = [kind for kind in MILVUS_KIND_ORDER if kind in asked] if "milvus" in backends else []
    try:
        overrides = parse_params(args.params)
    except ValueError:
        parser.error(f"--params takes KIND:KEY=INTEGER[,KEY=INTEGER], got {' '.join(args.params)!r}")
    import faiss

    cpu = f"{cpu_name()}, {faiss.omp_get_max_threads()} FAISS threads, faiss {faiss.__version__}"
    print(f"gallery search benchmark: {args.dim}-d features, {args.queries} queries ({args.batch1} timed one at a "
          f"time), k={args.k}; {cpu}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench_search.", dir=args.workdir))
    report = {"cpu": cpu, "dim": args.dim, "queries": args.queries, "k": args.k, "auto_flat_max": AUTO_FLAT_MAX,
              "backends": backends, "sizes": {}}
    hnsw_seconds_per_entry = None
    milvus_seconds_per_entry = None
    uri, client = None, None
    try:
        if milvus_kinds:
            from editor_reid.deploy.milvus import connect

            uri = str(args.milvus_uri or workdir / "milvus.db")
            try:
                client = connect(uri)
            except GalleryIndexError as exc:
                print(f"bench_search.py: error: --milvus-uri: {exc}", file=sys.stderr)
                return 2
            import pymilvus

            report["milvus"] = {"uri": uri, "server": str(client.get_server_version()),
                                "pymilvus": pymilvus.__version__, "kinds": milvus_kinds}
            print(f"milvus: {uri}, server {report['milvus']['server']}, pymilvus {pymilvus.__version__}", flush=True)
        for size in sizes:
            data = Features(size, args.dim, args.views, args.latent, args.seed)
            start = time.perf_counter()
            gallery = data.write_gallery(workdir / "gallery.npy")
            queries = data.queries(args.queries)
            print(f"\n{size:,} entries: generated in {time.perf_counter() - start:.0f} s "
                  f"({data.identities:,} identities x {args.views} views)", flush=True)
            rows, exact = {}, None
            for kind in kinds:
                if kind == "hnsw" and size > args.hnsw_max:
                    estimate = (f"; at the measured {hnsw_seconds_per_entry * 1e3:.2f} ms per entry it would take "
                                f"over {hnsw_seconds_per_entry * size / 60:.0f} min"
                                if hnsw_seconds_per_entry else "")
                    reason = f"not built above --hnsw-max {args.hnsw_max:,} entries{estimate}"
                    rows[kind] = {"kind": kind, "skipped": reason}
                    print(f"  hnsw: skipped, {reason}", flush=True)
                    continue
                params = overrides.get(kind)
                try:
                    row, result = measure(kind, gallery, queries, min(args.batch1, args.queries), args.k, workdir,
                                          params)
                except Exception as exc:  # noqa: BLE001 - e.g. too few entries to train: report and go on
                    rows[kind] = {"kind": kind, "skipped": str(exc)}
                    print(f"  {kind}: skipped: {exc}", flush=True)
                    continue
                if kind == "flat":
                    exact = result
                row["recall_at_k"] = recall_at(result.entries, exact.entries, args.k)
                if kind == "hnsw":
                    hnsw_seconds_per_entry = row["build_s"] / size
                rows[kind] = row
                print(f"  {kind}: built in {row['build_s']:.1f} s, {row['batch1_ms_per_query']:.2f} ms/query alone, "
                      f"{row['batched_ms_per_query']:.3f} ms/query batched, recall@{args.k} {row['recall_at_k']:.3f}",
                      flush=True)
            flat = rows["flat"]
            for row in rows.values():
                if "skipped" not in row:
                    row["speedup_batch1"] = flat["batch1_ms_per_query"] / row["batch1_ms_per_query"]
                    row["speedup_batched"] = flat["batched_ms_per_query"] / row["batched_ms_per_query"]
            auto = resolve_kind("auto", size)
            report["sizes"][str(size)] = {"auto": auto, "auto_params": default_params(auto, size, args.dim),
                                          "kinds": rows}
            if milvus_kinds:
                milvus_rows = {}
                for kind in milvus_kinds:
                    if size > args.milvus_max or (kind == "hnsw" and size > args.hnsw_max):
                        limit = (f"--milvus-max {args.milvus_max:,}" if size > args.milvus_max
                                 else f"--hnsw-max {args.hnsw_max:,}")
                        estimate = (f"; at the measured {milvus_seconds_per_entry * 1e3:.2f} ms per entry the "
                                    f"upsert and flush alone would take {milvus_seconds_per_entry * size / 60:.0f} min"
                                    if milvus_seconds_per_entry and size > args.milvus_max else "")
                        reason = f"not built above {limit} entries{estimate}"
                        milvus_rows[kind] = {"kind": kind, "skipped": reason}
                        print(f"  milvus {kind}: skipped, {reason}", flush=True)
                        continue
                    measured, retried = None, None
                    for attempt in range(2):
                        try:
                            measured = measure_milvus(kind, gallery, queries, min(args.batch1, args.queries), args.k,
                                                      uri, client, overrides.get(kind))
                            break
                        except GalleryIndexError as exc:
                            # A Milvus Lite connection left idle while FAISS works can be refused once
                            # ("cannot reach Milvus"): say so, and try once more.
                            if attempt == 0 and str(exc).startswith("cannot reach Milvus"):
                                retried = str(exc)
                                print(f"  milvus {kind}: {exc}; trying once more", flush=True)
                                continue
                            milvus_rows[kind] = {"kind": kind, "skipped": str(exc)}
                            print(f"  milvus {kind}: skipped: {exc}", flush=True)
                            break
                    if measured is None:
                        continue
                    row, result = measured
                    if retried:
                        row["retried_after"] = retried
                    row["recall_at_k"] = recall_at(result.fields["row"], exact.entries, args.k)
                    row["speedup_batch1"] = flat["batch1_ms_per_query"] / row["batch1_ms_per_query"]
                    row["speedup_batched"] = flat["batched_ms_per_query"] / row["batched_ms_per_query"]
                    if kind == "flat":
                        row["same_rows"] = float(np.mean(result.fields["row"] == exact.entries))
                        row["same_top_k_sets"] = float(np.mean([set(a) == set(b) for a, b in
                                                                zip(result.fields["row"], exact.entries)]))
                        row["max_abs_distance_diff"] = float(np.max(np.abs(result.distances - exact.distances)))
                        milvus_seconds_per_entry = row["build_s"] / size
                    milvus_rows[kind] = row
                    print(f"  milvus {kind}: built in {row['build_s']:.1f} s (upsert {row['upsert_s']:.1f} s, flush "
                          f"{row['flush_s']:.1f} s), {row['batch1_ms_per_query']:.2f} ms/query alone, "
                          f"{row['batched_ms_per_query']:.3f} ms/query batched, recall@{args.k} "
                          f"{row['recall_at_k']:.3f}", flush=True)
                report["sizes"][str(size)]["milvus"] = {"kinds": milvus_rows}
            del gallery
            (workdir / "gallery.npy").unlink()
    finally:
        if client is not None:
            client.close()
            release_lite(uri)
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{'entries':>9} {'kind':<6} {'build s':>8} {'index MiB':>10} {'RSS +MiB':>9} {'1 query ms':>11} "
          f"{'batched ms/q':>13} {f'recall@{args.k}':>10} {'speed-up 1':>11} {'speed-up batch':>15}")
    for size, entry in report["sizes"].items():
        for kind, row in entry["kinds"].items():
            if "skipped" in row:
                print(f"{int(size):>9,} {kind:<6} skipped: {row['skipped']}")
                continue
            print(f"{int(size):>9,} {kind:<6} {row['build_s']:>8.1f} {row['index_bytes'] / 2**20:>10.0f} "
                  f"{row['rss_delta_bytes'] / 2**20:>9.0f} {row['batch1_ms_per_query']:>11.2f} "
                  f"{row['batched_ms_per_query']:>13.3f} {row['recall_at_k']:>10.3f} {row['speedup_batch1']:>10.1f}x "
                  f"{row['speedup_batched']:>14.1f}x")
    if milvus_kinds:
        print_milvus_table(report, args.k)
    print(f"\nauto: flat up to {AUTO_FLAT_MAX:,} entries, ivfpq above")
    for size, entry in report["sizes"].items():
        row = entry["kinds"].get(entry["auto"], {})
        if "recall_at_k" not in row:
            print(f"{int(size):>9,}: auto = {entry['auto']}, not measured")
            continue
        verdict = ""
        if int(size) == TARGET_SIZE:
            ok = (row["recall_at_k"] >= TARGET_RECALL and row["speedup_batch1"] >= TARGET_SPEEDUP
                  and row["speedup_batched"] >= TARGET_SPEEDUP)
            entry["pass"] = ok
            verdict = (f" -> {'PASS' if ok else 'FAIL'} (needs recall@{args.k} >= {TARGET_RECALL} and >= "
                       f"{TARGET_SPEEDUP:.0f}x faster than exact at {TARGET_SIZE:,})")
        print(f"{int(size):>9,}: auto = {entry['auto']} {entry['auto_params']}: recall@{args.k} "
              f"{row['recall_at_k']:.3f}, {row['speedup_batch1']:.1f}x faster one query at a time, "
              f"{row['speedup_batched']:.1f}x batched{verdict}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def print_milvus_table(report: dict, k: int) -> None:
    """The Milvus rows: build = upsert + flush; recall and speed-ups against FAISS flat; for
    Milvus flat, the share of (query, rank) slots with FAISS flat's row and the largest distance
    difference; then the index each kind asked for and the one the server describes."""
    milvus = report["milvus"]
    print(f"\nmilvus ({milvus['server']}, pymilvus {milvus['pymilvus']}) on the same vectors; recall@{k} and speed-ups "
          "against FAISS flat")
    print(f"{'entries':>9} {'kind':<6} {'upsert s':>9} {'flush s':>8} {'build s':>8} {'1 query ms':>11} "
          f"{'batched ms/q':>13} {f'recall@{k}':>10} {'speed-up 1':>11} {'speed-up batch':>15} {'same rows':>10} "
          f"{'max |d diff|':>13}")
    described = []
    for size, entry in report["sizes"].items():
        for kind, row in entry.get("milvus", {}).get("kinds", {}).items():
            if "skipped" in row:
                print(f"{int(size):>9,} {kind:<6} skipped: {row['skipped']}")
                continue
            same = (f"{row['same_rows']:>10.3f} {row['max_abs_distance_diff']:>13.2e}" if "same_rows" in row
                    else f"{'':>10} {'':>13}")
            print(f"{int(size):>9,} {kind:<6} {row['upsert_s']:>9.1f} {row['flush_s']:>8.1f} {row['build_s']:>8.1f} "
                  f"{row['batch1_ms_per_query']:>11.2f} {row['batched_ms_per_query']:>13.3f} "
                  f"{row['recall_at_k']:>10.3f} {row['speedup_batch1']:>10.1f}x {row['speedup_batched']:>14.1f}x "
                  f"{same}".rstrip())
            server = ", ".join(f"{key} {value}" for key, value in row["server_index"].items())
            if kind != "flat" and "params" not in row["server_index"]:
                server += ", no build parameters (built with the server's defaults, not those asked for)"
            described.append(f"{int(size):>9,} {kind:<6} asked {row['params'] or '{}'}; the server describes: "
                             f"{server}; {row['indexed_rows']:,} of {row['entries']:,} entries indexed")
    if described:
        print("\n".join(["", *described]))


if __name__ == "__main__":
    sys.exit(main())
