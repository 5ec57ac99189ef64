"""Starting a script and ending it well: the errors a user can cause, the command line and its flag types,
signals, the device and the speed settings, and joining torchrun's process group.

`cli(main, parse_args)` is what every script's `__main__` calls: a UserError becomes one line on stderr and
exit status 2, SIGINT or SIGTERM one line saying how to continue and status 128 + the signal number.
"""
import argparse
import contextlib
import gc
import math
import os
import shlex
import signal
import sys
from dataclasses import dataclass

import torch

import distributed
from distributed import SINGLE

AUGMENTATIONS = ('batched', 'pil')


class UserError(Exception):
    """A problem the user can fix (a flag, a file, the data): reported as one line, no traceback."""


class JobError(UserError):
    """A UserError that every process of a torchrun job meets alike: rank 0 reports it for the job, the
    others exit quietly."""


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


def on_main(fn, world):
    """fn() computed by rank 0 alone and handed to every process (a UserError it raises, too).

    For what must be decided once for the whole job: reading a checkpoint or the data, the results folder.
    """
    if not world.distributed:
        return fn()
    outcome = None
    if world.main:
        try:
            outcome = ('ok', fn())
        except UserError as e:
            outcome = ('error', str(e))
    status, value = distributed.broadcast(outcome, world)
    if status == 'error':
        raise JobError(value)
    return value


def printer(world):
    """print on rank 0; nothing on the other processes of a torchrun job."""
    return print if world.main else (lambda *a, **kw: None)


# ----------------------------------------------------------------------------- command line

class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag on a single line instead of the whole usage block."""

    def __init__(self, *a, **kw):
        kw.setdefault('formatter_class', argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*a, **kw)

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def _number(convert, accept, requirement, noun):
    """An argparse type: convert the text, then check it (finite floats only)."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not {noun}') from None
        if not (accept(value) and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f'must be {requirement}, got {text}')
        return value
    return parse


positive_int = _number(int, lambda v: v > 0, 'a positive integer', 'an integer')
fraction = _number(float, lambda v: 0 <= v < 1, 'at least 0 and under 1', 'a number')
non_negative_int = _number(int, lambda v: v >= 0, 'zero or more', 'an integer')
positive_float = _number(float, lambda v: v > 0, 'a positive number', 'a number')
non_negative_float = _number(float, lambda v: v >= 0, 'zero or a positive number', 'a number')


def number_list(item):
    """An argparse type: one value, or several separated by commas, each checked by `item`; a list."""
    def parse(text):
        values = [item(part) for part in text.split(',')]
        if len(set(values)) < len(values):
            raise argparse.ArgumentTypeError(f'{text!r} names a value twice')
        return values
    return parse


def or_auto(item):
    """An argparse type: 'auto', or what `item` accepts."""
    return lambda text: 'auto' if text == 'auto' else item(text)


def available_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_count(num_workers, world):
    """--num_workers, or by default the CPUs this process may use shared among this node's processes."""
    return num_workers if num_workers is not None else max(1, available_cpus() // world.local_world_size)


def add_run_flags(p, state, datasets, batch_size, epochs, dataset, data_root, helps):
    """The flags both scripts share, with each script's defaults: the batch, the epochs, SGD momentum, the
    data and where results go, workers, device, seed, the speed settings and --resume. `helps` holds the
    script's own help texts for 'dataset', 'data_root' and 'name'."""
    p.add_argument('--batch_size', type=positive_int, default=batch_size,
                   help='images per step; under torchrun the global batch, shared out')
    p.add_argument('--epochs', type=positive_int, default=epochs, help='passes over the training set')
    p.add_argument('--momentum', type=non_negative_float, default=0.9, help='SGD momentum')
    p.add_argument('--dataset', default=dataset, choices=datasets, help=helps['dataset'])
    p.add_argument('--data_root', default=data_root, help=helps['data_root'])
    p.add_argument('--results_dir', default='results', help='where the CSV logs, checkpoints and plots go')
    p.add_argument('--name', default=None, help=helps['name'])
    p.add_argument('--save_every', type=positive_int, default=50,
                   help='write the model file every N epochs, and always after the last and at an interrupt '
                        '(the state, which holds the weights too, is written after every epoch)')
    p.add_argument('--num_workers', type=non_negative_int, default=None,
                   help='DataLoader worker processes of the pil path (default: the CPUs this process may '
                        'use, shared among the processes torchrun starts on this node)')
    p.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    p.add_argument('--seed', type=non_negative_int, default=0, help='random seed')
    p.add_argument('--aug', default='auto', choices=('auto',) + AUGMENTATIONS,
                   help="'batched': augment whole batches on the device; 'pil': per-image PIL transforms in "
                        "DataLoader workers (the reference path); auto = batched (the faster on both CPU and GPU)")
    p.add_argument('--amp', default='auto', choices=('auto', 'on', 'off'),
                   help='bf16 autocast for the forward pass; auto = on for CUDA, off on a CPU')
    p.add_argument('--channels_last', default='auto', choices=('auto', 'on', 'off'),
                   help='NHWC memory layout for the convolutions; auto = on for CUDA (the layout of '
                        "cuDNN's bf16 kernels), off on a CPU (-3%% to +11%% over four runs here: no steady gain)")
    p.add_argument('--compile', action='store_true', help='wrap the model in torch.compile')
    p.add_argument('--resume', default=None,
                   help=f"continue from a training state: its path, or 'auto' for {state} in --results_dir "
                        f"if there is one")


def resume_command(argv, world=SINGLE):
    """The command line that continues an interrupted run: the same one with --resume auto."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == '--resume' and i + 1 < len(argv):
            argv[i + 1] = 'auto'
            break
        if arg.startswith('--resume='):
            argv[i] = '--resume=auto'
            break
    else:
        argv += ['--resume', 'auto']
    if not world.distributed:
        return shlex.join(['python'] + argv)
    if world.world_size == world.local_world_size:
        return shlex.join(['torchrun', f'--nproc_per_node={world.world_size}'] + argv)
    return 'torchrun <the same launcher flags> ' + shlex.join(argv)


def cli(main, parse_args):
    """Run a script as a command: a UserError becomes one line on stderr and exit status 2; SIGINT or
    SIGTERM ends the run with one line saying how to resume and status 128 + signal number. Under torchrun
    the lines name the rank, and what every rank meets alike is said by rank 0 alone."""
    args = parse_args()
    prog = os.path.basename(sys.argv[0])
    try:
        world = distributed.world_from_env(os.environ)
    except ValueError:
        world = SINGLE  # main() reports it
    where = f' (rank {world.rank} of {world.world_size})' if world.distributed else ''
    try:
        with signals_raise():
            main(args)
    except BaseException as e:  # noqa: B902 (what is not the user's to fix is raised again)
        return _report(e, prog, world, where)
    finally:
        # a DataLoader iterator a traceback held in a cycle goes now: its workers ignore SIGTERM and exit waits
        gc.collect()
    return 0


def _report(e, prog, world, where):
    """Print the one line of an exception that ended a script and return the exit status; anything that is
    not the user's to fix is raised again."""
    if isinstance(e, _Signal) and e.__context__ is not None and not isinstance(e.__context__, _Signal):
        return _report(e.__context__, prog, world, where)  # a signal while an error was being cleaned up
    if isinstance(e, Interrupted):
        return _say(f'{prog}: interrupted by {e}; {e.saved}; continue with: {resume_command(sys.argv, world)}',
                    128 + e.signum, world.main)
    if isinstance(e, _Signal):
        return _say(f'{prog}: interrupted by {signal.Signals(e.signum).name} before training started',
                    128 + e.signum, world.main)
    if isinstance(e, JobError):  # every process met it alike: rank 0 says it for the job
        return _say(f'{prog}: error: {e}', 2, world.main)
    if isinstance(e, UserError):
        return _say(f'{prog}{where}: error: {e}', 2, True)
    if isinstance(e, RuntimeError) and world.distributed and _lost_peer(e):  # DistError, Gloo's errors
        return _say(f'{prog}{where}: error: lost contact with another process of the job, which has probably '
                    f'failed (its own message says why): {str(e).splitlines()[0][:200]}', 1, True)
    raise e


def _say(line, status, show):
    if show:
        print(line, file=sys.stderr)
    return status


def _lost_peer(error):
    text = str(error).lower()
    return isinstance(error, torch.distributed.DistError) or any(
        word in text for word in ('connection closed', 'connection reset', 'broken pipe', 'timed out', 'gloo',
                                  'nccl'))


# ----------------------------------------------------------------------------- signals

class _Signal(BaseException):
    """Raised by the signal handler; a BaseException so that no `except Exception` swallows it."""

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
    raise _Signal(signum)


def signals_raise():
    """Turn SIGINT and SIGTERM into a _Signal exception in the main thread while the block runs."""
    return _handling(_raise_signal)


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM back while the block runs (so a set of files is written as a whole), then
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


def signals_ignored():
    """SIGINT and SIGTERM have no effect while the block runs (waiting for the last save on the way out)."""
    return _handling(lambda signum, frame: None)


def ignore_signals_in_worker(worker_id):
    """DataLoader worker_init_fn: the main process alone handles SIGINT and SIGTERM and stops the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def interruption(error, saved):
    """Interrupted(signum, saved()) when `error` is what SIGINT or SIGTERM raised (`saved` says what is on disk
    to continue from), else None."""
    return Interrupted(error.signum, saved()) if isinstance(error, _Signal) else None


# ----------------------------------------------------------------------------- device and speed

@dataclass
class Speed:
    """How the training step runs; decided once from the flags and the device, then used everywhere."""
    device: torch.device
    aug: str
    amp: bool
    channels_last: bool
    compile: bool

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def layout(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def prepare(self, model, parallel=lambda m: m):
        """The module to train: the same parameters, in the chosen layout, wrapped by `parallel` (for
        DistributedDataParallel), compiled if asked."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        model = parallel(model)
        return torch.compile(model) if self.compile else model

    def wrap(self, fn):
        """fn under the same autocast and layout (for the kNN monitor's embedding pass)."""
        def run(x):
            with self.autocast():
                return fn(self.layout(x))
        return run

    def __str__(self):
        return (f'aug {self.aug}, amp {"bf16" if self.amp else "off"}, channels_last '
                f'{"on" if self.channels_last else "off"}, compile {"on" if self.compile else "off"}')


def resolve_speed(device, aug='auto', amp='auto', channels_last='auto', compile=False):
    """The Speed the flags ask for on `device`: 'auto' picks batched augmentation, and bf16 autocast and
    channels_last on CUDA only (bf16 is slower by an order of magnitude on CPUs without AVX-512 BF16 or AMX)."""
    cuda = device.type == 'cuda'
    pick = lambda value, auto: auto if value == 'auto' else value == 'on'
    return Speed(device, 'batched' if aug == 'auto' else aug, pick(amp, cuda), pick(channels_last, cuda), compile)


def resolve_device(name):
    """'auto' -> cuda when available, else cpu. Asking for CUDA where there is none is a UserError."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f'--device {name!r} is not a device; use auto, cpu, cuda or cuda:N') from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UserError(f'--device {name}: CUDA is not available on this machine (use --device cpu)')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f'--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)')
    elif device.type != 'cpu':
        raise UserError(f'--device {name!r} is not supported; use auto, cpu, cuda or cuda:N')
    return device


@contextlib.contextmanager
def processes(device_flag, environ):
    """(world, device) of this process for the duration of the block.

    Without torchrun: (SINGLE, the --device). Under torchrun (WORLD_SIZE etc. in `environ`): joins the
    process group (NCCL on CUDA, Gloo on CPU) and, on CUDA, uses the GPU of this process's LOCAL_RANK.
    """
    try:
        world = distributed.world_from_env(environ)
    except ValueError as e:
        raise UserError(str(e)) from None
    device = resolve_device(device_flag)
    if world.distributed and device.type == 'cuda':
        if device.index is not None:
            raise UserError(f'--device {device_flag}: under torchrun each process uses the GPU of its '
                            f'LOCAL_RANK; use --device cuda or auto')
        if world.local_rank >= torch.cuda.device_count():
            raise UserError(f'LOCAL_RANK {world.local_rank}, but this machine has {torch.cuda.device_count()} '
                            f'CUDA device(s): start at most that many processes per node')
        device = torch.device('cuda', world.local_rank)
    if device.type == 'cuda' and device.index is not None:
        torch.cuda.set_device(device)  # the current device: where the writer's event waits on the copies
    distributed.init(world, device)
    try:
        yield world, device
    finally:
        distributed.close(world)
