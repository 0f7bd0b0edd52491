"""Progress for long work: a bar with rate and ETA on a terminal, plain log lines otherwise."""
from __future__ import annotations

import sys
import time


class Progress:
    """`with Progress(total, "build", unit="images") as p: p.update(n)`"""

    def __init__(self, total: int, desc: str, unit: str = "images", enabled: bool | None = None,
                 initial: int = 0, every_s: float = 5.0, stream=None):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.enabled = True if enabled is None else enabled
        self.done, self.start_done = initial, initial
        self.t0 = self.last = time.perf_counter()
        self.every_s = every_s
        self.bar = None
        if self.enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit[:-1] if unit.endswith("s") else unit,
                            file=self.stream, dynamic_ncols=True, smoothing=0.1)

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return (self.done - self.start_done) / dt if dt > 0 else 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and (time.perf_counter() - self.last >= self.every_s or self.done >= self.total):
            self.last = time.perf_counter()
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def line(self) -> str:
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_s = f"{int(eta // 60)}m{int(eta % 60):02d}s" if eta == eta else "?"
        return f"{self.desc}: {self.done}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s, ETA {eta_s}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


STEPS = 8  # batches a reported run is cut into at least, so that progress moves while it runs


def reported_batch(batch: int, n: int, progress: "Progress | None") -> int:
    """A batch size no larger than a STEPS-th of the work while progress is shown: one batch of
    everything (what the memory budget often allows on a CPU) would report only when it is done."""
    if progress is None or not progress.enabled:
        return batch
    return max(1, min(batch, -(-n // STEPS)))
