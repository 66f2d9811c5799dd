"""Stop signals: the handler a stage runs under, and the check every commit makes first.

Python runs a signal's handler between two steps of the main thread, wherever it
is. When that step is inside a callback the interpreter calls for itself (a
weakref callback of the import machinery, a ``__del__``), the exception the
handler raises is printed as "Exception ignored" and dropped, and the stage would
run on and commit outputs it had been told to abandon. So a stop is also
remembered: ``check`` raises it again before anything is renamed into place, and
the dropped exception is not printed as a traceback. Standard library only.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Signals that stop a stage cleanly, each ending it with 128 + the signal's number, as a shell reports it.
STOP_SIGNALS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated", signal.SIGHUP: "hung up"}

# The stop signals this process received while ``handled`` was in force, first one first.
received: list[int] = []


class Terminated(Exception):
    """SIGTERM or SIGHUP arrived: stop like Ctrl-C, cleaning up temporary files on the way out."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(STOP_SIGNALS.get(signum, "terminated"))
        self.signum = signum


def stop_exception(signum: int) -> BaseException:
    """What a stop by ``signum`` raises: KeyboardInterrupt for Ctrl-C, as Python does, else Terminated."""
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def signal_of(stop: BaseException) -> int:
    return stop.signum if isinstance(stop, Terminated) else signal.SIGINT


def check() -> None:
    """Raise the stop again if one arrived: after a stop signal nothing more is committed, even when the
    exception its handler raised was dropped on the way."""
    if received:
        raise stop_exception(received[0])


@contextmanager
def handled() -> Iterator[None]:
    """Stop signals raise (``_on_stop_signal``) for the duration; the previous handlers come back after."""
    received.clear()
    previous = {signum: signal.signal(signum, _on_stop_signal) for signum in STOP_SIGNALS}
    previous_hook = sys.unraisablehook

    def quiet_about_a_dropped_stop(unraisable: Any) -> None:
        if not (received and isinstance(unraisable.exc_value, (KeyboardInterrupt, Terminated))):
            previous_hook(unraisable)

    sys.unraisablehook = quiet_about_a_dropped_stop
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _on_stop_signal(signum: int, frame: object) -> None:
    """Stop once: a second signal (Ctrl-C reaches the stage and pipeline.sh passes it on too) must not cut
    the clean-up of the first short."""
    received.append(signum)
    for other in STOP_SIGNALS:  # a handler that does nothing, not SIG_IGN: a signal already pending would
        signal.signal(other, _already_stopping)  # then raise "ignored due to race condition"
    raise stop_exception(signum)


def _already_stopping(signum: int, frame: object) -> None:
    """A stop signal after the first: the stage is already stopping."""
