"""Decoding ahead in a thread, only while the model is idle.

On a CPU whose cores the forward pass already fills (two, here), a decoding worker process beside it does
not overlap anything: it takes a core from one of the forward pass's threads mid-layer, and the other
waits for it at the end of every parallel region, so each second of decoding costs the forward pass
about that much again. Decoding in this process instead, while the model waits, costs only the
decoding, spread over every core; and a thread decoding ahead while the main process does its own
single-threaded work (writing a chunk, merging, cutting switches) fills a core that would idle. The
consumer closes the gate around the model's work on each batch (`DecodeAhead.paused`).

PIL decodes and resizes outside the GIL, so the threads run side by side.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
from typing import Any, Callable, Sequence


class DecodeAhead:
    """`decode(image_id)` for every image of `batches`, in order: a thread decodes ahead, at most
    `ahead_images` (rounded up to whole batches) beyond the batch in use, while the gate is open; `batch(b)`
    returns batch b's results, the calling thread decoding what is still missing beside that thread."""

    def __init__(self, decode: Callable[[int], Any], batches: Sequence[Sequence[int]], ahead_images: int = 256):
        self.decode = decode
        self.ids = [i for ids in batches for i in ids]
        self.ends = list(itertools.accumulate(len(ids) for ids in batches))
        self.starts = [e - len(ids) for e, ids in zip(self.ends, batches)]
        size = max((len(ids) for ids in batches), default=1) or 1
        self.ahead = max(1, -(-ahead_images // size))  # whole batches
        self.out: dict[int, Any] = {}
        self.next = 0  # the next position in self.ids to decode
        self.using = 0  # the batch the consumer is on
        self.error: BaseException | None = None
        self.error_at = 0  # the position whose decoding failed: the batches before it are still whole
        self.stopped = False
        self.cond = threading.Condition()
        self.gate = threading.Event()
        self.gate.set()
        self.thread = threading.Thread(target=self._run, name="atlas-decode-ahead", daemon=True)
        self.thread.start()

    @contextlib.contextmanager
    def paused(self):
        """Around the model's work: the thread finishes the image it is on and waits."""
        self.gate.clear()
        try:
            yield
        finally:
            self.gate.set()

    def batch(self, b: int) -> list[Any]:
        lo, hi = self.starts[b], self.ends[b]
        with self.cond:
            self.using = b
            self.cond.notify_all()
        while (pos := self._claim(hi)) is not None and self._decode(pos):
            pass
        with self.cond:
            # a failure in this batch (or none to place, -1) is raised once every image before it has
            # come back, so that the first failure is the one raised
            self.cond.wait_for(lambda: all(p in self.out for p in range(lo, hi))
                               or (self.error is not None and self.error_at < hi
                                   and all(p in self.out for p in range(lo, max(lo, self.error_at)))))
            if not all(p in self.out for p in range(lo, hi)):
                raise self.error
            return [self.out.pop(p) for p in range(lo, hi)]

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.gate.set()
        self.thread.join()

    def _limit(self) -> int:
        return self.ends[min(len(self.ends) - 1, self.using + self.ahead)] if self.ends else 0

    def _claim(self, limit: int) -> int | None:
        with self.cond:
            if self.stopped or self.error is not None or self.next >= limit:
                return None
            self.next += 1
            return self.next - 1

    def _decode(self, pos: int) -> bool:
        try:
            item = self.decode(self.ids[pos])
        except BaseException as e:  # decode records a file's own faults; anything else stops the build
            self._fail(e, pos)
            return False
        with self.cond:
            self.out[pos] = item
            self.cond.notify_all()
        return True

    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: self.stopped or self.error is not None
                                       or self.next >= len(self.ids) or self.next < self._limit())
                self.gate.wait()
                pos = self._claim(self._limit())
                if pos is None:
                    with self.cond:
                        if self.stopped or self.error is not None or self.next >= len(self.ids):
                            return
                    continue
                if not self._decode(pos):
                    return
        except BaseException as e:  # noqa: BLE001 - recorded for the consumer, which raises it
            self._fail(e, -1)

    def _fail(self, e: BaseException, pos: int) -> None:
        with self.cond:
            if self.error is None or pos < self.error_at:
                self.error, self.error_at = e, pos
            self.cond.notify_all()
