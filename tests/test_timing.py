"""`encodec_fast.timing`: named, nested stage timers (the tokenizer's time breakdown)."""

import threading
import time

import pytest

from encodec_fast import timing


def test_nested_stages_count_their_own_time():
    timer = timing.StageTimer()
    with timer.active():
        for _ in range(2):
            with timing.stage("outer"):
                time.sleep(0.02)
                with timing.stage("inner"):
                    time.sleep(0.03)
                    with timing.stage("innermost"):
                        time.sleep(0.01)
        with timing.stage("inner"):  # the same name outside: adds up
            time.sleep(0.01)
    sec, counts = timer.seconds(), timer.counts()
    assert list(sec) == ["outer", "inner", "innermost"]
    assert counts == {"outer": 2, "inner": 3, "innermost": 2}
    assert 0.04 <= sec["outer"] < 0.06 + 0.05  # its own sleeps only (scheduling adds, never removes)
    assert 0.07 <= sec["inner"] < 0.07 + 0.05
    assert 0.02 <= sec["innermost"] < 0.02 + 0.05
    assert not timer.gpu


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
