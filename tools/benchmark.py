"""Time every stage on larger simulated configurations and print the figures.

Each stage runs as its own process, as pipeline.sh runs it, so the times include
Python start-up and imports. Per stage: wall time, CPU time, peak resident
memory, and station-days per second. With ``--floor``, the default
configuration's run is also set against its import floor: the time the four
processes need just to start and import what each stage uses (and end at once,
as the stages do), and against the same imports followed by the interpreter's
usual teardown. Nothing here is asserted: it measures.

    .venv/bin/python tools/benchmark.py                               # 100 stations x 10 years
    .venv/bin/python tools/benchmark.py --sizes 100x10,300x10,1000x10
    .venv/bin/python tools/benchmark.py --sizes 10x4 --floor           # the default run against its floor
    .venv/bin/python tools/benchmark.py --sizes 1000x10 --scheduler local:2   # on a Dask LocalCluster
    .venv/bin/python tools/benchmark.py --sizes "" --networks 42x10,42x30,1x30   # the detector on simulated networks

With ``--networks SEEDxSTATIONS,...`` it runs the four stages on the default
configuration with another seed and number of stations, once with the network
detector and once with none, and prints the detector's F1 per kind of fault on
the test period, the share of weather-extreme days it flags, how many
fault-free days it flags and the forecast MAE against the truth with and
without it; then, pooled, the share of each kind's days it flags by how far
the reading was off the truth (a drift starts at zero). Beside the drift F1 stands what an
ideal causal drift detector reaches on the same drifts: the exact
likelihood-ratio test for a ramp begun any of 1 to ``IDEAL_LONGEST`` days ago,
in Gaussian noise that persists from day to day exactly as the detector
learned each station's departures do, with flags held from its first crossing
to the drift's end and false alarms counted on the noise alone; no detector
that sees only the days up to today does better on average.

On a cluster, "peak MB" is the largest of the stage process and its workers
(the stage process, which holds the network-wide tables, in practice), and the
workers' own peaks, as the stage logs them, are printed beside it.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's package, for python tools/benchmark.py

from station_forecast import cli, errors, storage
from station_forecast.compute import WORKER_PEAKS
from station_forecast.files import copy_runnable
from station_forecast.flags import FAULTS, SCORED
from station_forecast.params import DEFAULT_PARAMS, params_text_with


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


def stage_command(stage: str, root: Path | str, params: Path) -> list[str]:
    """The command line that runs ``stage`` on the project folder ``root`` with the parameters ``params``."""
    return [sys.executable, str(storage.ROOT / f"{stage}.py"), "--root", str(root), "--params", str(params)]


def run_size(stations: int, years: int, scheduler: str = "") -> float:
    """Run the four stages on ``stations`` x ``years`` in a temporary folder, print a row per stage, then
    time the same run by pipeline.sh."""
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
            wall, cpu, peak, workers = measure(stage_command(stage, root, params))
            total += wall
            print(f"{stage:22}{wall:>8.1f}{cpu:>8.1f}{peak:>9.0f}{station_days / wall:>16,.0f}"
                  + (f"  {workers}" if scheduler else ""), flush=True)
        print(f"{'total':22}{total:>8.1f}")
    if not scheduler:
        print(f"{'pipeline.sh':22}{pipeline_seconds({'n_stations': stations, 'n_years': years}):>8.1f}"
              "  (end to end: each stage's imports overlap the stage before it)", flush=True)
    return total


def stages_in_turn_seconds() -> float:
    """Wall seconds of the default configuration's four stages run one after the other, each started
    when the one before it has ended."""
    with tempfile.TemporaryDirectory(prefix="benchmark-") as folder:
        start = time.perf_counter()
        for stage in cli.STAGES:
            measure(stage_command(stage, folder, DEFAULT_PARAMS))
        return time.perf_counter() - start


def pipeline_seconds(overrides: dict | None = None) -> float:
    """Wall seconds of ``pipeline.sh --force`` on the default configuration (with ``overrides``), in a copy
    of the project's code (so this project's data and models stay as they are)."""
    with tempfile.TemporaryDirectory(prefix="benchmark-") as folder:
        copy_runnable(Path(folder))
        (Path(folder) / "params.toml").write_text(params_text_with(overrides or {}))
        environment = dict(os.environ)
        if (storage.ROOT / ".venv").is_dir():  # as a user runs it (PYTHON set, it first checks every requirement)
            (Path(folder) / ".venv").symlink_to(storage.ROOT / ".venv")
        else:
            environment["PYTHON"] = sys.executable
        start = time.perf_counter()
        done = subprocess.run(["bash", str(Path(folder) / "pipeline.sh"), "--force"], cwd=folder, env=environment,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            raise SystemExit(f"benchmark: pipeline.sh failed: {done.stderr.strip()}")
        return time.perf_counter() - start


def print_floor() -> None:
    """The ``--floor`` line: the default run, by pipeline.sh and stage after stage, against the import floor."""
    piped = min(pipeline_seconds() for _ in range(2))
    in_turn = min(stages_in_turn_seconds() for _ in range(2))
    floor, with_teardown = import_floor(), import_floor(teardown=True)
    print(f"\ndefault run (best of 2): pipeline.sh {piped:.1f} s, {piped / floor:.2f} x the import floor of "
          f"{floor:.1f} s; its stages one after the other {in_turn:.1f} s, {in_turn / floor:.2f} x "
          f"({in_turn / with_teardown:.2f} x the {with_teardown:.1f} s of the same imports followed by the "
          "interpreter's teardown)")


def import_floor(teardown: bool = False) -> float:
    """Seconds the four stage processes need to start and import what their stages use, each ending
    right after its imports as a stage ends after its work (``cli.exit_now``); with ``teardown``, each
    also pays the interpreter's normal teardown of those modules (the floor as it was measured before
    the stages skipped it)."""
    floor = 0.0
    for stage in cli.STAGES:
        code = f"import os, {stage}, " + ", ".join(importlib.import_module(stage).IMPORTS) \
            + ("" if teardown else "; os._exit(0)")
        floor += min(measure([sys.executable, "-c", code])[0] for _ in range(3))
    return floor


IDEAL_LONGEST = 90  # days: the longest simulated drift
IDEAL_THRESHOLDS = (3.0, 3.5, 4.0, 4.5, 5.0)
ERROR_BANDS = (1.0, 2.0, 3.0, 5.0)  # °C: how far a faulty reading is off the truth, in these bands


def ramp_evidence(innovations: np.ndarray, persistence: float, longest: int = IDEAL_LONGEST) -> np.ndarray:
    """For each day of a station's unit-variance innovations (departures that persist with lag-one
    correlation ``persistence``, less what yesterday's explains), the largest |likelihood-ratio
    statistic| of a ramp that began 1 to ``longest`` days before it: a ramp growing by r a day adds
    r ((1 - phi) k + 1) to the k-th day's innovation."""
    n = len(innovations)
    best = np.zeros(n)
    for lag in range(1, longest + 1):
        weights = (1 - persistence) * np.arange(lag + 1) + 1
        statistic = np.convolve(innovations, weights[::-1])[:n] / np.sqrt(weights @ weights)
        statistic[:lag] = 0.0
        np.maximum(best, np.abs(statistic), out=best)
    return best


def ideal_drift_counts(root: Path, seed: int = 0) -> dict[float, np.ndarray]:
    """The ideal causal drift detector (see the module's text) on the test period of the network in
    ``root``: at each of ``IDEAL_THRESHOLDS``, its true flags, all its flags on drift and normal days,
    and the drift days."""
    import pandas as pd
    from scipy.signal import lfilter

    paths = storage.Paths(root)
    learned = storage.read_json(paths.detector)["stations"]
    readings = pd.concat([storage.read_table(paths.train_flags, ["station", "date", "observed"]).assign(test=False),
                          storage.read_table(paths.test_flags, ["station", "date", "observed"]).assign(test=True)])
    counts = {threshold: np.zeros(3) for threshold in IDEAL_THRESHOLDS}
    rng = np.random.default_rng(seed)
    for station, rows in readings.groupby("station", sort=True):
        entry = learned.get(station, {})
        if "departure_scale" not in entry:
            continue
        truth = storage.read_table(paths.truth / f"{station}.csv", ["date", "clean_temperature", "anomaly"])
        rows = rows.sort_values("date").merge(truth, on="date", how="left")
        phi, scale = entry["persistence"], entry["departure_scale"]
        drift, normal = (rows["anomaly"] == "drift").to_numpy(), (rows["anomaly"] == "none").to_numpy()
        offset = np.where(drift, (rows["observed"] - rows["clean_temperature"]).fillna(0.0).to_numpy(), 0.0)
        spread = scale * np.sqrt(1 - phi**2)  # of the innovations
        noise = lfilter([1.0], [1.0, -phi], rng.normal(0.0, spread, len(rows)))
        with_drifts, alone = (ramp_evidence((x - phi * np.r_[0.0, x[:-1]]) / spread, phi)
                              for x in (noise + offset, noise))
        fault_run = np.cumsum(normal)  # one number per stretch of faulty days (and the normal day before it)
        test = rows["test"].to_numpy()
        for threshold, count in counts.items():
            crossed = pd.Series((with_drifts > threshold) & drift).groupby(fault_run).cummax().to_numpy()
            flagged = np.where(drift, crossed, normal & (alone > threshold))
            count += [(flagged & drift & test).sum(), (flagged & (drift | normal) & test).sum(), (drift & test).sum()]
    return counts


def normal_day_flags(score: dict) -> int:
    """The flagged fault-free days, from the detector's scores over all kinds: its flags times one minus their
    precision (given to four decimals, so exact below 10,000 flags)."""
    return round(score["flagged"] * (1 - (score["precision"] or 0.0)))


def found_by_error(root: Path) -> dict[str, np.ndarray]:
    """Per kind of fault, on the test period of the network in ``root``: its days and how many of them
    were flagged, in each band of ``ERROR_BANDS`` of how far the reading was off the true temperature."""
    import pandas as pd

    paths = storage.Paths(root)
    flags = storage.read_table(paths.test_flags, ["station", "date", "observed", "flag"])
    truth = pd.concat([storage.read_table(paths.truth / f"{station}.csv", ["date", "clean_temperature", "anomaly"])
                       .assign(station=station) for station in flags["station"].unique()])
    rows = flags.merge(truth, on=["station", "date"]).dropna(subset=["observed"])
    band = np.searchsorted(ERROR_BANDS, (rows["observed"] - rows["clean_temperature"]).abs().to_numpy(), "right")
    flagged = rows["flag"].isin(FAULTS).to_numpy()
    bands = len(ERROR_BANDS) + 1
    return {kind: np.array([np.bincount(band[rows["anomaly"] == kind], minlength=bands),
                            np.bincount(band[(rows["anomaly"] == kind).to_numpy() & flagged], minlength=bands)])
            for kind in SCORED}


def first_flag_delays(root: Path) -> dict[str, list[float]]:
    """Per kind of fault, on the test period of the network in ``root``: for each fault (a station's run of
    consecutive days with that kind), the days from its first test day to its first flagged day (0: flagged on
    its first day), NaN if it was never flagged."""
    import pandas as pd

    paths = storage.Paths(root)
    flags = storage.read_table(paths.test_flags, ["station", "date", "flag"])
    truth = pd.concat([storage.read_table(paths.truth / f"{station}.csv", ["date", "anomaly"]).assign(station=station)
                       for station in flags["station"].unique()])
    rows = flags.merge(truth, on=["station", "date"]).sort_values(["station", "date"], ignore_index=True)
    new_run = (rows["anomaly"] != rows["anomaly"].shift()) | (rows["station"] != rows["station"].shift())
    rows["run"] = new_run.cumsum()
    rows["day"] = rows.groupby("run").cumcount()
    rows["flagged"] = rows["flag"].isin(FAULTS)
    delays: dict[str, list[float]] = {kind: [] for kind in SCORED}
    for (kind, _), run in rows[rows["anomaly"].isin(SCORED)].groupby(["anomaly", "run"]):
        hit = run["day"][run["flagged"]]
        delays[kind].append(float(hit.iloc[0]) if len(hit) else np.nan)
    return delays


def f1_score(hits: float, flags: float, days: float) -> float:
    """F1 from the true flags, all flags and the fault days."""
    return 2 * hits / (flags + days) if hits else 0.0


def best_threshold(counts: dict[float, np.ndarray]) -> str:
    """The ideal's best F1 over its thresholds, and that threshold in brackets."""
    scores = {threshold: f1_score(*count) for threshold, count in counts.items()}
    best = max(scores, key=scores.get)
    return f"{scores[best]:.3f} ({best:g})"


def run_network(seed: int, stations: int) -> dict:
    """The four stages on the default configuration with ``seed`` and ``stations``, with the network
    detector and then with none (stages 2 to 4 again); the metrics of both and the ideal's counts."""
    with tempfile.TemporaryDirectory(prefix="benchmark-") as folder:
        root = Path(folder)
        result = {}
        for detector in ("network", "none"):
            params = root / f"params-{detector}.toml"
            params.write_text(params_text_with({"seed": seed, "n_stations": stations, "detector": detector}))
            for stage in cli.STAGES[detector == "none":]:
                measure(stage_command(stage, root, params))
            result[detector] = storage.read_json(storage.Paths(root).metrics)
            if detector == "network":
                result["ideal"] = ideal_drift_counts(root)
                result["by_error"] = found_by_error(root)
                result["delays"] = first_flag_delays(root)
        return result


def print_networks(networks: list[tuple[int, int]]) -> None:
    """The ``--networks`` table: one row per simulated network, then each kind pooled over all of them."""
    print(f"\n{'seed':>5}{'stations':>9}" + "".join(f"{kind:>13}" for kind in SCORED)
          + f"{'ideal drift':>14}{'weather':>9}{'fronts':>8}{'false flags':>13}{'MAE network / none':>21}")
    pooled = {kind: np.zeros(3) for kind in SCORED}  # true flags, flags, fault days
    false_flags = 0
    by_error = {kind: np.zeros((2, len(ERROR_BANDS) + 1), dtype=int) for kind in SCORED}  # days, flagged
    ideal_pooled = {threshold: np.zeros(3) for threshold in IDEAL_THRESHOLDS}
    delays: dict[str, list[float]] = {kind: [] for kind in SCORED}
    for seed, stations in networks:
        result = run_network(seed, stations)
        scores = result["network"]["detector"]
        cells = ""
        for kind in SCORED:
            score = scores[kind]
            pooled[kind] += [round((score["recall"] or 0.0) * score["days"]), score["flagged"], score["days"]]
            cells += f"{score['f1']:>13.3f}" if score["days"] else f"{'-':>13}"
        for kind, counts in result["by_error"].items():
            by_error[kind] += counts
        for kind, found in result["delays"].items():
            delays[kind] += found
        for threshold, count in result["ideal"].items():
            ideal_pooled[threshold] += count
        mae = "{:.3f} / {:.3f}".format(*(result[detector]["forecast"]["truth"]["all_stations"]["model"]["mae"]
                                        for detector in ("network", "none")))
        ideal_cell = best_threshold(result["ideal"]) if scores["drift"]["days"] else "-"
        wrong = normal_day_flags(scores["any"])
        false_flags += wrong
        weather = [scores[key]["share"] for key in ("weather_events", "fronts")]
        weather_cells = "".join(f"{share:>{width}.1%}" if share is not None else f"{'-':>{width}}"
                                for share, width in zip(weather, (9, 8), strict=True))
        print(f"{seed:>5}{stations:>9}{cells}{ideal_cell:>14}{weather_cells}{wrong:>13}{mae:>21}", flush=True)
    print(f"{'pooled':>14}" + "".join(f"{f1_score(*pooled[kind]):>13.3f}" for kind in SCORED)
          + f"{best_threshold(ideal_pooled):>14}{'':>17}{false_flags:>13}")
    print("F1 on the test period; ideal drift: the best over thresholds (in brackets) of the ideal causal test; "
          "false flags: flagged fault-free days")
    edges = [f"{low:g}-{high:g}" for low, high in itertools.pairwise(ERROR_BANDS)]
    print("\nFault days flagged, pooled, by how far the reading was off the truth (°C): share flagged (days)")
    print(f"{'':>14}" + "".join(f"{band:>14}" for band in [f"< {ERROR_BANDS[0]:g}", *edges, f">= {ERROR_BANDS[-1]:g}"]))
    for kind, (days, flagged) in by_error.items():
        print(f"{kind:>14}" + "".join(f"{f'{hit / n:.0%} ({n})' if n else '-':>14}" for n, hit in zip(days, flagged,
                                                                                                    strict=True)))
    print("\nFaults of the test period, pooled: how many were flagged at all, and the days from a fault's first "
          "day to its first flag")
    print(f"{'':>14}{'faults':>8}{'flagged':>9}{'median days':>13}{'90th pct':>10}")
    for kind, found in delays.items():
        times = np.array(found)
        seen = times[~np.isnan(times)]
        cells = f"{np.median(seen):>13g}{np.percentile(seen, 90):>10g}" if len(seen) else f"{'-':>13}{'-':>10}"
        print(f"{kind:>14}{len(times):>8}{f'{len(seen) / len(times):.0%}' if len(times) else '-':>9}{cells}")


def pairs(text: str) -> list[tuple[int, int]]:
    """``"1000x10,3000x10"`` as [(1000, 10), (3000, 10)]: an argparse type, so a typo is a usage error."""
    found = []
    for part in filter(None, text.split(",")):
        numbers = part.strip().lower().split("x")
        if len(numbers) != 2 or not all(number.isdigit() for number in numbers):
            raise argparse.ArgumentTypeError(f"{part!r} is not two whole numbers joined by x, such as 1000x10")
        found.append((int(numbers[0]), int(numbers[1])))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100x10", type=pairs,
                        help="comma-separated STATIONSxYEARS (default 100x10)")
    parser.add_argument("--scheduler", default="", help="compute.scheduler for the --sizes runs, e.g. local:2")
    parser.add_argument("--floor", action="store_true",
                        help="also time the default run against the import floor of its four processes")
    parser.add_argument("--networks", default="", type=pairs,
                        help="comma-separated SEEDxSTATIONS: the detector's scores on these simulated networks")
    args = parser.parse_args()
    print(f"{len(os.sched_getaffinity(0))} usable CPUs, python {sys.version.split()[0]}")
    for stations, years in args.sizes:
        run_size(stations, years, args.scheduler)
    if args.networks:
        print_networks(args.networks)
    if args.floor:
        print_floor()


if __name__ == "__main__":
    main()
