"""What each lifecycle signal asks for (`_signals.StopRequests`)."""

from __future__ import annotations

import signal

from pymilterkit._signals import SIGNAL_DEBOUNCE, StopRequests


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_first_stop_signal_drains_a_later_one_stops_at_once() -> None:
    clock = Clock()
    requests = StopRequests(clock)
    assert not requests.draining
    assert requests.classify(signal.SIGTERM) == "drain"
    assert requests.draining
    clock.now += SIGNAL_DEBOUNCE + 0.5
    assert requests.classify(signal.SIGINT) == "now"


def test_a_copy_of_the_same_stop_signal_is_one_request() -> None:
    # A supervisor forwards the signal a service manager also sent to every process.
    clock = Clock()
    requests = StopRequests(clock)
    assert requests.classify(signal.SIGTERM) == "drain"
    clock.now += SIGNAL_DEBOUNCE / 10
    assert requests.classify(signal.SIGTERM) is None


def test_sighup_reloads_every_time() -> None:
    requests = StopRequests(Clock())
    assert requests.classify(signal.SIGHUP) == "reload"
    assert requests.classify(signal.SIGHUP) == "reload"
    assert not requests.draining
