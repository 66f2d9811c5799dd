"""The units a user's readings can be written in, and how they become what the stages work in.

Temperatures are worked in °C; "none" is a series that is not a temperature (used as written).
"""

from __future__ import annotations

from typing import Any

# unit -> how archives write it
UNITS = {
    "C": "degrees Celsius",
    "0.1C": "tenths of a degree Celsius (ECA&D, GHCN-Daily)",
    "F": "degrees Fahrenheit",
    "K": "kelvins (reanalyses such as ERA5, some weather services' APIs)",
    "none": "not a temperature: used as written",
}


# unit -> how a value written with its unit ends ("12.5 °C", as web pages and exports of them write it; "º" is the
# ordinal sign keyboards put in its place)
WRITTEN_AFTER = {"C": r"\s*[°º]?\s*C", "F": r"\s*[°º]?\s*F", "K": r"\s*K"}


# unit -> its short name in a report's "converted from ..." (none for °C and for series that are not temperatures)
SHORT_NAMES = {"0.1C": "tenths of °C", "F": "°F", "K": "kelvins"}


def to_celsius(written: Any, unit: str) -> Any:
    """Readings as written (a number, array or Series) in °C (unchanged for "none")."""
    if unit == "F":
        return (written - 32.0) * 5.0 / 9.0
    if unit == "0.1C":
        return written / 10.0
    if unit == "K":
        return written - 273.15
    return written


def as_written(celsius: float, unit: str) -> str:
    """A value in °C as the files write it, with its unit, for messages that advise what to declare."""
    if unit == "F":
        return f"{round(celsius * 9 / 5 + 32, 1) + 0.0:.1f} °F"  # + 0.0: 0 °F read back is no "-0.0"
    if unit == "0.1C":
        return f"{celsius * 10:g} (tenths of °C)"
    if unit == "K":
        return f"{celsius + 273.15:.2f} K"
    return f"{celsius:g}" + (" °C" if unit == "C" else "")
