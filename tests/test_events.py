"""The reader's event queue with its one-shot wake-up (generation/events.py), shared by the scheduler's
streams and the server's handles."""

import queue
import threading

import pytest

from qwen2audio.generation.events import End, Events


def test_poll_takes_what_has_come_and_keeps_the_end():
    ev = Events()
    assert ev.poll() == ([], None)
    ev.post("a")
    ev.post("b")
    assert ev.poll() == (["a", "b"], None)
    ev.post("c")
    err = ValueError("boom")
    ev.finish(err)
    items, end = ev.poll()
    assert items == ["c"] and isinstance(end, End) and end.error is err
    assert ev.poll() == ([], end)  # the End is answered again, nothing else
    assert ev.get(block=False) == (end, True)
    with pytest.raises(ValueError, match="boom"):  # read: the same, with the producer's failure raised
        ev.read()


def test_read_gives_what_came_before_a_failure_then_raises_it():
    """The text decoded just before a request failed was dropped with the failure (a streamed answer's last
    words never reached the client before its error event)."""
    ev = Events()
    ev.post("a")
    ev.post("b")
    ev.finish(ValueError("boom"))
    assert ev.read() == (["a", "b"], False)
    with pytest.raises(ValueError, match="boom"):
        ev.read()
    with pytest.raises(ValueError, match="boom"):  # and again: the End is answered at every later read
        ev.read()


def test_read_says_whether_the_end_has_come():
    ev = Events()
    ev.post("a")
    assert ev.read() == (["a"], False)
    ev.finish()
    assert ev.read() == ([], True)


def test_get_blocks_until_an_item_and_raises_empty_when_none_comes():
    ev = Events()
    with pytest.raises(queue.Empty):
        ev.get(timeout=0.01)
    ev.post(1)
    ev.finish()
    assert ev.get() == (1, False)
    item, is_end = ev.get()
    assert is_end and item.error is None
    assert ev.get() == (item, True) and ev.empty() and ev.ended


def test_a_listener_is_woken_once_by_the_next_post_or_at_once_when_something_waits():
    ev = Events()
    calls = []
    ev.on_event(lambda: calls.append("x"))
    assert calls == []
    ev.post("a")
    ev.post("b")
    assert calls == ["x"]  # one-shot
    ev.on_event(lambda: calls.append("y"))  # "a" and "b" wait unread: at once
    assert calls == ["x", "y"]
    ev.poll()
    ev.on_event(lambda: calls.append("z"))
    assert calls == ["x", "y"]
    ev.finish()
    assert calls == ["x", "y", "z"]


def test_an_end_only_listener_sleeps_through_items_and_wakes_at_the_end_or_at_once_after_it():
    ev = Events()
    calls = []
    ev.on_event(lambda: calls.append(1), end_only=True)
    ev.post("a")
    assert calls == []
    ev.finish()
    assert calls == [1]
    ev.on_event(lambda: calls.append(2), end_only=True)  # the End was posted: at once, read or not
    assert calls == [1, 2]
    ev.poll()
    ev.on_event(lambda: calls.append(3))
    assert calls == [1, 2, 3]


@pytest.mark.parametrize("end_only", [False, True])
def test_a_reader_on_wake_ups_alone_gets_every_item_from_a_racing_producer(end_only):
    """The producer posts while the reader sets its listener: no wake-up is lost (no hang), nothing is
    read twice or skipped."""
    n = 3000
    ev = Events()
    got: list[int] = []
    woken = threading.Event()

    def produce():
        for i in range(n):
            ev.post(i)
        ev.finish()

    t = threading.Thread(target=produce)
    t.start()
    end = None
    while end is None:
        woken.clear()
        ev.on_event(woken.set, end_only)
        assert woken.wait(10), "a wake-up was lost"
        items, end = ev.poll()
        got.extend(items)
    t.join()
    assert got == list(range(n)) and end.error is None
