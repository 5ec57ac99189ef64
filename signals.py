"""SIGINT and SIGTERM during a run: raised as an exception, held back while a set of files is handed over,
ignored on the way out and in DataLoader workers."""
import contextlib
import os
import signal

from errors import Interrupted


class Signal(BaseException):
    """Raised by the handler of signals_raise; a BaseException so that no `except Exception` swallows it."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _handling(handler):
    """`handler` for SIGINT and SIGTERM while the block runs; yields the handlers it replaced."""
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield previous
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _raise_signal(signum, frame):
    raise Signal(signum)


def raised():
    """Turn SIGINT and SIGTERM into a Signal exception in the main thread while the block runs."""
    return _handling(_raise_signal)


@contextlib.contextmanager
def deferred():
    """Hold SIGINT and SIGTERM back while the block runs (so a set of files is handed over as a whole), then
    act on the first one that came as the handler before the block would have.

    The handlers, not the signal mask, do the holding: a process-wide signal may be delivered to any
    thread (Gloo's, the DataLoader's), and Python runs its handler in the main thread all the same, even
    inside a file write that torch.save makes.
    """
    held = []
    with _handling(lambda signum, frame: held.append(signum)) as previous:
        yield
    if held:
        handler = previous[held[0]]
        if callable(handler):
            handler(held[0], None)
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), held[0])


def ignored():
    """SIGINT and SIGTERM have no effect while the block runs (waiting for the last save on the way out)."""
    return _handling(lambda signum, frame: None)


def ignore_in_worker(worker_id):
    """DataLoader worker_init_fn: the main process alone handles SIGINT and SIGTERM and stops the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def interruption(error, saved):
    """Interrupted(signum, saved()) when `error` is what SIGINT or SIGTERM raised (`saved` says what is on disk
    to continue from), else None."""
    return Interrupted(error.signum, saved()) if isinstance(error, Signal) else None
