"""`encodec_fast.timing`: named, nested stage timers (the tokenizer's time breakdown)."""

import threading
import time

import pytest

from encodec_fast import timing


class FakeClock:
    """A clock that moves only when told to: exact figures, whatever the machine's load."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_nested_stages_count_their_own_time():
    clock = FakeClock()
    timer = timing.StageTimer(clock)
    with timer.active():
        for _ in range(2):
            with timing.stage("outer"):
                clock.advance(2)
                with timing.stage("inner"):
                    clock.advance(3)
                    with timing.stage("innermost"):
                        clock.advance(1)
                clock.advance(0.5)
        with timing.stage("inner"):  # the same name outside: adds up
            clock.advance(1)
        clock.advance(100)  # outside every stage: nobody's
    sec, counts = timer.seconds(), timer.counts()
    assert list(sec) == ["outer", "inner", "innermost"]
    assert counts == {"outer": 2, "inner": 3, "innermost": 2}
    assert sec == {"outer": 5.0, "inner": 7.0, "innermost": 2.0}
    assert not timer.gpu


def test_the_default_clock_is_the_wall_clock():
    timer = timing.StageTimer()
    with timer.active(), timing.stage("sleep"):
        time.sleep(0.01)
    assert timer.seconds()["sleep"] >= 0.01  # a sleep lasts at least that long


def test_stage_is_a_no_op_without_an_active_timer_and_per_thread():
    with timing.stage("nothing"):  # no timer: nothing to report to, nothing raised
        pass
    assert timing.current() is None
    mine, theirs = timing.StageTimer(), timing.StageTimer()

    def other_thread():
        with theirs.active(), timing.stage("theirs"):
            time.sleep(0.005)

    with mine.active():
        t = threading.Thread(target=other_thread)
        t.start()
        with timing.stage("mine"):
            t.join()
        assert timing.current() is mine
    assert timing.current() is None
    assert set(mine.seconds()) == {"mine"} and set(theirs.seconds()) == {"theirs"}


def test_an_exception_still_closes_the_stage_and_add_counts_outer_time():
    timer = timing.StageTimer()
    with timer.active():
        with pytest.raises(ValueError):
            with timing.stage("fails"):
                with timing.stage("inside"):
                    raise ValueError("boom")
        with timing.stage("after"):
            pass
    timer.add("elsewhere", 1.5)
    timer.add("elsewhere", 0.5)
    sec = timer.seconds()
    assert set(sec) == {"fails", "inside", "after", "elsewhere"} and sec["elsewhere"] == 2.0
    assert timer.counts()["elsewhere"] == 2
