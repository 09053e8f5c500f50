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


def test_host_reads_records_what_would_wait_for_a_gpu():
    """testing.HostReads on CPU tensors: reads of values (item, tolist, nonzero, a copy to the host with
    cpu()) are recorded with where they were made; what stays on the device (arithmetic, a copy to another
    dtype, numpy() of a host tensor) is not."""
    import torch

    from encodec_fast import host
    from encodec_fast.testing import HostReads
    x = torch.arange(6.0)
    with HostReads() as reads:
        y = (x * 2).to(torch.float64) + 1
        y.numpy()
    assert reads.reads == []
    with HostReads() as reads:
        y.sum().item()
        y.tolist()
        y.nonzero()
        y.cpu()
    assert [op for op, _ in reads.reads] == ["_local_scalar_dense", "tolist", "nonzero", "cpu"], reads.reads
    assert all(where == "" for _, where in reads.reads)  # made here, in a test: none in the package
    with HostReads() as reads:
        later, event = host.to_host_later(y)  # on CPU the tensor itself; on CUDA a copy behind an event
        host.wait(event)
    assert reads.reads == [] and later is y
