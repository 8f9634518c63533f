"""How long the data_checks gate takes on SST-2 train (67,349 rows), imports excluded.

Peer: a plain ``pandas.read_csv`` of the same file, measured in the same run, so the ratio says
what validation costs on top of merely reading the data. Target (issue 4): <= 10 s on 2 cores.

    python benchmarks/validate_sst2.py                 # 5 repeats
    python benchmarks/validate_sst2.py --repeats 1     # quick
    python benchmarks/validate_sst2.py --against       # dev.tsv against train.tsv instead

The last line printed is one JSON object with the numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("SELFATTN_DATA_DIR", REPO.parent / "shared" / "data")))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--against", action="store_true", help="validate dev.tsv against train.tsv (split checks)")
    parser.add_argument("--output-dir", type=Path, default=None, help="also build the Data Docs here (timed)")
    args = parser.parse_args(argv)
    train = args.data_dir / "sst2" / "train.tsv"
    if not train.is_file():
        print(f"SST-2 not found under {args.data_dir}; set SELFATTN_DATA_DIR", file=sys.stderr)
        return 2

    t = time.perf_counter()
    import great_expectations  # noqa: F401  (the import is excluded from the timings below)
    import pandas as pd

    from data_checks import validate

    import_s = time.perf_counter() - t

    def read_plain() -> None:
        pd.read_csv(train, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False)

    def run_validate():
        if args.against:
            return validate(args.data_dir / "sst2" / "dev.tsv", against=train, output_dir=args.output_dir)
        return validate(train, output_dir=args.output_dir)

    t = time.perf_counter()
    report = run_validate()  # builds the process's GX context once
    first_s = time.perf_counter() - t
    assert report.passed, report.summary_line()

    validate_s, read_s = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        run_validate()
        validate_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        read_plain()
        read_s.append(time.perf_counter() - t)

    med_validate, med_read = statistics.median(validate_s), statistics.median(read_s)
    target = "dev.tsv --against train.tsv" if args.against else "train.tsv"
    print(f"imports (GX, pandas, data_checks): {import_s:.2f} s (excluded)")
    print(f"validate {target}: first call {first_s:.2f} s (incl. GX context), median of {args.repeats}: {med_validate:.3f} s")
    print(f"peer, pandas.read_csv of train.tsv: median {med_read:.3f} s -> validate / read = {med_validate / med_read:.1f}x")
    print(f"checks: {len(report.checks)}, rows: {report.n_rows}, target <= 10 s: {'met' if first_s <= 10 else 'MISSED'}")
    print(json.dumps({
        "benchmark": "validate_sst2",
        "target": target,
        "rows": report.n_rows,
        "checks": len(report.checks),
        "import_s": round(import_s, 3),
        "first_call_s": round(first_s, 3),
        "validate_median_s": round(med_validate, 3),
        "pandas_read_median_s": round(med_read, 4),
        "ratio_vs_read": round(med_validate / med_read, 2),
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
