"""Time every stage on larger simulated configurations and print the figures.

Each stage runs as its own process, as pipeline.sh runs it, so the times include
Python start-up and imports. Per stage: wall time, CPU time, peak resident
memory, and station-days per second. With ``--floor``, the default
configuration's run is also set against its import floor: the time the four
processes need just to start and import what each stage uses (and end at once,
as the stages do), and against the same imports followed by the interpreter's
usual teardown. Nothing here is asserted: it measures.

    .venv/bin/python benchmark.py                               # 100 stations x 10 years
    .venv/bin/python benchmark.py --sizes 100x10,300x10,1000x10
    .venv/bin/python benchmark.py --sizes 10x4 --floor           # the default run against its floor
    .venv/bin/python benchmark.py --sizes 1000x10 --scheduler local:2   # on a Dask LocalCluster

On a cluster, "peak MB" is the largest of the stage process and its workers
(the stage process, which holds the network-wide tables, in practice), and the
workers' own peaks, as the stage logs them, are printed beside it.
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
from compute import WORKER_PEAKS
from params import DEFAULT_PARAMS, params_text_with

# What each stage imports, for the import floor: its module and the libraries it loads when it runs
# (the stage modules import numpy and pandas lazily, so they are named here).
STAGE_IMPORTS = {
    "data_creation": ["numpy", "pandas", "data_creation"],
    "model_preprocessing": ["numpy", "pandas", "model_preprocessing", "sklearn.preprocessing", "joblib"],
    "model_preparation": ["numpy", "pandas", "model_preparation", "sklearn.ensemble", "sklearn.linear_model",
                          "sklearn.model_selection", "joblib"],
    "model_testing": ["numpy", "pandas", "model_testing", "sklearn.metrics", "matplotlib.pyplot", "joblib"],
}


def measure(command: list[str]) -> tuple[float, float, float, str]:
    """Wall seconds, CPU seconds, peak resident MB and what the process logged last about its workers' peak
    memory (empty if nothing)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=storage.ROOT)
    logged = process.stderr.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code not in (errors.EXIT_OK, errors.EXIT_GATE):  # a failed gate still ran every step
        raise SystemExit(f"benchmark: {' '.join(command[1:3])} failed: {logged.strip()}")
    workers = [line.split(WORKER_PEAKS, 1)[1].strip() for line in logged.splitlines() if WORKER_PEAKS in line]
    # The children's own CPU time (a cluster's workers) is in the waited process's usage only if it waited for
    # them; LocalCluster does, so CPU covers the workers too.
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, workers[-1] if workers else ""


def run_size(stations: int, years: int, scheduler: str = "") -> float:
    """Run the four stages on ``stations`` x ``years`` in a temporary folder, print a row per stage."""
    with tempfile.TemporaryDirectory(prefix="benchmark-") as folder:
        root = Path(folder)
        params = root / "params.toml"
        params.write_text(params_text_with({"n_stations": stations, "n_years": years, "scheduler": scheduler}))
        station_days = stations * years * 365.25
        print(f"\n{stations} stations x {years} years ({station_days:,.0f} station-days)"
              + (f" on {scheduler}" if scheduler else ""))
        print(f"{'stage':22}{'wall s':>8}{'CPU s':>8}{'peak MB':>9}{'station-days/s':>16}"
              + ("  workers' peak MB" if scheduler else ""))
        total = 0.0
        for stage in cli.STAGES:
            wall, cpu, peak, workers = measure([sys.executable, str(storage.ROOT / f"{stage}.py"), "--root",
                                                str(root), "--params", str(params)])
            total += wall
            print(f"{stage:22}{wall:>8.1f}{cpu:>8.1f}{peak:>9.0f}{station_days / wall:>16,.0f}"
                  + (f"  {workers}" if scheduler else ""), flush=True)
        print(f"{'total':22}{total:>8.1f}")
        return total


def import_floor(teardown: bool = False) -> float:
    """Seconds the four stage processes need to start and import what their stages use, each ending
    right after its imports as a stage ends after its work (``cli.exit_now``); with ``teardown``, each
    also pays the interpreter's normal teardown of those modules (the floor as it was measured before
    the stages skipped it)."""
    floor = 0.0
    for modules in STAGE_IMPORTS.values():
        code = "import os, " + ", ".join(modules) + ("" if teardown else "; os._exit(0)")
        floor += min(measure([sys.executable, "-c", code])[0] for _ in range(3))
    return floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100x10", help="comma-separated STATIONSxYEARS (default 100x10)")
    parser.add_argument("--scheduler", default="", help="compute.scheduler for the --sizes runs, e.g. local:2")
    parser.add_argument("--floor", action="store_true",
                        help="also time the default run against the import floor of its four processes")
    args = parser.parse_args()
    print(f"{len(os.sched_getaffinity(0))} usable CPUs, python {sys.version.split()[0]}")
    for size in args.sizes.split(","):
        stations, years = (int(part) for part in size.lower().split("x"))
        run_size(stations, years, args.scheduler)
    if args.floor:
        with tempfile.TemporaryDirectory(prefix="benchmark-") as folder:
            runs = []
            for _ in range(2):
                start = time.perf_counter()
                for stage in cli.STAGES:
                    measure([sys.executable, str(storage.ROOT / f"{stage}.py"), "--root", folder,
                             "--params", str(DEFAULT_PARAMS)])
                runs.append(time.perf_counter() - start)
        floor, with_teardown = import_floor(), import_floor(teardown=True)
        print(f"\ndefault run {min(runs):.1f} s (best of 2), import floor {floor:.1f} s: "
              f"{min(runs) / floor:.2f} x the floor ({min(runs) / with_teardown:.2f} x the {with_teardown:.1f} s "
              "of the same imports followed by the interpreter's teardown)")


if __name__ == "__main__":
    main()
