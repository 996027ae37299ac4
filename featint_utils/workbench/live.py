"""Live progress of a run in the terminal while papermill executes a stage's notebook in a kernel.

The stage's own progress bars run inside the kernel and are saved in the notebook; papermill hands their text
(the kernel's stderr) to :class:`StageProgress` as it arrives. The terminal shows one line per stage that is
redrawn every second on a terminal (every minute in a log file): stage i/N, elapsed time against the last
successful run of the stage, a bar of that estimate, and the stage's current inner bar in short, e.g.

``[3/7] 02_nfm  2:31 / ~4:00  [######------]  fit, lr 0.003 12/40 epoch``
"""

from __future__ import annotations

import re
import sys
import threading
import time

# tqdm's "desc:  50%|#####     | 2/4 [00:10<00:10, 3.20size/s]" (or "31.2s/size" when an item takes over a second)
_INNER_BAR = re.compile(
    r"^(?P<desc>.*?):\s*\d+%\|[^|]*\|\s*(?P<count>\S+/\S+)"
    r"(?:.*?[\d.?]+(?:s/(?P<slow_unit>[A-Za-z_]+)|(?P<unit>[A-Za-z_]+)/s))?"
)


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else (f"{seconds // 60}:{seconds % 60:02d}")
    )


def inner_status(text: str) -> str | None:
    """The newest progress-bar state in a chunk of a kernel's stderr, shortened (``desc n/total unit``)."""
    segments = [s.strip() for s in re.split(r"[\r\n]", text) if s.strip()]
    if not segments:
        return None
    latest = segments[-1]
    match = _INNER_BAR.match(latest)
    if match is None:
        return latest[:70]
    unit = match["unit"] or match["slow_unit"]
    unit = f" {unit}" if unit else ""
    return f"{match['desc'].strip()} {match['count']}{unit}"[:70]


class StageProgress:
    """The terminal line of one stage; also the file-like target papermill writes the kernel's stderr to."""

    def __init__(self, index: int, total: int, stage: str, expected_seconds: float | None, stream=None, interval=None):
        self.index, self.total, self.stage, self.expected = index, total, stage, expected_seconds
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = interval if interval is not None else (1.0 if self.tty else 60.0)
        self.status = ""
        self.started = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # papermill's stderr_file interface
    def write(self, text: str) -> int:
        status = inner_status(text)
        if status:
            self.status = status
        return len(text)

    def flush(self) -> None:
        pass

    @property
    def prefix(self) -> str:
        return f"[{self.index}/{self.total}] {self.stage}"

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        if self.expected:
            fraction = min(elapsed / self.expected, 1.0)
            filled = int(round(12 * fraction))
            timing = f"{clock(elapsed)} / ~{clock(self.expected)}  [{'#' * filled}{'-' * (12 - filled)}]"
            if elapsed > self.expected:
                timing += " (longer than last time)"
        else:
            timing = f"{clock(elapsed)} (first run: no estimate)"
        return f"{self.prefix}  {timing}  {self.status}".rstrip()

    def _draw(self) -> None:
        with self._lock:
            if self.tty:
                self.stream.write("\r\x1b[K" + self.line())
            else:
                self.stream.write(self.line() + "\n")
            self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self._draw()

    def __enter__(self) -> StageProgress:
        self.started = time.perf_counter()
        self._draw()
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.tty:
            with self._lock:
                self.stream.write("\r\x1b[K")
                self.stream.flush()

    def finished(self, seconds: float, summary: str = "", ok: bool = True) -> str:
        """The stage's one-line summary (written to the stream and returned)."""
        last = f" (last time {clock(self.expected)})" if self.expected else ""
        verdict = f"done in {clock(seconds)}{last}" if ok else f"FAILED after {clock(seconds)}"
        text = f"{self.prefix}  {verdict}" + (f" · {summary}" if summary else "")
        with self._lock:
            self.stream.write(text + "\n")
            self.stream.flush()
        return text
