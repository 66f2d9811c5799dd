"""Time every stage on a larger simulated configuration and print the figures.

Each stage runs as its own process, as pipeline.sh runs it, so the times include
Python start-up and imports. Nothing here is asserted: it measures.

    .venv/bin/python benchmark.py                        # 100 stations x 10 years
    .venv/bin/python benchmark.py --stations 1000 --years 10
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cli
import errors
import storage
from params import params_text_with


def run_stage(stage: str, root: Path, params: Path) -> tuple[float, float]:
    """Wall seconds and peak resident memory (MB) of one stage process."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(storage.ROOT / f"{stage}.py"), "--root", str(root),
                                "--params", str(params)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) not in (errors.EXIT_OK, errors.EXIT_GATE):  # a failed gate still ran
        raise SystemExit(f"benchmark: {stage} failed: {process.stderr.read().decode().strip()}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stations", type=int, default=100)
    parser.add_argument("--years", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="benchmark-") as folder:
        root = Path(folder)
        params = root / "params.toml"
        params.write_text(params_text_with({"n_stations": args.stations, "n_years": args.years}))
        print(f"{args.stations} stations x {args.years} years, {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
        print(f"{'stage':22}{'seconds':>9}{'peak MB':>9}")
        total = 0.0
        for stage in cli.STAGES:
            seconds, peak = run_stage(stage, root, params)
            total += seconds
            print(f"{stage:22}{seconds:>9.1f}{peak:>9.0f}", flush=True)
        rows = sum(1 for _ in open(root / "data/train/features.csv")) - 1
        print(f"{'total':22}{total:>9.1f}    ({rows:,} training feature rows)")


if __name__ == "__main__":
    main()
