"""Quality control of station readings that tells sensor faults from weather, using the network.

Weather is shared by neighbouring stations; a sensor fault is not. So every
reading is compared with what its neighbours say it should be:

* **Neighbours** are learned on the days before the test period: the stations
  whose daily anomalies (reading minus the station's seasonal climatology)
  correlate best with this one's, at least ``min_correlation``. No coordinates
  are needed, so this works on a user's own files. A station that reads the
  same as this one on most days is the same record under another name, never
  a neighbour (the two would agree on every fault). The **expected value** of a
  reading is the climatology plus the neighbours' anomalies that day combined by
  a regression fitted on those days (or, on days some neighbour is missing or
  suspect, the median of each neighbour's own straight-line prediction).
* The **departure** (reading minus expected value) persists from day to day, as
  local weather does; its **innovation** is the part yesterday's departure does
  not explain. Both are scaled by their robust spread on the learning days, and
  the innovation also by the day's storminess across the network. A large
  innovation that today's reading still carries is a ``spike``, unless
  the reading lies between its neighbours' single lines or near one of them (a
  front that has passed some neighbours and not others is weather). A departure that
  stepped away from zero some days ago and stays there is a ``level_shift``; one
  that ramps away is a ``drift``: generalised likelihood-ratio tests for a step
  or a ramp in a persistent series, from candidate starts within the last 30 or
  60 days (every day of the first week, then about 15 % apart); it stays
  flagged only while today's reading and the last week's mean departure still
  carry the offset, so a fault that ended is let go, and only while the last
  week's mean departure is beyond ``LEAST_SHIFT`` robust standard deviations of
  the daily departure in that season, never less than the year's (less is local
  weather on a real network, and a sea breeze wanders more in summer), and only
  on days ``LEAST_NEIGHBOURS`` (two) or more of its neighbours read (with one,
  which of the two stations moved cannot be told). A run of
  identical readings is ``stuck`` when the neighbours moved while the sensor
  did not, or when it is longer than the station's own resolution makes likely
  (learned from how often its learning days repeat: whole-degree °F records
  repeat often).
* A stretch whose readings are keyed a day late or early against the
  neighbours' is a ``date_offset``: the station's day-to-day changes follow
  the neighbours' expected changes of the day before (or after) better than
  those of the same day. Each day's evidence, a capped log-likelihood ratio of
  Student-t residuals, is summed by a sequential test (CUSUM) per direction
  and flagged above ``offset_threshold``; only on days ``LEAST_NEIGHBOURS`` or
  more neighbours read, and only at stations whose learning days are clearly on their
  neighbours' dates (a network mixing observation hours has stations a day
  apart by nature), in the months where they are (in summer a station's
  changes may be its own showers more than shared weather). A stretch keyed a
  day early ends with one day's temperature read twice, so at a station whose
  exact repeats are rare a repeat lets such a stretch go that day. A reading
  keyed a day early is repaired by the one before it, which holds its day's
  temperature; one keyed a day late is not repaired.
* **Gross checks** run everywhere, and are all a station with no usable
  neighbour gets: a jump from the median of the ``window`` days before beyond
  ``gross_margin`` times the 99.9th percentile of the station's own learning
  days (so its own weather is almost never flagged), and over-long repeats.
  The percentile is learned from readings plausible by climate only (a
  missing-value code read as a temperature would otherwise teach the check
  that 80 °C jumps are weather), and for temperatures it is capped at a
  ``JUMP_CEILING`` no weather reaches. A reading further than
  ``climate_margin`` robust standard deviations of the station's anomalies
  from its climatology is gross whatever its neighbours read: no weather is
  that far out, however many stations share it (a code written by every
  station on the same day), and such a reading neither speaks for its
  neighbours nor makes the day look stormy. A value a station's learning days
  hold on at least 1 % of days, far outside all its other readings, is a code
  written as a reading (an outage of years written -99 a day): nothing is
  learned from it, so the climate check flags it.

Every flag carries its kind and a confidence: 0.5 at its threshold, the odds
multiplied by e² for each unit of evidence beyond it (a heuristic, not a
calibrated probability). Only flags with at least ``repair_confidence`` are
repaired: a spike, stuck or gross reading by its expected value, a level shift
or drift by removing the offset the test estimated. A missing day gets the
expected value, so features stay defined. Flags of day *t* use readings of days
up to *t* only. The neighbours are checked in two passes, the second leaving out
readings the first flagged, so a faulty neighbour does not make a station look
faulty. Even the first pass leaves out a reading beyond any weather (further
than ``BEYOND_WEATHER`` standard deviations from the nearest of its neighbours'
lines, so one faulty neighbour cannot put a good reading there): a joint
regression moves by a neighbour's weight times its fault, so a sensor 25 °C
off would make all its neighbours look faulty, be left without a reference in
the second pass and go unflagged. In the second pass, a reading the first found stuck or gross, or a
spike the next day's reading returned from, adds nothing to the shift and drift
tests, so a burst of spikes is not taken for a shift. (Learning's rounds run
the first pass only, without that look beyond the weather.) And learning is
repeated without the readings the previous round flagged (a shift or drift
from the day the test says it began, not only from the day it was found), so
faults in the training years do not blur what is learned. A fault missed in
some season would still bend that season's climatology; the departures from
the neighbours show it, so their own seasonal mean, fitted robustly (Tukey's
biweight), is folded into the climatology.

A station whose learning days do not reach into every calendar month (one that
started less than a year before the test period) cannot fit its own seasons:
harmonics fitted to a few months swing wildly in the others. It takes the
seasons of its neighbours that cover the year, scaled to its own level and
swing (its level alone where no station has seen a whole year: the regression
on the neighbours then carries the seasons they share); its repeat share is
shrunk towards the network's; and in the months it never saw, slow departures
are not flagged as shifts or drifts (spikes, stuck and gross readings still
are), since there its borrowed climatology may be off by a degree or two for
weeks.

The work is split by concern, each module importing only those before it:
``robust`` (medians and spreads that skip missing days), ``climatology``,
``neighbours`` (who they are and what they say), ``checks`` (the tests a
reading faces), ``verdict`` (flags, confidences and repairs) and ``learning``
(what the verdict needs, learned from the training days). The names below are
what the stages use.
"""

from station_forecast.quality_control.checks import STATION_BLOCK
from station_forecast.quality_control.climatology import (
    LEAST_READINGS as CLIMATOLOGY_LEAST_READINGS,
)
from station_forecast.quality_control.climatology import (
    borrow_seasons,
    climatology_at,
    covers_the_year,
    fit_climatology,
)
from station_forecast.quality_control.learning import JUMP_CEILING, learn, other_units, unit_changes
from station_forecast.quality_control.neighbours import (
    MIN_OVERLAP_DAYS,
    SAME_RECORD_TOLERANCE,
    forecast_neighbours,
    learn_neighbours,
    same_records,
    without_neighbours,
)
from station_forecast.quality_control.verdict import detect, mostly_flagged, no_detection, shared_values

__all__ = ["CLIMATOLOGY_LEAST_READINGS", "JUMP_CEILING", "MIN_OVERLAP_DAYS", "SAME_RECORD_TOLERANCE", "STATION_BLOCK",
           "borrow_seasons", "climatology_at", "covers_the_year", "detect", "fit_climatology", "forecast_neighbours",
           "learn", "learn_neighbours", "mostly_flagged", "no_detection", "other_units", "same_records",
           "shared_values", "unit_changes", "without_neighbours"]
