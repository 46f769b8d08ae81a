"""Peak resident memory of a block of code, shared by every CPU benchmark.

Baseline = ``VmRSS`` right after ``gc.collect()`` on entry. Peak = the kernel's high-water mark ``VmHWM`` after
resetting it through ``/proc/self/clear_refs``; the reset is verified (a failed one leaves ``VmHWM`` above
``VmRSS``), and where it fails a thread samples ``VmRSS`` every 2 ms instead. ``method`` says which was used.

    with PeakRss() as peak:
        run()
    peak.extra_bytes, peak.method
"""

from __future__ import annotations

import gc
import re
import threading
from pathlib import Path

_SAMPLE_SECONDS = 0.002
_RESET_SLACK_KIB = 1024


def status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...)."""
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} field")
    return int(match.group(1))


class PeakRss:
    """Peak RSS over the baseline taken on entry (see the module docstring for the method)."""

    def __enter__(self) -> PeakRss:
        gc.collect()
        self.sampler: threading.Thread | None = None
        self.base_kib = status_kib("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            reset = status_kib("VmHWM") <= status_kib("VmRSS") + _RESET_SLACK_KIB
        except OSError:
            reset = False
        self.method = "VmHWM reset via /proc/self/clear_refs"
        if not reset:
            self.method = f"VmRSS sampled every {_SAMPLE_SECONDS * 1000:g} ms"
            self.peak_kib = self.base_kib
            self.done = threading.Event()
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(_SAMPLE_SECONDS):
            self.peak_kib = max(self.peak_kib, status_kib("VmRSS"))

    def __exit__(self, *exc: object) -> None:
        if self.sampler is not None:
            self.done.set()
            self.sampler.join()
            self.peak_kib = max(self.peak_kib, status_kib("VmRSS"))
        else:
            self.peak_kib = status_kib("VmHWM")
        self.end_kib = status_kib("VmRSS")

    @property
    def extra_bytes(self) -> int:
        return (self.peak_kib - self.base_kib) * 1024
