"""The app's engine thread (ui/runs.py) between runs: it gets the engine ready for the next video only when no run
waits, and a failure there is logged while the thread keeps serving."""

import logging
import threading
import time

from ui.runs import EngineThread


def wait_for(condition, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_between_runs_only_when_none_waits_and_its_failure_is_logged_not_fatal(caplog):
    calls = []

    def between_runs():
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("the disk went away")

    gate = threading.Event()

    def held(run):
        gate.wait()
        yield "held done"

    def quick(run):
        yield "quick done"

    engine_thread = EngineThread(between_runs=between_runs)
    with caplog.at_level(logging.ERROR, logger="wan_studio"):
        first = engine_thread.start("a", held, lambda ahead: "waiting")
        second = engine_thread.start("b", quick, lambda ahead: "waiting")  # waits behind the first
        gate.set()
        assert list(first.stream()) == ["held done"]
        assert list(second.stream()) == ["waiting", "quick done"]
        wait_for(lambda: len(calls) == 1)
        time.sleep(0.2)
        assert len(calls) == 1  # not between the first and the second: the second was waiting
        wait_for(lambda: "getting ready for the next run failed" in caplog.text)
        assert "the disk went away" in caplog.text

    third = engine_thread.start("c", quick, lambda ahead: "waiting")
    assert list(third.stream()) == ["quick done"]  # the thread kept serving
    wait_for(lambda: len(calls) == 2)


def test_a_run_asked_for_while_the_engine_gets_ready_hears_so_then_runs():
    getting_ready, release = threading.Event(), threading.Event()

    def between_runs():
        getting_ready.set()
        release.wait()

    def quick(run):
        yield "done"

    engine_thread = EngineThread(between_runs=between_runs)
    assert list(engine_thread.start("a", quick, lambda ahead: f"waiting {ahead}").stream()) == ["done"]
    assert getting_ready.wait(10)
    run = engine_thread.start("b", quick, lambda ahead: f"waiting {ahead}")
    release.set()
    assert list(run.stream()) == ["waiting 0", "done"]
