"""Series per entry: a live /metrics scrape with many prefixes and every entry on.

Run by hand (never as a timed test)::

    python benchmarks/series_count.py --prefixes 200
    python benchmarks/series_count.py --python /work/wt/hot-sched/.venv/bin/python

A bare cluster and a catalog one (``--preload catalog --enable`` every entry,
as in ``benchmarks/system.py``: real ``dask scheduler`` / ``dask worker --nanny``
processes), one worker each, run ``--prefixes`` prefixes of 3 tasks; then the
scheduler's and the worker's dashboard ``/metrics`` are fetched over HTTP. Each
family's series (samples) and bytes (its lines of the exposition, HELP and TYPE
included) are counted and given to the entry whose module names the family
(``catalog/<entry>.py``; ``_fine_metrics.py`` counts as metrics); the
``prefix`` and ``worker`` labels tell what is per prefix and per worker.
The table is printed as Markdown, ready to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from system import Cluster, catalog_argv, otlp_receiver, start, wait_for_workers


def inc(x: int) -> int:
    return x + 1


def entry_of_families(python: str) -> dict[str, str]:
    """Family name (without namespace) -> entry, from the entries' source."""
    root = subprocess.run(
        [python, "-c", "import catalog, os; print(os.path.dirname(catalog.__file__))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # The entries that own few families first, metrics and dashboard last: they
    # also name other entries' families (the metrics entry hosts them all).
    order = ["memory", "watchdog", "tracer", "events", "recycle", "oom", "otel"]
    order += ["env", "logging", "metrics", "_fine_metrics", "dashboard"]
    words: dict[str, str] = {}
    for stem in order:
        path = Path(root) / f"{stem}.py"
        if not path.exists():
            continue
        entry = "metrics" if stem == "_fine_metrics" else stem
        text = path.read_text()
        # Plain names ("tasks") and f-string names (f"{ns}_task_compute_seconds").
        found = re.findall(r"[\"']([a-z][a-z0-9_]+)[\"']", text)
        found += re.findall(r"\{[a-z_.]+\}_([a-z][a-z0-9_]+)[\"']", text)
        for word in found:
            words.setdefault(word, entry)
    return words


def entry_for(short: str, owner: dict[str, str]) -> str:
    """The entry of a family: its name's own prefix first, else the source's."""
    for head, entry in (("tracer_", "tracer"), ("otel_", "otel"), ("fine_", "metrics")):
        if short.startswith(head):
            return entry
    return owner.get(short, "?")


def fetch(url: str, times: int) -> tuple[str, float]:
    """The text of ``url`` and the median wall time of ``times`` fetches."""
    spent, text = [], ""
    for _ in range(times):
        t0 = time.perf_counter()
        text = urllib.request.urlopen(url, timeout=60).read().decode()
        spent.append(time.perf_counter() - t0)
    return text, statistics.median(spent)


def families(text: str) -> dict[str, dict[str, Any]]:
    """Per family: its series, those with a prefix / worker label, its bytes."""
    out: dict[str, dict[str, Any]] = {}
    sample_to_family: dict[str, str] = {}
    for fam in text_string_to_metric_families(text):
        prefixes = {s.labels["prefix"] for s in fam.samples if "prefix" in s.labels}
        out[fam.name] = {
            "series": len(fam.samples),
            "per_prefix": sum("prefix" in s.labels for s in fam.samples),
            "prefixes": len(prefixes),
            "per_worker": sum("worker" in s.labels for s in fam.samples),
            "bytes": 0,
        }
        for s in fam.samples:
            sample_to_family[s.name] = fam.name
    for line in text.splitlines(keepends=True):
        if line.startswith("#"):
            parts = line.split()
            name = parts[2] if len(parts) > 2 else ""
        else:
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
        name = sample_to_family.get(name, name)
        if name in out:
            out[name]["bytes"] += len(line.encode())
    return out


def urls(client: Any) -> tuple[str, str]:
    info = client.scheduler_info(n_workers=-1)
    sched = f"http://127.0.0.1:{info['services']['dashboard']}/metrics"
    worker = next(iter(info["workers"].values()))
    return sched, f"http://127.0.0.1:{worker['services']['dashboard']}/metrics"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefixes", type=int, default=200)
    parser.add_argument("--scrapes", type=int, default=5)
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()

    from distributed import Client

    owner = entry_of_families(args.python)
    tmp = Path(tempfile.mkdtemp(prefix="catalog-series-"))
    clusters: dict[str, Cluster] = {}
    clients: dict[str, Any] = {}
    scraped: dict[tuple[str, str], tuple[dict[str, dict[str, Any]], int, float]] = {}
    try:
        with otlp_receiver() as endpoint:
            extra = {"bare": [], "catalog": catalog_argv(args.python, tmp, endpoint)}
            for name in ("bare", "catalog"):
                clusters[name] = start(name, args.python, tmp / name, 1, extra[name])
            for name, cluster in clusters.items():
                client = clients[name] = Client(cluster.address, timeout="120s")
                wait_for_workers(cluster, client, 1)
                futures = [
                    client.submit(inc, j, key=f"prefix{i:03d}-{j}")
                    for i in range(args.prefixes)
                    for j in range(3)
                ]
                client.gather(futures)
                del futures
                time.sleep(3)  # a heartbeat, so the scheduler has the workers' news
                for side, url in zip(
                    ("scheduler", "worker"), urls(client), strict=True
                ):
                    text, spent = fetch(url, args.scrapes)
                    scraped[(name, side)] = (families(text), len(text.encode()), spent)
    finally:
        for client in clients.values():
            with contextlib.suppress(Exception):
                client.close()
        for cluster in clusters.values():
            cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    report(scraped, owner, args.prefixes)


def report(
    scraped: dict[tuple[str, str], tuple[dict[str, dict[str, Any]], int, float]],
    owner: dict[str, str],
    prefixes: int,
) -> None:
    print(f"{prefixes} prefixes of 3 tasks, 1 worker\n")
    print("| server | cluster | /metrics bytes | series | scrape (wall, median) |")
    print("|---|---|---:|---:|---:|")
    for (name, side), (fams, size, spent) in scraped.items():
        series = sum(f["series"] for f in fams.values())
        print(f"| {side} | {name} | {size:,} | {series:,} | {spent * 1000:.1f} ms |")
    for side in ("worker", "scheduler"):
        fams = scraped[("catalog", side)][0]
        per_entry: dict[str, Counter[str]] = defaultdict(Counter)
        for fname, f in fams.items():
            if not fname.startswith("dask_catalog_"):
                continue
            short = fname.removeprefix("dask_catalog_")
            entry = entry_for(short, owner)
            for k in ("series", "per_prefix", "per_worker", "bytes"):
                per_entry[entry][k] += f[k]
            per_entry[entry]["families"] += 1
            per_entry[entry]["prefix_families"] += bool(f["per_prefix"])
        print(f"\n{side}: catalog families per entry")
        print(
            "| entry | families | series | per prefix (series / prefixes) "
            "| with a worker label | bytes |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for entry, c in sorted(per_entry.items()):
            print(
                f"| {entry} | {c['families']} | {c['series']:,} | "
                f"{c['per_prefix'] / prefixes:.1f} | {c['per_worker']:,} | "
                f"{c['bytes']:,} |"
            )
        print(f"\n{side}: catalog families")
        print("| family | entry | series | per prefix | bytes |")
        print("|---|---|---:|---:|---:|")
        for fname, f in sorted(fams.items(), key=lambda kv: -kv[1]["bytes"]):
            if fname.startswith("dask_catalog_"):
                short = fname.removeprefix("dask_catalog_")
                print(
                    f"| `{fname}` | {entry_for(short, owner)} | {f['series']:,} | "
                    f"{f['per_prefix'] / prefixes:.1f} | {f['bytes']:,} |"
                )


if __name__ == "__main__":
    main()
