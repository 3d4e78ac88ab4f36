"""SIGTERM -> a flag the training loop polls (a preemption notice: save, then exit cleanly).

With several processes the loop does not act on its own flag: each process feeds its flag into
the train step (multihost.stop_flags) and all of them stop at the step whose metrics show that
any one was signalled, so a signal on one host saves and exits on all.
"""

from __future__ import annotations

import signal


class Preemption:
    """Turns SIGTERM into a flag the loop polls (installed in the main thread only)."""

    def __init__(self):
        self.requested, self._old = False, None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
