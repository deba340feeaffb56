"""Progress of a long surgery: which step it is in, said every so often while a step takes long.

Tracing and grouping a large model's channels can take a while on a CPU; a prune that runs for minutes in
silence looks hung. :class:`Progress` logs (``logging``, warning level) the step running and the time spent,
every ``every`` seconds, from a timer thread that ends with the block.
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType

__all__ = ["Progress"]

log = logging.getLogger("lightning_worm.surgery")


class Progress:
    """Say which step of ``what`` is running once it has taken ``every`` seconds, and again every ``every``.

    Example::

        with Progress("prune_channels") as progress:
            progress.step("tracing the dependency graph")
            ...
            progress.step("grouping the coupled channels")
    """

    def __init__(self, what: str, every: float = 30.0) -> None:
        self.what = what
        self.every = every
        self.current = "starting"
        self.messages: list[str] = []
        self._start = self._step_start = 0.0
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def step(self, name: str) -> None:
        """The step running from now on."""
        self.current = name
        self._step_start = time.perf_counter()

    def _watch(self) -> None:
        while not self._done.wait(self.every):
            now = time.perf_counter()
            message = (f"{self.what}: still {self.current} ({now - self._step_start:.0f} s in this step, "
                       f"{now - self._start:.0f} s in all)")
            self.messages.append(message)
            log.warning(message)

    def __enter__(self) -> Progress:
        self._start = self._step_start = time.perf_counter()
        self._thread = threading.Thread(target=self._watch, name=f"lightning-worm {self.what}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
