"""The regular steps a series can have.

A run is daily or monthly (data_creation.py decides and records it in
data/source.json); every later stage counts lags, windows, horizons and the
test period in steps of that frequency.
"""

# frequency -> pandas offset alias of one step (monthly readings are dated the first of their month)
FREQUENCIES = {"daily": "D", "monthly": "MS"}
