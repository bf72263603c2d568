"""SignalFlag: the serve commands' stop flag, safe to set inside a signal handler."""

from __future__ import annotations

import os
import signal
import threading
import time

from orchestration.signal_flag import SignalFlag


def test_a_signal_during_wait_stops_it_within_a_poll_step() -> None:
    flag = SignalFlag()
    previous = signal.signal(signal.SIGUSR1, lambda *_: flag.set())
    try:
        sender = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGUSR1))
        start = time.monotonic()
        sender.start()
        assert flag.wait(60)  # the handler runs on this thread, inside wait()
        assert time.monotonic() - start < 30  # seen at the next poll, not at the 60 s timeout
        sender.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_wait_times_out_unset_and_returns_at_once_when_set() -> None:
    flag = SignalFlag()
    assert not flag.wait(0.01) and not flag.is_set()
    flag.set()
    start = time.monotonic()
    assert flag.wait(60) and flag.is_set()
    assert time.monotonic() - start < 30


def test_set_takes_no_lock_so_a_handler_cannot_deadlock_on_its_own_thread() -> None:
    # threading.Event.set() acquires the Event's lock, which the main thread holds while inside wait();
    # SignalFlag.set() is a plain store: it runs even while something on this thread holds every lock
    flag = SignalFlag()
    assert not any(isinstance(v, type(threading.Lock())) for v in vars(flag).values())
    flag.set()
    assert flag.is_set()
