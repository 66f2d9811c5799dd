"""Robust statistics of date x station tables: medians that skip missing days, and spreads that a few faults cannot
widen.
"""

from __future__ import annotations

from station_forecast import runtime
from station_forecast.runtime import lazy_import

np = lazy_import("numpy")
pd = lazy_import("pandas")
MAD_TO_SD = 1.4826  # the MAD of a normal distribution times this is its standard deviation
SCALE_BLOCK = 128  # stations per task of robust_scale
SEASON = 1  # a calendar month's statistics take the days of this many months either side too


def nanmedian(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """The median along ``axis`` leaving NaN out (NaN where nothing is left): the values of
    ``np.nanmedian``, by one sort instead of a selection per row (several times faster on the
    date x station tables and on the many short rows of neighbours' predictions)."""
    if values.shape[axis] == 0:
        return np.full(np.delete(values.shape, axis), np.nan)
    ordered = np.sort(values, axis=axis)  # NaN sort last
    count = np.expand_dims((~np.isnan(ordered)).sum(axis=axis), axis)
    low = np.take_along_axis(ordered, np.maximum(count - 1, 0) // 2, axis=axis)
    high = np.take_along_axis(ordered, count // 2 - (count == 0), axis=axis)
    median = np.where(count % 2 == 1, low, (low + high) / 2)  # np.median averages the middle two
    return np.where(count > 0, median, np.nan).squeeze(axis)


def robust_scale(values: pd.DataFrame, threads: int = 1) -> pd.Series:
    """Per column, the median absolute deviation from the median (NaN left out) as a normal distribution's
    standard deviation; the columns in blocks of ``SCALE_BLOCK`` on ``threads`` threads (sorting releases
    the interpreter), the same values as in one piece."""
    array = values.to_numpy(dtype=float)
    blocks = [array[:, begin:begin + SCALE_BLOCK] for begin in range(0, array.shape[1], SCALE_BLOCK)]
    deviation = np.concatenate(runtime.Threads(threads).map(_median_deviation, blocks)) if blocks else np.empty(0)
    return pd.Series(MAD_TO_SD * deviation, index=values.columns)


def _median_deviation(block: np.ndarray) -> np.ndarray:
    return nanmedian(np.abs(block - nanmedian(block)))


def season_rows(index: pd.DatetimeIndex) -> list[np.ndarray]:
    """For each calendar month 1-12, whether each day of ``index`` falls in it or within ``SEASON`` months of it."""
    month = index.month.to_numpy() - 1
    return [np.isin(month, [(m + shift) % 12 for shift in range(-SEASON, SEASON + 1)]) for m in range(12)]


def seasonal_scale(values: pd.DataFrame, threads: int = 1) -> pd.DataFrame:
    """``robust_scale`` of each calendar month's days (and ``SEASON`` months either side): month (1-12) x
    column."""
    return pd.DataFrame([robust_scale(values[rows], threads) for rows in season_rows(values.index)],
                        index=pd.RangeIndex(1, 13, name="month"))
