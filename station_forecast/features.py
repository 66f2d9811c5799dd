"""The model's features, each defined next to its name, and how a forecast is made from them.

Every feature of a station on day t is computed from its repaired readings up
to day t (a date x station table): nothing here may look at day t+1, the day
being forecast. The day-of-year terms describe the target day, which is known
in advance. Anything else in a features table is metadata (identifiers,
targets, baselines) and never reaches a model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# The spread of the day-to-day change over the last 60 days (°C), a per-row
# metadata column: prediction intervals are this times calibrated quantiles, so
# a station with calm weather gets a narrow band and a stormy one a wide band.
SPREAD_COLUMN = "change_sd60"

# name -> f(repaired readings, repaired-today indicator); both date x station tables. Temperatures first: they
# tell a model a station's climate as well as its weather.
TEMPERATURE_FEATURES: dict[str, Callable[[Any, Any], Any]] = {
    "temp_lag0": lambda t, _: t,
    "temp_lag1": lambda t, _: t.shift(1),
    "temp_lag2": lambda t, _: t.shift(2),
    "temp_lag3": lambda t, _: t.shift(3),
    "temp_mean7": lambda t, _: t.rolling(7).mean(),
    "temp_mean30": lambda t, _: t.rolling(30, min_periods=20).mean(),
}
# The most steps before the origin a feature reads (``temp_mean30``).
HISTORY_STEPS = 30
STATION_FEATURES: dict[str, Callable[[Any, Any], Any]] = {
    **TEMPERATURE_FEATURES,
    "temp_std7": lambda t, _: t.rolling(7).std(),
    "temp_trend7": lambda t, _: t.rolling(7).mean() - t.shift(7).rolling(7).mean(),
    "repaired_today": lambda _, repaired: repaired,
}
# The columns of a features table that baselines are made from (metadata, never a model's input): the
# station's training climatology at the target day, its mean change per step, and the neighbours-ridge
# baseline's forecast (model_preprocessing.neighbours_ridge).
BASELINE_COLUMNS = ["climatology", "drift", "neighbours_ridge"]
# name -> what is compared, a function of a date x station table of repaired readings; the feature is the
# mean of it over the station's neighbours minus the station's own, on the origin day. Offset-free (a valley
# station colder than the hill beside it every day does not count): weather that has reached the neighbours
# today reaches the station tomorrow. A station without neighbours gets 0, its station features alone.
NETWORK_FEATURES: dict[str, Callable[[Any], Any]] = {
    "nbr_change": lambda t: t.diff(),  # the day's change, t-1 to t
    "nbr_week_departure": lambda t: t - t.rolling(7).mean(),  # the reading's departure from its last 7 days
}
# The station's own neighbours-ridge forecast of the target (model_preprocessing.neighbours_ridge: its lags,
# its neighbours' readings at the origin, the calendar, with weights fitted for this station alone) minus
# today's reading. Empty for a station without a ridge (never trained on, too few training rows): its rows are
# forecast by a model fitted without it (``Forecaster``).
RIDGE_FEATURE = "ridge_change"
# name -> f(repaired readings, the station's climatology at the origin, at the target): date x station tables.
# Its weather without its climate (model_preprocessing.station_climatology: from its training steps, or a held-out
# station's steps before the test period). A row without its ridge forecast (a station never trained on, or with
# too few training rows) is forecast from these instead of TEMPERATURE_FEATURES: from temperatures, a model
# trained on some stations takes a station of another climate for a heat wave or a cold snap about to end. On a
# simulated network whose two training stations were 13 °C warmer than the held-out one, it forecast that one
# 3.3 °C too warm on average (MAE 3.56 °C, persistence 2.12); from these, 1.92. A row with its ridge forecast
# keeps the temperatures: the ridge reads departures from the station's climatology, so it carries the
# station's level.
CLIMATE_FEATURES: dict[str, Callable[[Any, Any, Any], Any]] = {
    "anomaly_today": lambda t, normal, _: t - normal,
    "season_change": lambda _, normal, target_normal: target_normal - normal,  # what the seasons alone move
}
# Sine and cosine of the target day's position in the year.
CALENDAR_FEATURES = ["doy_sin", "doy_cos"]
FEATURES = [*STATION_FEATURES, *NETWORK_FEATURES, RIDGE_FEATURE, *CLIMATE_FEATURES, *CALENDAR_FEATURES]
FULL_FEATURES = [name for name in FEATURES if name not in CLIMATE_FEATURES]
FALLBACK_FEATURES = [name for name in FEATURES if name != RIDGE_FEATURE and name not in TEMPERATURE_FEATURES]


# The least spread a row may have: a station whose readings stood still for 60 days (a stuck sensor the
# detector did not repair, or detection off) would otherwise divide residuals by zero.
MIN_SPREAD = 0.01


def spread(repaired: Any) -> Any:
    """``change_sd60``: the standard deviation of the last 60 day-to-day changes (at least 20 of them), and
    at least ``MIN_SPREAD``."""
    return repaired.diff().rolling(60, min_periods=20).std().clip(lower=MIN_SPREAD)


def mean_change(values: Any) -> Any:
    """``drift``: each station's mean change from one step to the next (a date x station table's columns),
    the slope of the drift baseline."""
    return values.diff().mean()


def day_of_year_terms(dates: Any) -> tuple[Any, Any]:
    import numpy as np

    angle = 2 * np.pi * (dates.day_of_year.to_numpy() - 1) / 365.25
    return np.sin(angle), np.cos(angle)


class Forecaster:
    """One step's model: ``full`` on ``FULL_FEATURES`` where the row has its ridge forecast (``RIDGE_FEATURE``),
    ``fallback`` on ``FALLBACK_FEATURES`` on the others. Either may be None when no row needs it."""

    def __init__(self, full: Any, fallback: Any) -> None:
        self.full, self.fallback = full, fallback

    def predict(self, table: Any) -> Any:
        import numpy as np

        known = table[RIDGE_FEATURE].notna().to_numpy()
        change = np.full(len(table), np.nan)
        for model, rows, columns in ((self.full, known, FULL_FEATURES), (self.fallback, ~known, FALLBACK_FEATURES)):
            if rows.any():
                if model is None:
                    raise ValueError(f"{rows.sum()} rows need a model that was not fitted")
                change[rows] = model.predict(table.loc[rows, columns])
        return change


def forecast(estimator: Any, table: Any) -> Any:
    """Next-day temperature: today's (repaired) reading plus the predicted change.

    Models learn the change from today rather than the level, which puts stations
    with different climates on one scale.
    """
    return table["temp_today"].to_numpy() + estimator.predict(table[FEATURES])
