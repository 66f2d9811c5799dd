"""The regular steps a series can have, and date arithmetic in those steps.

A run is daily or monthly (data_creation.py decides and records it in
data/source.json); every later stage counts lags, windows, horizons and the
test period in steps of that frequency.
"""

from __future__ import annotations

from typing import Any

# frequency -> pandas offset alias of one step (monthly readings are dated the first of their month)
FREQUENCIES = {"daily": "D", "monthly": "MS"}


def step_offset(frequency: str, steps: int = 1) -> Any:
    """``steps`` steps of ``frequency`` as a pandas offset, to add to dates."""
    import pandas as pd

    return pd.tseries.frequencies.to_offset(FREQUENCIES[frequency]) * steps
