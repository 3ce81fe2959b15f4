"""Resolver timings: every era's tree, a large packed weblog, a wide project directory.

Writes ``benchmarks/results/resolve.json``. Run with ``make bench-resolve``.
"""

from __future__ import annotations

import io
import json
import os
import platform
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from casaspawner import __version__
from casaspawner.catalog import load_catalog
from casaspawner.datasets.resolve import resolve_path
from casaspawner.datasets.synth import ERAS, DatasetSpec, weblog_html, write_dataset

RESULTS = Path(__file__).parent / "results" / "resolve.json"


def timed(fn: Callable[[], object], repeat: int = 20) -> dict[str, float]:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return {
        "median_ms": statistics.median(samples) * 1e3,
        "max_ms": max(samples) * 1e3,
        "runs": repeat,
    }


def main() -> None:
    catalog = load_catalog()
    results: dict[str, object] = {
        "casaspawner": __version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        eras = {}
        for era in ERAS:
            if era == "no-evidence":
                continue
            write_dataset(root / era, era)
            eras[era] = timed(lambda era=era: resolve_path(root / era, catalog))
        results["eras"] = eras

        # a packed weblog of ~100 MB of incompressible plots with the home page last
        spec = DatasetSpec(evidence=())
        member = write_dataset(root / "bigweblog", spec=spec)
        archive = member / "qa" / "big.weblog.tgz"
        with tarfile.open(archive, "w:gz") as tar:
            for index in range(100):
                data = os.urandom(1024 * 1024)
                info = tarfile.TarInfo(f"pipeline-1/html/stage{index}/plot.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            page = weblog_html(DatasetSpec()).encode()
            info = tarfile.TarInfo("pipeline-1/html/t1-1.html")
            info.size = len(page)
            tar.addfile(info, io.BytesIO(page))
        results["packed_weblog_100MiB"] = {
            "size_mb": archive.stat().st_size / 1e6,
            **timed(lambda: resolve_path(member, catalog), 3),
        }

        # a project directory with many sibling files to walk past
        project = root / "wide"
        member = write_dataset(project, "cycle10")
        for index in range(2000):
            (member / "product" / f"image{index}.fits").touch()
        results["wide_project_2000_files"] = timed(lambda: resolve_path(project, catalog), 10)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
