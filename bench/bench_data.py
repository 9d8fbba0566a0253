#!/usr/bin/env python3
"""Dataset validation + tokenization throughput on N synthetic conversations (default 100k), per container.

The sample generator writes JSONL; the same rows are then written as a JSON array (json), CSV (pandas, the
nested fields as JSON text in their cells), Parquet and Arrow (pyarrow, nested fields as structs) and a
`datasets` folder (Dataset.save_to_disk), each by its own library. Each container is validated and
tokenized by the same pipeline; the ratio is against JSONL measured in the same run.

Targets: issue 2, 100k conversations in under a minute on this 2-core machine in bounded memory (JSONL: 48 s
when first measured); issue 18, every container near JSONL's rows/s with memory flat.

  scripts/run python bench/bench_data.py [--count 100000] [--containers jsonl,json,csv,parquet,arrow,datasets]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402,F401  (preloads the BLAS before mlx)
from engine.config.schema import Config  # noqa: E402
from engine.data import validate_dataset  # noqa: E402
from engine.model.loading import load_tokenizer  # noqa: E402

NESTED = ("conversations", "messages", "tools")


def write_containers(jsonl: Path, out: Path, wanted: list[str]) -> dict[str, Path]:
    """The JSONL's rows in each wanted container, written by that container's own library."""
    rows = [json.loads(line) for line in jsonl.open(encoding="utf-8")]
    paths = {"jsonl": jsonl}
    if "json" in wanted:
        paths["json"] = out / "rows.json"
        with paths["json"].open("w", encoding="utf-8") as fh:
            json.dump(rows, fh, ensure_ascii=False, indent=1)
    if "csv" in wanted:
        import pandas as pd
        flat = [{k: json.dumps(v, ensure_ascii=False) if k in NESTED else v for k, v in r.items()} for r in rows]
        paths["csv"] = out / "rows.csv"
        pd.DataFrame(flat).to_csv(paths["csv"], index=False)
    if {"parquet", "arrow", "datasets"} & set(wanted):
        import pyarrow as pa
        import pyarrow.feather as feather
        import pyarrow.parquet as pq
        table = pa.Table.from_pylist(rows)
        if "parquet" in wanted:
            paths["parquet"] = out / "rows.parquet"
            pq.write_table(table, paths["parquet"])
        if "arrow" in wanted:
            paths["arrow"] = out / "rows.arrow"
            feather.write_feather(table, paths["arrow"], compression="uncompressed")
        if "datasets" in wanted:
            import datasets
            datasets.disable_progress_bars()
            paths["datasets"] = out / "saved"
            datasets.Dataset(table).save_to_disk(str(paths["datasets"]))
    del rows
    return {name: paths[name] for name in wanted}


def anon_rss() -> int:
    """Resident memory that is not a mapped file (Linux RssAnon): a memory-mapped Parquet/Arrow file's pages
    count in RSS but are the page cache's, given back under pressure."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def measure(path: Path, tokenizer) -> dict:
    proc = psutil.Process()
    rss0, anon0 = proc.memory_info().rss, anon_rss()
    peak, peak_anon = [rss0], [anon0]

    def progress(done, total):
        peak[0] = max(peak[0], proc.memory_info().rss)
        peak_anon[0] = max(peak_anon[0], anon_rss())

    t0 = time.perf_counter()
    report, _ = validate_dataset(path, tokenizer, progress=progress)
    dt = time.perf_counter() - t0
    peak[0] = max(peak[0], proc.memory_info().rss)
    size = sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else path.stat().st_size
    return {"shape": report.shape, "valid": report.valid, "records": report.records, "seconds": dt,
            "rows_per_s": report.valid / dt, "tokens": sum(report.lengths), "mb": size / 1e6,
            "rss_growth_mb": (peak[0] - rss0) / 1e6, "anon_growth_mb": (peak_anon[0] - anon0) / 1e6,
            "issues": report.issue_count}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--containers", default="jsonl,json,csv,parquet,arrow,datasets")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--no-tokenize", action="store_true", help="structure only: for memory on a 1 GB file "
                    "(--count 800000) without waiting for the tokenizer")
    args = ap.parse_args()
    wanted = [c.strip() for c in args.containers.split(",") if c.strip()]
    if "jsonl" not in wanted:
        wanted.insert(0, "jsonl")  # the baseline, measured in the same run
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sample_data.py"), "--out", tmp,
                        "--count", str(args.count), "--heldout", "1"], check=True, stdout=subprocess.DEVNULL)
        t0 = time.perf_counter()
        paths = write_containers(Path(tmp) / "tool_calls.jsonl", Path(tmp), wanted)
        print(f"wrote {len(paths)} containers of {args.count} rows in {time.perf_counter() - t0:.0f} s")
        import gc
        gc.collect()  # the rows the writers held: freed before the first measurement
        tokenizer = None if args.no_tokenize else load_tokenizer(Config().model)
        validate_dataset(Path(tmp) / "heldout.jsonl", tokenizer)  # warm-up: the first file pays for it
        results = {}
        for name, path in paths.items():
            results[name] = r = measure(path, tokenizer)
            base = results["jsonl"]["rows_per_s"]
            print(f"{name:9s} {r['shape']:22s} {r['mb']:6.0f} MB  {r['valid']:>7,} valid of {r['records']:>7,}  "
                  f"{r['seconds']:5.1f} s  {r['rows_per_s']:7,.0f} rows/s ({r['rows_per_s'] / base:.2f}x JSONL)  "
                  f"{r['tokens'] / r['seconds']:8,.0f} tok/s  RSS +{r['rss_growth_mb']:.0f} MB "
                  f"(anonymous +{r['anon_growth_mb']:.0f} MB)", flush=True)
            if r["valid"] != results["jsonl"]["valid"] or r["tokens"] != results["jsonl"]["tokens"]:
                print(f"  ! {name} differs from JSONL: {r['valid']} valid, {r['tokens']} tokens "
                      f"(JSONL {results['jsonl']['valid']}, {results['jsonl']['tokens']}); {r['issues']} issues")
    print(f"target: 100k rows < 60 s each (cpus={os.cpu_count()}): "
          + ", ".join(f"{n} {'PASS' if r['seconds'] * 100_000 / args.count < 60 else 'FAIL'}" for n, r in results.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
