"""The command line: the parser and its flag types, the flags both scripts share, and `cli()`, which runs a
script and turns what ends it (a user's error, a signal) into one line and an exit status.

`cli(main, parse_args)` is what every script's `__main__` calls: a UserError becomes one line on stderr and
exit status 2, SIGINT or SIGTERM one line saying how to continue and status 128 + the signal number.
"""
import argparse
import gc
import math
import os
import shlex
import signal
import sys

import torch

import distributed
import signals
from distributed import SINGLE
from errors import Interrupted, JobError, UserError
from speed import AUGMENTATIONS


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


def add_run_flags(p, state, datasets, batch_size, epochs, dataset, data_root, helps):
    """The flags both scripts share, with each script's defaults (None: its --recipe's): the batch, the
    epochs, the momentum, the data and where results go, workers, device, seed, the speed settings and
    --resume. `helps` holds the script's own help texts for 'dataset', 'data_root' and 'name' (and, if it
    has them, 'batch_size' and 'epochs')."""
    p.add_argument('--batch_size', type=positive_int, default=batch_size,
                   help=helps.get('batch_size', 'images per step; under torchrun the global batch, shared out'))
    p.add_argument('--epochs', type=positive_int, default=epochs,
                   help=helps.get('epochs', 'passes over the training set'))
    p.add_argument('--momentum', type=non_negative_float, default=None, help='SGD momentum (recipe: 0.9)')
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
                   help="'batched': the dataset held on the device, whole batches augmented there; 'pil': per-image "
                        "PIL transforms in DataLoader workers (the reference path); 'stream': an image folder's "
                        "files read batch by batch (decoded on the GPU where there is one), cropped in each image's "
                        "geometry and augmented on the device, for datasets that do not fit in memory; auto = batched "
                        "when the dataset fits in 80%% of the memory available, else stream")
    p.add_argument('--amp', default='auto', choices=('auto', 'on', 'off'),
                   help='bf16 autocast for the forward pass; auto = on for CUDA and for a CPU with AMX or '
                        'AVX512-BF16 (about 2x faster there), off on other CPUs (bf16 emulated, 22x slower)')
    p.add_argument('--channels_last', default='auto', choices=('auto', 'on', 'off'),
                   help='NHWC memory layout for the convolutions; auto = on where --amp auto picks bf16 (the '
                        "layout of cuDNN's and oneDNN's bf16 kernels), off on other CPUs")
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
        with signals.raised():
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
    if isinstance(e, signals.Signal) and e.__context__ is not None and not isinstance(e.__context__, signals.Signal):
        return _report(e.__context__, prog, world, where)  # a signal while an error was being cleaned up
    if isinstance(e, Interrupted):
        return _say(f'{prog}: interrupted by {e}; {e.saved}; continue with: {resume_command(sys.argv, world)}',
                    128 + e.signum, world.main)
    if isinstance(e, signals.Signal):
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
