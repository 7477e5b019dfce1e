"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (what cluster schedulers send first).

The trainer runs its loop inside ``GracefulStop``: a signal only marks the request, the loop
finishes the step under way, writes a checkpoint and returns, and the CLI prints the command that
resumes.  A second signal raises ``KeyboardInterrupt`` at once, for a user who will not wait.
"""

import signal
import threading


class GracefulStop:
    """While active (``with``), SIGINT and SIGTERM only set ``requested`` (the signal's name): the
    loop finishes its step, checkpoints and returns.  A second signal raises KeyboardInterrupt at
    once.  Outside the main thread (signals can't be caught there) it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested, self._previous = None, {}

    def _handle(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.requested = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        return False
