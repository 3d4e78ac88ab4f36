"""SIGTERM and Ctrl-C -> a flag the training loop polls (save, then exit cleanly).

SIGTERM is a preemption notice; SIGINT is Ctrl-C in a terminal or a notebook's stop button.
Either one makes the loop finish its step, save a checkpoint at it and return "preempted". A
second SIGINT while that is under way aborts at once (KeyboardInterrupt, nothing more saved).

With several processes the loop does not act on its own flag: each process feeds its flag into
the train step (multihost.stop_flags) and all of them stop at the step whose metrics show that
any one was signalled, so a signal on one host saves and exits on all.
"""

from __future__ import annotations

import signal
import sys


class Preemption:
    """Turns SIGTERM and SIGINT into a flag the loop polls (installed in the main thread only);
    a second SIGINT raises KeyboardInterrupt."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested, self._old, self._interrupts = False, {}, 0

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                break
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt("second Ctrl-C: aborted without saving")
            print(
                "\nCtrl-C: saving a checkpoint at the end of this step, then stopping "
                "(Ctrl-C again aborts without saving)",
                file=sys.stderr,
                flush=True,
            )
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
