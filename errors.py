"""The errors a user can cause, and the ones that end a run: importable by any module, with no command line.

A `UserError` ends a script with one line on stderr and exit status 2 (`cli.cli`); anything else is a bug
and keeps its traceback.
"""
import signal


class UserError(Exception):
    """A problem the user can fix (a flag, a file, the data): reported as one line, no traceback."""


class JobError(UserError):
    """A UserError that every process of a torchrun job meets alike: rank 0 reports it for the job, the
    others exit quietly."""


class DataError(UserError):
    """A problem with the data met during a run (an image file that cannot be read): its line says what
    the run keeps."""


class NonFiniteLoss(Exception):
    """A loss that is not finite: of a training step, or (step None) of the evaluation after an epoch."""

    def __init__(self, epoch, step, value, what=''):
        super().__init__(f'the loss became {value} at epoch {epoch}, step {step}' if step is not None else
                         f'the {what} loss became {value} after epoch {epoch}')


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; `saved` says what is on disk to continue from."""

    def __init__(self, signum, saved):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.saved = saved


def first_non_finite(losses, epoch, last_step):
    """Raise NonFiniteLoss for the first non-finite value of `losses` (a CPU tensor, one per step, the last
    being step `last_step` of `epoch`)."""
    bad = (~losses.isfinite()).nonzero()
    if len(bad):
        first = int(bad[0])
        raise NonFiniteLoss(epoch, last_step - len(losses) + first + 1, losses[first].item())
