"""The life of a run, shared by both scripts: its output paths, refusing or restoring a saved state, the
random-number states, the record of what ran, and the one loop over epochs (the saved set per epoch with
signals held back, the interrupt line, the non-finite stop, the plot refresh and the final line).

A script says what one epoch trains and what its files hold; `Run` does the rest the same way for both.
"""
import contextlib
import json
import math
import os
import sys
import time

import pandas as pd
import torch

import files
import launch
import plot
import utils
from launch import JobError, UserError

# Arguments that may change when a run is resumed: they do not change what the run computes.
HARMLESS = frozenset({'num_workers', 'device', 'resume', 'data_root', 'results_dir', 'compile', 'save_every'})


def cosine_lr(init_lr, epoch, epochs):
    """lr for 0-based `epoch`: init_lr * (1 + cos(pi * epoch / epochs)) / 2 (paper Sec. 4, SGDR)."""
    return init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def scaled_lr(base_lr, batch_size):
    """The lr of SGD: base_lr x batch_size / 256 (the paper's rule, Sec. 4), batch_size the global batch; one
    that float32 weights cannot be stepped with is refused."""
    lr = base_lr * batch_size / 256
    if lr > torch.finfo(torch.float32).max:
        raise JobError(f'--lr {base_lr:g} gives SGD an lr of {lr:.3g} (x batch_size {batch_size} / 256), beyond '
                       f'float32 ({torch.finfo(torch.float32).max:.3g}); use a smaller --lr')
    return lr


def first_non_finite(losses, epoch, last_step):
    """Raise NonFiniteLoss for the first non-finite value of `losses` (CPU, one per step, the last being
    step `last_step` of `epoch`)."""
    bad = (~losses.isfinite()).nonzero()
    if len(bad):
        first = int(bad[0])
        raise launch.NonFiniteLoss(epoch, last_step - len(losses) + first + 1, losses[first].item())


# ----------------------------------------------------------------------------- random-number states

def rng_state():
    """Every global random-number state: torch CPU and, where initialised, each CUDA device."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {'cpu': torch.get_rng_state(), 'cuda': cuda}


def set_rng_state(state):
    torch.set_rng_state(state['cpu'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'][:torch.cuda.device_count()])


# ----------------------------------------------------------------------------- resuming

def run_differences(saved, current, harmless=HARMLESS):
    """Arguments whose values differ between a saved run and this one, ignoring the harmless ones."""
    return [f'--{k} {saved[k]} (now {current[k]})' for k in sorted(saved)
            if k in current and k not in harmless and saved[k] != current[k]]


def find_state(resume, state_path, kind, script, settings):
    """The training state to continue, as --resume asks, or None to start afresh.

    resume None: start afresh, but never over an existing run's state (that would lose it).
    'auto': continue from state_path if it exists. Anything else: the path of a state to continue from.
    A state whose run differs from `settings` (this run's arguments) in more than the HARMLESS ones is refused.
    """
    if resume is None:
        if os.path.exists(state_path):
            name = os.path.basename(state_path)[:-len('_state.pth')]
            raise UserError(f'{state_path!r} already holds the state of a run named {name!r}; continue it '
                            f'with --resume auto, or pick another --name or --results_dir')
        return None
    if resume == 'auto':
        if not os.path.exists(state_path):
            print(f'--resume auto: no {state_path}, starting afresh', flush=True)
            return None
        resume = state_path
    state = files.load_checkpoint(resume, (kind,), '--resume')
    missing = [k for k in ('args', 'epoch', 'rows', 'rng') if k not in state]
    if missing:
        raise UserError(f'--resume {resume!r} lacks {", ".join(missing)}: not a state written by {script}')
    changed = run_differences(state['args'], settings)
    if changed:
        raise UserError(f'--resume: these arguments differ from the saved run: {"; ".join(changed)}')
    return state


# ----------------------------------------------------------------------------- run records

def run_record(settings, device, extra):
    """What a run was: every argument, the library versions, the device and the code's git commit."""
    import platform
    import subprocess
    import torchvision
    versions = {'python': platform.python_version(), 'torch': torch.__version__,
                'torchvision': torchvision.__version__}
    for module in ('numpy', 'pandas', 'thop', 'tqdm', 'matplotlib', 'PIL'):
        try:
            versions[module] = getattr(__import__(module), '__version__', 'unknown')
        except ImportError:
            versions[module] = None
    if device.type == 'cuda':
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            with open('/proc/cpuinfo') as f:
                names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
            device_name = f'{names[0]} ({launch.available_cpus()} CPUs available)' if names else device_name
    here = os.path.dirname(os.path.abspath(__file__))
    commit = dirty = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = lambda *a: subprocess.run(['git', '-C', here, *a], capture_output=True, text=True, timeout=10)
        head = git('rev-parse', 'HEAD')
        if head.returncode == 0:
            commit = head.stdout.strip()
            dirty = bool(git('status', '--porcelain', '--untracked-files=no').stdout.strip())
    return {'args': settings, **extra, 'device': str(device), 'device_name': device_name,
            'versions': versions, 'git_commit': commit, 'git_dirty': dirty,
            'command': ' '.join(sys.argv)}


# ----------------------------------------------------------------------------- the run

def check_divisible(batch_size, world):
    """--batch_size is the global batch: each of the W processes takes batch_size / W per step."""
    if batch_size % world.world_size:
        raise JobError(f'--batch_size {batch_size} does not split evenly over {world.world_size} processes; '
                       f'use a multiple of {world.world_size}')


class Run:
    """One run of a script under one name.

    script: 'main.py' or 'linear.py'; settings: the run's arguments as a dict (saved in every file);
    outputs: {key: file-name suffix}, with at least 'csv', 'model', 'state', 'plot' and 'record';
    state_kind: the 'kind' of its state file; columns: the CSV's columns (with 'save_time' among them).

    `done` counts the epochs trained, `saved_epoch` the last one whose set is complete on disk in
    results_dir (None until rank 0 has looked), `failed` the WriteFailed of a set that could not be written
    (the run stops on it). A set is written in the background while the next epoch trains
    (files.BackgroundWriter). From the moment it is entered, a SIGINT or SIGTERM ends the run with an
    Interrupted that says what is on disk, once the set in flight is.
    """

    def __init__(self, script, settings, results_dir, name, outputs, state_kind, columns, batch_size, world,
                 background=True):
        self.script, self.settings, self.results_dir, self.name = script, settings, results_dir, name
        self.paths = {key: os.path.join(results_dir, f'{name}_{suffix}') for key, suffix in outputs.items()}
        self.journal = os.path.join(results_dir, f'.{name}.saving')  # the renames of a set being committed
        self.lock = files.RunLock(os.path.join(results_dir, f'.{name}.lock'), os.path.join(results_dir, name))
        self.state_kind, self.columns, self.world = state_kind, columns, world
        self.log = launch.printer(world)
        self.rows, self.done, self.saved_epoch, self.failed = [], 0, None, None
        self.writer = files.BackgroundWriter(background)
        self.painter = plot.Painter()
        self._snapshot = None  # (epoch, model dict, whether its set wrote it) of the set last handed over
        self._writing = None  # (epoch, wrote the model) of the set being written
        self._model_epoch = None  # the epoch of the model file on disk, when this run wrote it
        self.log('arguments:', json.dumps(settings, sort_keys=True), flush=True)
        check_divisible(batch_size, world)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        interrupted = None
        with launch.signals_ignored():  # the run is ending: a signal now must not cut its last write short
            try:
                if self.saved_epoch is not None:  # else a signal came before anything was known of the disk
                    interrupted = launch.interruption(error, self.saved)
                failed = self.settle()  # the last set is complete on disk before the script exits
                self.painter.stop()
            finally:
                self.lock.release()
        if interrupted is not None:
            try:
                raise interrupted from None
            finally:  # this frame is in its traceback: holding it too would make a cycle, which would keep the
                interrupted = None  # DataLoader's workers alive until the interpreter's exit waits on them
        if failed is not None and kind is None:
            raise UserError(f'{failed}; {self.kept()}')

    def find_state(self):
        """On rank 0: the results folder checked and this run's name locked for as long as the run lasts,
        a save that an interruption cut short completed or cleaned away, and the saved state to continue
        from (or None)."""
        files.check_writable(self.results_dir)
        self.lock.acquire()
        note = files.recover_set(self.journal, list(self.paths.values()))
        if note:
            print(note, flush=True)
        resume = self.settings['resume']
        state = find_state(resume, self.paths['state'], self.state_kind, self.script, self.settings)
        here = state is not None and os.path.realpath(self.paths['state'] if resume == 'auto' else resume) == \
            os.path.realpath(self.paths['state'])
        self.saved_epoch = state['epoch'] if here else 0  # a state resumed from elsewhere is not saved here
        return state

    def load_data(self, dataset, data_root, batch_size):
        """(train, test) of the dataset, read by rank 0; a batch larger than the training set is refused."""
        train, test = launch.on_main(lambda: utils.load_splits(dataset, data_root), self.world)
        if batch_size > len(train):
            raise JobError(f'--batch_size {batch_size} is larger than the training set '
                           f'({len(train)} images): no step would run')
        return train, test

    def restore(self, state, modules, optimizer, what, epochs):
        """Load a saved training state into `modules` ({key in the state: module}) and the optimizer (or
        each of a list of optimizers) and restore the random-number states, the CSV rows so far and the
        epochs done."""
        if state is None:
            return
        try:
            for key, module in modules.items():
                module.load_state_dict(state[key])
            if isinstance(optimizer, list):
                if len(state['optimizer']) != len(optimizer):
                    raise ValueError(f'{len(state["optimizer"])} optimizers saved, {len(optimizer)} here')
                for one, saved in zip(optimizer, state['optimizer']):
                    one.load_state_dict(saved)
            else:
                optimizer.load_state_dict(state['optimizer'])
        except (KeyError, RuntimeError, ValueError) as e:
            raise JobError(f'--resume: the saved state does not fit this {what} ({str(e).splitlines()[0]})') from None
        set_rng_state(state['rng'])
        self.rows, self.done = list(state['rows']), state['epoch']
        self.log(f'resuming after epoch {self.done} of {epochs}' if self.done < epochs else
                 f'the run is already complete ({self.done} epochs)', flush=True)

    def write_record(self, device, extra):
        if self.world.main:
            files.write_json(run_record(self.settings, device, {'name': self.name, 'resumed_after_epoch': self.done,
                                                                'world_size': self.world.world_size, **extra}),
                             self.paths['record'])

    # --------------------------------------------------------------------- what is on disk

    def settle(self):
        """Wait for the set being written (what a signal does meanwhile is the caller's to decide); returns
        the WriteFailed of this set or of an earlier one, or None when all are on disk."""
        if self._writing is not None:
            epoch, with_model = self._writing
            try:
                failed = self.writer.wait()
            finally:
                self._writing = None
            if failed is not None:
                self.failed = failed
            else:
                self.saved_epoch = epoch
                if with_model:
                    self._model_epoch = epoch
        return self.failed

    def saved(self):
        """What is on disk to continue from, for the interrupt line (signals held off by the caller): the set
        being written is waited for, and the model file brought up to its epoch if --save_every had left it
        behind and this process has the epoch's weights."""
        if self.settle() is not None:
            return f'{self.failed}; {self.kept()}'
        if self._snapshot is not None and self._snapshot[0] == self.saved_epoch != self._model_epoch:
            with contextlib.suppress(files.WriteFailed):
                files.write_set([(self.paths['model'], _saver(self._snapshot[1]))], self.journal)
                self._model_epoch = self.saved_epoch
        return (f'epochs 1-{self.saved_epoch} are saved in {self.paths["state"]}' if self.saved_epoch
                else 'no epoch had completed')

    def kept(self):
        """What is on disk after a failure, for its line."""
        return (f'{self.paths["state"]} holds epoch {self.saved_epoch}, the last complete one, as does the CSV'
                if self.saved_epoch else 'nothing was saved')

    # --------------------------------------------------------------------- the loop

    def loop(self, epochs, save_every, train_epoch, checkpoint, plot, describe):
        """Run the epochs after the last one done.

        train_epoch(epoch) -> the epoch's CSV row (it may raise NonFiniteLoss); checkpoint() -> (model,
        state): the model file's dict (with its 'kind') and the state's own entries (weights, optimizer),
        to which the epoch, the arguments, the rows and the random-number states are added; plot(rows)
        redraws the statistics picture (on the painter's thread, at most every plot.REDRAW_EVERY_S
        seconds); describe(row) is the epoch's line. After each epoch rank 0 writes the CSV and the state
        (and, every `save_every` epochs and after the last, the model) as one set, in the background.
        """
        for epoch in range(self.done + 1, epochs + 1):
            try:
                row = train_epoch(epoch)
            except launch.NonFiniteLoss as e:
                failed = self.settle()
                if failed is not None:
                    raise UserError(f'{failed}; training stopped and {self.kept()}') from None
                kept = (f'the state of epoch {self.saved_epoch} is kept in {self.paths["state"]}'
                        if self.saved_epoch else 'nothing was saved')
                raise JobError(f'{e}; training stopped and {kept} (try a lower --lr)') from None
            self.rows.append(row)
            with_model = epoch % save_every == 0 or epoch == epochs
            with launch.signals_deferred():  # a signal now is taken once the epoch is handed over
                launch.on_main(lambda: self.save(epoch, with_model, *checkpoint()), self.world)
                self.done = epoch
            if self.world.main:
                rows = list(self.rows)
                self.painter.post(lambda: plot(rows))
            self.log(describe(row), flush=True)

    def save(self, epoch, with_model, model, state):
        """Hand the epoch's set to the writer: wait for the previous set (a write of it that failed stops
        the run with one line), take a host copy of what this one needs, and go on training while it is
        written (files.write_set). The seconds the loop waited go in the row's save_time."""
        start = time.perf_counter()
        failed = self.settle()
        if failed is not None:
            raise UserError(f'{failed}; training stopped and {self.kept()}')
        common = {'epoch': epoch, 'args': self.settings}
        into, self._snapshot = self._snapshot and self._snapshot[2], None  # no longer a snapshot: overwritten now
        model, state = files.host_copy(({**model, **common}, {'kind': self.state_kind, **state, 'rows': self.rows,
                                                               'rng': rng_state(), **common}), into=into)
        self.rows[-1]['save_time'] = state['rows'][-1]['save_time'] = time.perf_counter() - start
        table = pd.DataFrame(self.rows, columns=self.columns).to_csv(index=False).encode()
        parts = [(self.paths['csv'], lambda f: f.write(table))]
        if with_model:
            parts.append((self.paths['model'], _saver(model)))
        parts.append((self.paths['state'], _saver(state)))
        self._snapshot = (epoch, model, (model, state))
        self._writing = (epoch, with_model)
        self.writer.start(lambda: files.write_set(parts, self.journal))

    def finish(self, summary, pictures=()):
        """After the last epoch: the last set complete on disk, the statistics picture and `pictures` (functions
        that draw one each) drawn, then the final line: every file written, then `summary`."""
        failed = self.settle()
        if failed is not None:
            raise UserError(f'{failed}; training stopped and {self.kept()}')
        self.painter.flush()
        for draw in pictures:
            self.painter.now(draw)
        written = ', '.join(f'{key} {path}' for key, path in self.paths.items() if os.path.exists(path))
        self.log(f'done: {written}; {summary}', flush=True)


def _saver(obj):
    return lambda f: torch.save(obj, f)
