"""The human-readable report of model_testing.py: a Markdown summary and PNG figures.

Everything here reads the metrics and the per-row predictions model_testing.py
has already computed (for the figures, the rows of the first stations and the
residuals' histograms, gathered a block of stations at a time: ``FigureRows``);
nothing is scored twice. matplotlib is imported inside
``write_figures`` with the headless Agg backend, so the report works on a server
without a display and the import costs nothing to the other stages.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from station_forecast import units
from station_forecast.flags import FAULTS, Flag
from station_forecast.runtime import lazy_import
from station_forecast.steps import FREQUENCIES

np = lazy_import("numpy")
pd = lazy_import("pandas")

PREDICTORS = ["model", "persistence", "climatology", "drift", "neighbours_ridge"]
# One colour per predictor in every figure.
COLOURS = {"model": "tab:blue", "persistence": "tab:orange", "climatology": "tab:green", "drift": "tab:purple",
           "neighbours_ridge": "tab:brown"}
FORECAST_STEPS = 365  # the forecast figure shows at most the last 365 steps of the test period, so they stay readable
GROUPS = ["all_stations", "trained_stations", "holdout_stations"]
STATION_BARS = 40  # the error-by-station figure shows at most this many stations
MARKDOWN_SPECIAL = "\\`*[]<>|"  # characters a station's name may hold that mean something in Markdown text


def markdown_text(text: object) -> str:
    """``text`` as literal Markdown: a station named "Dayton | OH" or "[old] Erie" must not end a table cell or
    start a link."""
    return "".join("\\" + char if char in MARKDOWN_SPECIAL else char for char in str(text))
# Figure sizes in inches at DPI dots per inch: the PNGs are 1200x450 and 1000x500 pixels.
DPI = 100
FORECAST_SIZE = (12.0, 4.5)
SUMMARY_SIZE = (10.0, 5.0)
MARGINS = {"left": 0.8, "right": 0.2, "bottom": 0.6, "top": 0.6, "between": 0.8}  # inches
# The predictions column each metrics reference scores against, and what it is.
REFERENCE_COLUMNS = {"truth": "clean_temperature", "observed": "observed", "accepted": "observed_accepted"}
REFERENCES = {
    "truth": "the clean simulated temperature of every test day",
    "observed": "every reading of the test period",
    "accepted": "only the readings the detector did not flag; a reference beside `observed`, never instead of it",
}
PREDICTION_COLUMNS = ["station", "date", "step", "target_date", "observed", "flag", "model", "model_lower",
                      "model_upper", "persistence", "climatology", "drift", "neighbours_ridge", "clean_temperature",
                      "anomaly", "event"]
# The detector's scores on weather, not faults: what each counts.
WEATHER_SCORES = {"weather_events": "regional cold snaps, heat waves and fronts",
                  "fronts": "fronts, the day they split the neighbours and after"}
FLAGGED_COLUMNS = ["station", "date", "period", "observed", "expected", "repaired", "flag", "confidence"]


def figure_names(stations: list[str], steps: int) -> dict[str, str]:
    """File name of every figure, keyed by what it shows: a forecast figure for each of ``stations`` (the
    first ones by name), and one of the error by step where more than one step ahead is forecast."""
    names = {f"forecast {station}": f"forecast_{station}.png" for station in stations}
    names.update({"error by station": "error_by_station.png", "residuals": "residuals.png"})
    if steps > 1:
        names["error by step"] = "error_by_step.png"
    return names


class FigureRows:
    """What the figures are drawn from, gathered from the test rows a block of stations at a time (``add``,
    blocks in station order): every row of the first ``n_stations`` stations by name, the largest step ahead,
    and the histograms of the next-step residuals against ``reference`` (``residual_histograms``)."""

    def __init__(self, n_stations: int, reference: str) -> None:
        self.n_stations, self.reference = n_stations, reference
        self.stations: list[str] = []
        self.rows: list[pd.DataFrame] = []
        self.steps = 0
        self.residuals: dict | None = None

    def add(self, frame: pd.DataFrame) -> None:
        if frame.empty:
            return
        self.steps = max(self.steps, int(frame["step"].max()))
        wanted = sorted(frame["station"].unique())[:self.n_stations - len(self.stations)]
        if wanted:
            self.stations += wanted
            self.rows.append(frame[frame["station"].isin(wanted).to_numpy()])
        histograms = residual_histograms(frame[frame["step"] == 1], self.reference)
        self.residuals = histograms if self.residuals is None else {
            key: self.residuals[key] + value for key, value in histograms.items()}

    def station_rows(self) -> pd.DataFrame:
        return pd.concat(self.rows, ignore_index=True) if len(self.rows) > 1 else self.rows[0]


RESIDUAL_RANGE = 8  # °C either side of zero in the residuals figure; beyond it a residual is drawn at the edge
RESIDUALS_DRAWN = ("persistence", "model")


def residual_histograms(rows: pd.DataFrame, reference: str) -> dict:
    """Per predictor drawn, the counts of its residuals against ``reference`` in bins of 0.2 °C, their
    absolute sum and number; and how many rows have the reference: sums, so blocks of rows add up."""
    actual = rows[REFERENCE_COLUMNS[reference]]
    bins = np.linspace(-RESIDUAL_RANGE, RESIDUAL_RANGE, 81)
    result = {"forecasts": int(actual.notna().sum())}
    for predictor in RESIDUALS_DRAWN:
        residual = (actual - rows[predictor]).dropna()
        result[f"{predictor} counts"] = np.histogram(residual.clip(-RESIDUAL_RANGE, RESIDUAL_RANGE), bins=bins)[0]
        result[f"{predictor} absolute"] = residual.abs().sum()
        result[f"{predictor} n"] = len(residual)
    return result


# ------------------------------------------------------------------------ figures


def write_figures(folder: Path, figures: FigureRows, metrics: dict, names: dict[str, str]) -> None:
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    reference = metrics["gate_reference"]
    frame = figures.station_rows() if figures.stations else None
    for key, name in names.items():
        if key.startswith("forecast "):
            fig = _forecast_figure(plt, frame[frame["station"] == key.removeprefix("forecast ")], metrics)
        elif key == "error by station":
            fig = _error_by_station_figure(plt, metrics["forecast"][reference]["per_station"], reference)
        elif key == "error by step":
            fig = _error_by_step_figure(plt, metrics["by_step"], reference, metrics["interval"]["level"])
        else:
            fig = _residuals_figure(plt, figures.residuals, reference)
        # No creation date or version in the file, so the same data gives the same bytes.
        fig.savefig(folder / name, dpi=DPI, metadata={"Software": None})
        plt.close(fig)


def _subplots(plt, size: tuple[float, float], panels: int = 1, **margins: float):
    """A figure of ``size`` inches with ``panels`` axes side by side and fixed margins in inches
    (``MARGINS``, or as given): the same room for the labels in every figure, without the layout
    engine's passes over the text (which took as long as drawing the figure)."""
    width, height = size
    inches = {**MARGINS, **margins}
    fig, axes = plt.subplots(1, panels, figsize=size)
    fig.subplots_adjust(left=inches["left"] / width, right=1 - inches["right"] / width,
                        bottom=inches["bottom"] / height, top=1 - inches["top"] / height,
                        wspace=inches["between"] * panels / width)
    return fig, axes


def _forecast_figure(plt, rows: pd.DataFrame, metrics: dict):
    level = metrics["interval"]["level"]
    station = rows["station"].iat[0]
    # A regular calendar, so steps without a forecast show as gaps instead of straight lines.
    rows = rows[rows["step"] == 1]
    rows = rows.set_index(pd.to_datetime(rows["target_date"])).asfreq(FREQUENCIES[metrics.get("frequency", "daily")])
    shown = np.arange(len(rows)) >= len(rows) - FORECAST_STEPS
    period = "the test period" if shown.all() else f"the last {FORECAST_STEPS} steps of the test period"
    rows = rows[shown]
    dates = rows.index
    fig, ax = _subplots(plt, FORECAST_SIZE)
    ax.fill_between(dates, rows["model_lower"], rows["model_upper"], color=COLOURS["model"], alpha=0.2,
                    linewidth=0, label=f"{level:.0%} interval")
    ax.plot(dates, rows["model"], color=COLOURS["model"], linewidth=1.0, label="forecast")
    ax.plot(dates, rows["observed"], ".", color="black", markersize=2.5, label="reading")
    if "clean_temperature" in rows:
        ax.plot(dates, rows["clean_temperature"], color="gray", linewidth=0.6, alpha=0.8, label="true temperature")
        injected = rows["anomaly"].notna() & ~rows["anomaly"].isin([Flag.NONE, Flag.MISSING]) & rows["observed"].notna()
        ax.plot(dates[injected], rows.loc[injected, "observed"], "o", mfc="none", color="tab:orange",
                markersize=7, label="injected anomaly")
    flagged = rows["flag"].isin(FAULTS)
    ax.plot(dates[flagged], rows.loc[flagged, "observed"], "x", color="tab:red", markersize=6,
            label="flagged by the detector")
    covered = metrics["interval"][metrics["gate_reference"]]["per_station"][station]["coverage"]
    ax.set_title(f"{station}: next-step forecast on {period} ({level:.0%} interval covers {covered:.1%} "
                 "of the whole test period)")
    ax.set_ylabel("temperature (°C)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small", ncols=3)
    return fig


def _error_by_station_figure(plt, per_station: dict, reference: str):
    stations = sorted(per_station)
    shown = ""
    if len(stations) > STATION_BARS:  # a large network: the stations where the model gains least
        gain = {s: per_station[s]["model"]["mae"] / max(per_station[s]["persistence"]["mae"], 1e-9) for s in stations}
        worst = sorted(stations, key=lambda s: (-gain[s], s))[:STATION_BARS]
        shown = f"; the {STATION_BARS} of {len(stations)} stations where the model gains least on persistence"
        stations = sorted(worst)
    x = np.arange(len(stations))
    fig, ax = _subplots(plt, SUMMARY_SIZE, bottom=1.0 if len(stations) > 12 else MARGINS["bottom"])
    width = 0.8 / len(PREDICTORS)
    for i, predictor in enumerate(PREDICTORS):
        mae = [per_station[s].get(predictor, {}).get("mae", np.nan) for s in stations]
        ax.bar(x + (i - (len(PREDICTORS) - 1) / 2) * width, mae, width, label=predictor, color=COLOURS[predictor])
    ax.set_xticks(x, stations, rotation=45 if len(stations) > 12 else 0)
    ax.set_ylabel(f"test MAE (°C) against the {reference} temperature")
    untrained = [s for s in stations if "climatology" not in per_station[s]]
    note = f" (model and persistence only: {', '.join(untrained)} never trained on)" if untrained else ""
    ax.set_title(f"Error by station: model and baselines{note}{shown}", fontsize="medium" if shown else None)
    ax.grid(axis="y", alpha=0.3)
    # Room above the tallest bar for the legend in one row, so it is placed without a search for free space.
    ax.set_ylim(0, ax.get_ylim()[1] * 1.2)
    ax.legend(loc="upper center", ncols=len(PREDICTORS))
    return fig


def _error_by_step_figure(plt, by_step: dict, reference: str, level: float):
    steps = sorted(by_step, key=int)
    x = [int(s) for s in steps]
    fig, (error, width) = _subplots(plt, SUMMARY_SIZE, panels=2)
    for predictor in PREDICTORS:
        error.plot(x, [by_step[s]["forecast"][predictor]["mae"] for s in steps], "o-", markersize=3,
                   color=COLOURS[predictor], label=predictor)
    error.set_xlabel("steps ahead")
    error.set_ylabel(f"test MAE against the {reference} values")
    error.set_title("Error grows with the step")
    error.legend(loc="upper left", fontsize="small")
    for predictor in ("model", "persistence"):
        width.plot(x, [by_step[s]["interval"][predictor]["width"] for s in steps], "o-", markersize=3,
                   color=COLOURS[predictor], label=predictor)
    coverage = ", ".join(f"{by_step[s]['interval']['model']['coverage']:.0%}" for s in (steps[0], steps[-1]))
    width.set_xlabel("steps ahead")
    width.set_ylabel(f"mean width of the {level:.0%} band")
    width.set_title(f"So does the band\n(model coverage at the first and last step: {coverage})", fontsize="medium")
    width.legend(loc="upper left", fontsize="small")
    for ax in (error, width):
        ax.grid(alpha=0.3)
    return fig


def _residuals_figure(plt, histograms: dict, reference: str):
    fig, ax = _subplots(plt, SUMMARY_SIZE)
    bins = np.linspace(-RESIDUAL_RANGE, RESIDUAL_RANGE, 81)
    for predictor in RESIDUALS_DRAWN:
        n = histograms[f"{predictor} n"]
        mae = histograms[f"{predictor} absolute"] / n if n else float("nan")
        ax.stairs(histograms[f"{predictor} counts"], bins, fill=True, alpha=0.5, color=COLOURS[predictor],
                  label=f"{predictor} (MAE {mae:.2f})")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"{reference} temperature minus forecast (°C); values beyond ±{RESIDUAL_RANGE} are drawn at "
                  f"±{RESIDUAL_RANGE}")
    ax.set_ylabel("test rows")
    ax.set_title(f"Residual distribution on the test period, all stations ({histograms['forecasts']} forecasts)")
    ax.legend(loc="upper left")
    return fig


# ------------------------------------------------------------------------ console


def measure(source: dict) -> tuple[str, str]:
    """The unit errors are in and what the series measures: °C and temperature, unless the user's series
    are not temperatures (``import.unit = "none"``)."""
    return ("the series' own unit", "value") if source.get("unit") == "none" else ("°C", "temperature")


def console_table(metrics: dict, source: dict) -> str:
    """The metrics as the plain-text tables model_testing.py prints."""
    unit, quantity = measure(source)
    lines = []
    for reference, scores in metrics["forecast"].items():
        lines.append(f"Test MAE / RMSE in {unit} against the {reference} {quantity} ({REFERENCES[reference]})")
        lines.append(f"  {'':28}" + "".join(f"{p:>20}" for p in PREDICTORS))
        for group in ("all_stations", "trained_stations", "holdout_stations"):
            if group in scores:
                cells = [f"{s['mae']:.3f} / {s['rmse']:.3f}" if (s := scores[group].get(p)) else "-"
                         for p in PREDICTORS]
                n = scores[group]["model"]["n"]
                lines.append(f"  {group + f' (n={n})':28}" + "".join(f"{c:>20}" for c in cells))
    interval = metrics["interval"]
    lines.append(f"{interval['level']:.0%} prediction interval: coverage / mean width ({unit}) / pinball loss")
    lines.append(f"  {'':36}" + "".join(f"{p:>24}" for p in ("model", "persistence")))
    for reference in metrics["forecast"]:
        for group, scores in interval[reference].items():
            if group != "per_station":
                cells = [f"{s['coverage']:.1%} / {s['width']:.2f} / {s['pinball']:.3f}" for s in scores.values()]
                label = f"{reference} {group} (n={scores['model']['n']})"
                lines.append(f"  {label:36}" + "".join(f"{c:>24}" for c in cells))
    detector = metrics["detector"]
    if "skipped" in detector:
        lines.append(f"Anomaly detector: not scored ({detector['skipped']})")
    else:
        lines.append("Anomaly detector on test days    precision  recall     F1   days")
        for kind, s in detector.items():
            if kind in WEATHER_SCORES:
                continue
            cells = [f"{v:.2f}" if v is not None else "-" for v in (s["precision"], s["recall"], s["f1"])]
            lines.append(f"  {kind:30}" + "".join(f"{c:>9}" for c in cells) + f"{s['days']:>7}")
        for key, what in WEATHER_SCORES.items():
            events = detector.get(key, {"days": 0})
            if events["days"]:
                lines.append(f"  flagged on {what}: {events['flagged']} of {events['days']} days "
                             f"({events['share']:.1%})")
    return "\n".join(lines)


# ------------------------------------------------------------------------ Markdown


def summary_markdown(metrics: dict, source: dict, names: dict[str, str], tolerance: float,
                     flags: pd.DataFrame) -> str:
    """The report's text: data source, gate, forecast errors, intervals, detector, flagged readings, figures."""
    level = metrics["interval"]["level"]
    measured = {"mean": "mean", "max": "maximum", "min": "minimum"}[source.get("quantity", "mean")]
    # A monthly series of daily maxima is not the month's maximum: the step is said apart from the quantity.
    quantity = f"{measured} temperature in monthly steps" if source.get("frequency") == "monthly" \
        else f"daily {measured} temperature"
    lines = ["# Test report", ""]
    if source.get("source") == "simulation":
        lines.append(f"Data: {source['stations']} simulated stations ({quantity}, °C).")
    elif source.get("unit") == "none":
        n = source.get("stations", 0)
        lines.append(f"Data: {n} series from `{source.get('source')}`, {source.get('frequency', 'daily')}, used as "
                     "they are (not temperatures: read °C below as the series' own unit).")
    else:
        n = source.get("stations", 0)
        written = units.SHORT_NAMES.get(source.get("unit", "C"))
        converted = f", converted from {written}" if written else ""
        read = {name for entry in source.get("files", {}).values() for name in entry.get("files", [entry["file"]])}
        # A table of many stations (a row or a column per station) is not a station's file.
        held = f"station file{'s' if n != 1 else ''}" if len(read) in (0, n) else \
            f"station{'s' if n != 1 else ''} in {len(read)} file{'s' if len(read) != 1 else ''}"
        lines.append(f"Data: {n} {held} from `{source.get('source')}` ({quantity}{converted}).")
    passed = metrics["gate"]["passed"]
    lines += ["", f"**Quality gate: {'passed' if passed else 'FAILED'}** — {metrics['gate']['verdict']}. "
              f"Model: `{metrics['model']}`.", ""]
    lines += _forecast_section(metrics)
    if len(metrics["by_step"]) > 1:
        lines += _step_section(metrics)
    lines += _interval_section(metrics, level, tolerance)
    lines += _detector_section(metrics)
    lines += _flagged_section(flags)
    if source.get("files"):
        lines += _import_section(source["files"])
    lines += ["## Figures", ""]
    for key, name in names.items():
        lines += [f"![{markdown_text(key)}]({quote(name)})", ""]  # a name with spaces is one link
    return "\n".join(lines)


def _forecast_section(metrics: dict) -> list[str]:
    steps = len(metrics["by_step"])
    what = "Next-step forecast" if steps <= 1 else f"Forecast error over steps 1 to {steps} ahead, pooled"
    lines = [f"## {what} (MAE / RMSE)", ""]
    for reference, scores in metrics["forecast"].items():
        lines += [f"Against {REFERENCES[reference]} (`{reference}`):", "",
                  "| stations | rows | " + " | ".join(PREDICTORS) + " |", "|---|---:|" + "---:|" * len(PREDICTORS)]
        for group in GROUPS:
            if group in scores:
                cells = [f"{s['mae']:.3f} / {s['rmse']:.3f}" if (s := scores[group].get(p)) else "-"
                         for p in PREDICTORS]
                lines.append(f"| {group.replace('_', ' ')} | {scores[group]['model']['n']} | " + " | ".join(cells)
                             + " |")
        lines.append("")
    return lines


def _step_section(metrics: dict) -> list[str]:
    reference, level = metrics["gate_reference"], metrics["interval"]["level"]
    lines = [f"## By step ahead (against `{reference}`, stations seen in training)", "",
             "| step | rows | " + " | ".join(f"{p} MAE" for p in PREDICTORS)
             + f" | model R² | {level:.0%} band coverage | width | pinball |",
             "|---:|---:|" + "---:|" * (len(PREDICTORS) + 4)]
    for step, scores in sorted(metrics["by_step"].items(), key=lambda item: int(item[0])):
        forecast, band = scores["forecast"], scores["interval"]["model"]
        r2 = forecast["model"]["r2"]
        lines.append(f"| {step} | {forecast['model']['n']} | "
                     + " | ".join(f"{forecast[p]['mae']:.3f}" for p in PREDICTORS)
                     + f" | {r2 if r2 is None else f'{r2:.3f}'} | {band['coverage']:.1%} | {band['width']:.2f} | "
                       f"{band['pinball']:.3f} |")
    return [*lines, ""]


def _interval_section(metrics: dict, level: float, tolerance: float) -> list[str]:
    interval = metrics["interval"]
    lines = [f"## {level:.0%} prediction interval", ""]
    for reference in metrics["forecast"]:
        overall = interval[reference]["all_stations"]["model"]
        off = overall["coverage"] - level
        verdict = (("within" if abs(off) <= tolerance else "NOT within")
                   + f" {100 * tolerance:g} percentage points of the nominal {level:.0%}")
        lines += [f"Against `{reference}`: the model's band covers **{overall['coverage']:.1%}** of test rows "
                  f"({verdict}; {overall['below']:.1%} fall below it, {overall['above']:.1%} above), "
                  f"mean width {overall['width']:.2f} °C.", ""]
    reference = metrics["gate_reference"]
    lines += [f"By group, against `{reference}` (persistence gets a band calibrated the same way):", "",
              "| stations | model coverage | width °C | pinball | persistence coverage | width °C | pinball |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for group in GROUPS:
        if group in interval[reference]:
            m, p = interval[reference][group]["model"], interval[reference][group]["persistence"]
            lines.append(f"| {group.replace('_', ' ')} | {m['coverage']:.1%} | {m['width']:.2f} | {m['pinball']:.3f} "
                         f"| {p['coverage']:.1%} | {p['width']:.2f} | {p['pinball']:.3f} |")
    lines += ["", "Per station: " + ", ".join(f"{markdown_text(station)} {s['coverage']:.1%}" for station, s in
                                               interval[reference]["per_station"].items()), ""]
    return lines


def _detector_section(metrics: dict) -> list[str]:
    detector = metrics["detector"]
    lines = ["## Anomaly detector on the test period", ""]
    if "skipped" in detector:
        return [*lines, f"Not scored: {detector['skipped']}. Precision and recall need to know which readings "
                "really were faulty; the detector's verdict on every day is still in `data/test/flags.csv`.", ""]
    lines += ["| kind | days | flagged | precision | recall | F1 |", "|---|---:|---:|---:|---:|---:|"]
    for kind, s in detector.items():
        if kind in WEATHER_SCORES:
            continue
        cells = [f"{v:.2f}" if v is not None else "-" for v in (s["precision"], s["recall"], s["f1"])]
        lines.append(f"| {kind} | {s['days']} | {s['flagged']} | " + " | ".join(cells) + " |")
    for key, what in WEATHER_SCORES.items():
        events = detector.get(key, {"days": 0})
        if events["days"]:
            lines += ["", f"{what.capitalize()} (weather, not faults): {events['flagged']} of their "
                      f"{events['days']} station-days flagged ({events['share']:.1%})."]
    return [*lines, ""]


def largest_flags(flagged: pd.DataFrame, n: int) -> pd.DataFrame:
    """The ``n`` flagged readings that depart most from their expected value, the first in the table first
    among equals: so the largest of the largest of consecutive parts of a table are the table's largest."""
    departure = (flagged["observed"] - flagged["expected"]).abs()
    order = departure.sort_values(ascending=False, kind="stable").index
    return flagged.loc[order].head(n).assign(departure=(flagged["observed"] - flagged["expected"]).round(2))


def _flagged_section(flags: pd.DataFrame) -> list[str]:
    lines = ["## Flagged readings", ""]
    if flags.empty:
        return [*lines, "The detector flagged no reading.", ""]
    lines += ["The readings the detector flagged, training and test period alike, largest departure from the "
              "expected value first (all of them are in `data/flagged.csv`). A reading is repaired only when the "
              "confidence reaches `quality_control.repair_confidence`.", "",
              "| station | date | period | reading °C | expected °C | kind | confidence | used as °C |",
              "|---|---|---|---:|---:|---|---:|---:|"]
    for row in flags.itertuples():
        lines.append(f"| {markdown_text(row.station)} | {row.date} | {row.period} | {row.observed:.1f} | "
                     f"{row.expected:.1f} | {row.flag} | {row.confidence:.2f} | {row.repaired:.1f} |")
    return [*lines, ""]


def _import_section(files: dict) -> list[str]:
    columns = ["rows", "kept", "missing_value", "bad_date", "future_date", "not_a_number", "impossible",
               "conflicting_duplicate", "repeated_rows", "steps_without_reading"]
    lines = ["## Imported files", "", "| station | " + " | ".join(c.replace("_", " ") for c in columns)
             + " | out of order | train / test steps |", "|---|" + "---:|" * len(columns) + "---|---|"]
    for station, r in files.items():
        lines.append(f"| {markdown_text(station)} | " + " | ".join(str(r.get(c, 0)) for c in columns)
                     + f" | {'yes' if r['out_of_order'] else 'no'} | {r['train_steps']} / {r['test_steps']} |")
    return [*lines, ""]


def predictions_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The per-row forecasts the figures are drawn from, for anyone who wants to plot their own."""
    return frame[[c for c in PREDICTION_COLUMNS if c in frame]]
