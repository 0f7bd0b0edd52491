"""Decoding ahead in threads (atlas/data/ahead.py): every image once, each batch in order, no further ahead
than asked, nothing decoded by the thread while the model computes, a failure raised where the batch is
wanted; and the build's threads give the worker processes' batches bit for bit."""
import threading
import time

import pytest
import torch

from atlas.data import Preprocess, open_dataset
from atlas.data.ahead import DecodeAhead
from atlas.data.inputs import InputBatches
from atlas.util.device import default_workers, input_workers

from test_data_inputs import PRE, jpeg_folder  # noqa: F401 - the fixture


class Recorder:
    """decode(i) -> (i, the thread that decoded it), each call recorded, optionally slowed."""

    def __init__(self, delay=0.0, fail=None):
        self.calls, self.delay, self.fail = [], delay, fail
        self.lock = threading.Lock()

    def __call__(self, i):
        if self.delay:
            time.sleep(self.delay)
        if i == self.fail:
            raise RuntimeError(f"cannot decode {i}")
        with self.lock:
            self.calls.append(i)
        return i, threading.current_thread().name

    def count(self):
        with self.lock:
            return len(self.calls)


def settle(rec, timeout=5.0):
    """The number of calls once it has stopped changing for a while."""
    end, last, since = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() < end:
        n = rec.count()
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > 0.3:
            return n
        time.sleep(0.02)
    raise AssertionError("decoding never settled")


def test_every_batch_in_order_each_image_once_by_both_threads():
    batches = [list(range(s, s + n)) for s, n in ((0, 5), (5, 1), (6, 7), (13, 3), (16, 5))]
    rec = Recorder(delay=0.002)
    ahead = DecodeAhead(rec, batches, ahead_images=6)
    try:
        got = [ahead.batch(b) for b in range(len(batches))]
    finally:
        ahead.close()
    assert [[i for i, _ in items] for items in got] == batches
    assert sorted(rec.calls) == list(range(21))  # once each
    assert {t for items in got for _, t in items} == {"MainThread", "atlas-decode-ahead"}


def test_the_thread_decodes_no_further_than_ahead_images_rounds_up_to():
    batches = [[2 * b, 2 * b + 1] for b in range(10)]
    rec = Recorder()
    ahead = DecodeAhead(rec, batches, ahead_images=3)  # 3 images: 2 whole batches beyond the one in use
    try:
        assert settle(rec) == 6  # batch 0 (in use) and batches 1, 2
        assert sorted(rec.calls) == list(range(6))
        assert [i for i, _ in ahead.batch(0)] == [0, 1]
        assert [i for i, _ in ahead.batch(1)] == [2, 3]
        assert settle(rec) == 8  # batch 1 in use: up to batch 3
    finally:
        ahead.close()


def test_the_thread_waits_while_paused_and_goes_on_after():
    batches = [[b] for b in range(40)]
    rec = Recorder(delay=0.01)
    ahead = DecodeAhead(rec, batches, ahead_images=20)
    try:
        with ahead.paused():
            before = settle(rec)  # the image it was on, if any, finished
            assert before < 21
            time.sleep(0.3)
            assert rec.count() == before
        assert settle(rec) == 21  # the batch in use and 20 more
    finally:
        ahead.close()


@pytest.mark.parametrize("delay", [0.0, 0.005])
def test_a_decoding_failure_is_raised_where_its_batch_is_wanted(delay):
    batches = [[0, 1], [2, 3], [4, 5], [6, 7]]
    ahead = DecodeAhead(Recorder(delay=delay, fail=5), batches, ahead_images=8)
    try:
        assert [i for i, _ in ahead.batch(0)] == [0, 1]
        assert [i for i, _ in ahead.batch(1)] == [2, 3]  # whole, though decoding ahead may have failed
        with pytest.raises(RuntimeError, match="cannot decode 5"):
            ahead.batch(2)
    finally:
        ahead.close()  # returns: the thread has stopped


def test_the_first_of_two_failures_in_a_batch_is_raised():
    """The thread is still on a failing image of the batch when the consumer fails on a later one."""

    def decode(i):
        if i == 1:
            time.sleep(0.05)
            raise RuntimeError("first")
        if i == 3:
            raise RuntimeError("second")
        return i

    ahead = DecodeAhead(decode, [[0], [1, 2, 3]], ahead_images=4)
    try:
        assert ahead.batch(0) == [0]
        deadline = time.monotonic() + 5
        while ahead.next < 2 and time.monotonic() < deadline:  # the thread has taken image 1
            time.sleep(0.001)
        with pytest.raises(RuntimeError, match="first"):
            ahead.batch(1)  # this thread takes 2 and 3, and fails on 3 first
    finally:
        ahead.close()


def test_closing_early_stops_the_thread():
    ahead = DecodeAhead(Recorder(delay=0.01), [[i] for i in range(100)], ahead_images=50)
    ahead.batch(0)
    ahead.close()
    assert not ahead.thread.is_alive()


@pytest.mark.parametrize("channels_last", [True, False])
def test_threads_give_the_worker_processes_batches_bit_for_bit(jpeg_folder, channels_last):  # noqa: F811
    """Uneven batches over photos, grey, CMYK, PNG and three broken files: the same inputs, ids, errors and
    content hashes from threads (--workers 0) as from a DataLoader worker process (--workers 1)."""
    src, pre = open_dataset(str(jpeg_folder)), Preprocess(PRE)
    ids = list(range(len(src)))
    batches = [ids[:7], ids[7:8], ids[8:19], ids[19:]]
    cpu = torch.device("cpu")
    threads = list(InputBatches(src, pre, cpu, "cpu", 0, channels_last=channels_last)(batches))
    process = list(InputBatches(src, pre, cpu, "cpu", 1, channels_last=channels_last)(batches))
    assert len(threads) == len(process) == 4
    for (x, i, e, d), (x1, i1, e1, d1) in zip(threads, process):
        assert torch.equal(x, x1) and x.stride() == x1.stride() and x.dtype == x1.dtype
        assert i.tolist() == i1.tolist() and e == e1 and d == d1
    assert sum(bool(err) for _, _, errs, _ in threads for err in errs) == 3


def test_computing_pauses_the_threads_only_while_a_batch_is_decoded(jpeg_folder):  # noqa: F811
    src, pre = open_dataset(str(jpeg_folder)), Preprocess(PRE)
    inputs = InputBatches(src, pre, torch.device("cpu"), "cpu", 0)
    with inputs.computing():  # no batches under way: nothing to pause
        pass
    it = inputs([[0, 1], [2, 3]])
    next(it)
    with inputs.computing():
        assert not inputs._ahead.gate.is_set()
    assert inputs._ahead.gate.is_set()
    it.close()
    assert inputs._ahead is None


def test_a_small_cpu_decodes_in_threads_a_larger_one_in_processes(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert input_workers(cpu) == 0 and default_workers(cpu) == 1  # training's DataLoader keeps its worker
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert input_workers(cpu) == default_workers(cpu) == 4
