"""Cost of verifying a stage's inputs against the sha256 their producer recorded, in seconds per GB.

Writes a text_emb/ of about --gb GB (float32, d=512, 10 parts) with the production writer, records it in
manifest.json as embed-text's outputs, then times RunDir.verified_hashes over the parts: the hashing that
run_stage does for the fingerprint anyway, plus the comparison with the manifest (the only new cost).
Timed twice: right after writing (page cache warm) and after dropping the page cache when that is allowed.

    .venv/bin/python benchmarks/bench_input_verification.py [--gb 1.0]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from ovml.pipeline import atomic
from ovml.pipeline.artifacts import TEXT_EMB, part_name
from ovml.pipeline.rundir import RunDir, files_under, hash_files
from ovml.pipeline.text_embeddings import write_text_embeddings

DIM, PARTS = 512, 10


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0)
    args = parser.parse_args()
    rows_per_part = int(args.gb * 1e9 / (DIM * 4) / PARTS)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        run_dir = RunDir(tmp)
        rng = np.random.default_rng(0)
        for part in range(PARTS):
            ids = [f"{part}-{i}" for i in range(rows_per_part)]
            write_text_embeddings(run_dir / TEXT_EMB / part_name(part), ids,
                                  rng.standard_normal((rows_per_part, DIM), dtype=np.float32), "float32")
        parts = files_under(run_dir.path, [TEXT_EMB])
        atomic.write_json(run_dir / "manifest.json", {"stages": {"embed_text": {
            "status": "finished", "outputs": hash_files(run_dir.path, parts)}}})
        gb = sum(p.stat().st_size for p in parts) / 1e9
        print(f"text_emb/: {len(parts)} parts, {gb:.3f} GB, {rows_per_part * PARTS:,} rows x {DIM} float32; "
              f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
        print("| page cache | seconds | seconds per GB |\n|---|---|---|")
        for label, prepare in (("warm", lambda: True), ("cold (dropped)", drop_page_cache)):
            if not prepare():
                print(f"| {label} | not measured: cannot drop the page cache here | |")
                continue
            t0 = time.perf_counter()
            run_dir.verified_hashes(parts)
            seconds = time.perf_counter() - t0
            print(f"| {label} | {seconds:.2f} | {seconds / gb:.2f} |")


if __name__ == "__main__":
    main()
