"""Every label a station-day can carry, named once: what the simulation injects, what the detector flags, and
what scoring, the report and the benchmark count.

Tables hold a flag's value (``"level_shift"``). ``Flag`` members are strings, so they compare equal to the
values read back from a table.
"""

from __future__ import annotations

from enum import StrEnum


class Flag(StrEnum):
    NONE = "none"  # a reading the detector accepts; a simulated day without an anomaly
    MISSING = "missing"  # no reading that day
    GROSS = "gross"  # a jump no weather makes, or a value beyond any climate (such as a missing-value code)
    SPIKE = "spike"  # a sudden departure from the neighbours on one day
    LEVEL_SHIFT = "level_shift"  # a departure from the neighbours that stepped away from zero and stays
    DRIFT = "drift"  # a departure from the neighbours that ramps away from zero
    STUCK = "stuck"  # the same reading repeated while the neighbours moved
    DATE_OFFSET = "date_offset"  # readings keyed a day early or late: the weather of the neighbours a day apart


# The faults the detector flags, in the order logs and reports list them.
FAULTS = [Flag.GROSS, Flag.SPIKE, Flag.LEVEL_SHIFT, Flag.DRIFT, Flag.STUCK, Flag.DATE_OFFSET]
# What the simulation injects, each with its [anomalies] <kind>_rate and <kind>_days.
INJECTED = [Flag.SPIKE, Flag.LEVEL_SHIFT, Flag.STUCK, Flag.DRIFT, Flag.DATE_OFFSET, Flag.MISSING]
# The injected faults a detector is scored on (a missing day is no reading to flag).
SCORED = [kind for kind in INJECTED if kind != Flag.MISSING]
# The verdict works on integer codes, a reading's code being its flag's position here.
VERDICT_CODES = [Flag.NONE, Flag.MISSING, Flag.STUCK, Flag.GROSS, Flag.SPIKE, Flag.DRIFT, Flag.LEVEL_SHIFT,
                 Flag.DATE_OFFSET]
CODE = {kind: code for code, kind in enumerate(VERDICT_CODES)}
FAULT_CODES = [CODE[kind] for kind in FAULTS]
