"""A stop flag that a signal handler may set (`ultramem serve`, `shard serve`, `serve --replicas`).

`threading.Event.set()` inside a SIGTERM handler can deadlock: the handler runs on the main thread,
between two bytecodes, and if that thread is at that moment inside `Event.wait()` holding the
Event's internal lock, `set()` waits for a lock its own thread holds, forever. `SignalFlag.set()`
only stores a bool, so it is safe there; `wait()` sleeps in 50 ms steps and re-reads it (a sleep
that a signal interrupts is resumed, PEP 475, so a stop is seen within one step).
"""

from __future__ import annotations

import time


class SignalFlag:
    """Set from a signal handler (or any thread); polled by the main loop with `wait(timeout)`."""

    POLL_S = 0.05

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        """Request the stop: one store, no lock, safe inside a signal handler."""
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the flag, re-reading it every 50 ms; returns whether it is set."""
        deadline = time.monotonic() + timeout
        while not self._set and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(self.POLL_S, left))
        return self._set
