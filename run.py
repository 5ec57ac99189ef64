"""The life of a run, shared by both scripts: its lock and output paths, finding and restoring a saved state
(with the random-number states), the record of what ran, each epoch's set handed over and written in the
background, interrupts and the final line.

The epoch loop is each script's own: it trains an epoch, makes the row, and hands both to `Run.end_epoch`.
"""
import contextlib
import functools
import json
import os
import sys
import time

import pandas as pd
import torch

import distributed
import files
import plot
import signals
from errors import DataError, JobError, NonFiniteLoss, UserError

# Arguments that may change when a run is resumed: they do not change what the run computes.
HARMLESS = frozenset({'num_workers', 'device', 'resume', 'data_root', 'results_dir', 'compile', 'save_every',
                      'from_recipe', 'aug_auto'})  # the values it names are compared themselves


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
    saved = dict(state['args'])
    if saved.get('aug') == 'auto':  # recorded before --aug auto was resolved into the settings: it was batched
        saved['aug'] = 'batched'
    changed = run_differences(saved, settings)
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
            device_name = f'{names[0]} ({distributed.available_cpus()} CPUs available)' if names else device_name
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

# What a run writes, {key: file-name suffix after <name>_}; a script may add its own.
OUTPUTS = {'csv': 'statistics.csv', 'model': 'model.pth', 'state': 'state.pth', 'plot': 'statistics.png',
           'record': 'args.json'}


class Run:
    """One run of a script under one name, from its lock to its final line.

    script: 'main.py' or 'linear.py'; name: the prefix of its files in settings['results_dir']; settings: the
    run's arguments as a dict (saved in every file; 'resume', 'epochs' and 'save_every' among them); columns:
    the CSV's columns (with 'save_time' among them); state_kind: the 'kind' of its state file; title: of its
    statistics picture.

    `done` counts the epochs trained, `saved_epoch` the last one whose set is complete on disk (None until
    rank 0 has looked), `failed` the WriteFailed of a set that could not be written (the run stops on it).
    From the moment it is entered, a SIGINT or SIGTERM ends the run with an Interrupted that says what is
    on disk, once the set in flight is; a NonFiniteLoss that leaves it ends the run with one line saying
    what is kept, and the run's record says why it stopped.
    """

    def __init__(self, script, name, settings, *, columns, world, state_kind, outputs=OUTPUTS, title=''):
        self.script, self.name, self.settings, self.world = script, name, settings, world
        self.columns, self.state_kind, self.title = columns, state_kind, title
        self.results_dir = settings['results_dir']
        self.paths = {key: os.path.join(self.results_dir, f'{name}_{suffix}') for key, suffix in outputs.items()}
        self.journal = os.path.join(self.results_dir, f'.{name}.saving')  # the renames of a set being committed
        self.lock = files.RunLock(os.path.join(self.results_dir, f'.{name}.lock'),
                                  os.path.join(self.results_dir, name))
        self.log = distributed.printer(world)
        self.rows, self.done, self.saved_epoch, self.failed = [], 0, None, None
        self.writer = files.BackgroundWriter()
        self.painter = plot.Painter()
        self._record = None  # what write_record wrote, to add how the run stopped
        self._copies = (None, None)  # the host copies (model, state) of the set last handed over, for reuse
        self._snapshot = None  # (epoch, model file dict, memo of the state's host copy) of that set
        self._writing = None  # (epoch, wrote the model) of the set being written
        self._model_epoch = None  # the epoch of the model file on disk, when this run wrote it
        self.log('arguments:', json.dumps(settings, sort_keys=True), flush=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        ending = None
        with signals.ignored():  # the run is ending: a signal now must not cut its last write short
            try:
                if self.saved_epoch is not None:  # else a signal came before anything was known of the disk
                    ending = signals.interruption(error, self.saved)
                failed = self.settle()  # the last set is complete on disk before the script exits
                if ending is None and isinstance(error, NonFiniteLoss):
                    ending = self._stopped(error, failed)
                elif ending is None and isinstance(error, DataError):
                    kept = self.kept() if self.world.main else 'rank 0 keeps the last complete epoch'
                    ending = type(error)(f'{error}; training stopped and {kept}')
                elif ending is None and failed is not None and kind is None:
                    ending = UserError(f'{failed}; {self.kept()}')
                self.painter.flush()  # the picture of the last set on disk
            finally:
                self.lock.release()
        if ending is not None:
            try:
                raise ending from None
            finally:  # this frame is in its traceback: holding it too would make a cycle, which would keep the
                ending = None  # DataLoader's workers alive until the interpreter's exit waits on them

    def start(self):
        """The saved state to continue from (or None), found by rank 0 and handed to every process: the
        results folder checked, this run's name locked for as long as the run lasts, and a save that an
        interruption cut short completed or cleaned away first."""
        return distributed.on_main(self._find_state, self.world)

    def _find_state(self):
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

    def restore(self, state, parts, what):
        """Load a saved training state into `parts` ({key in the state: anything with load_state_dict: a
        module, an optimizer}) and restore the random-number states, the CSV rows so far and the epochs done."""
        if state is None:
            return
        try:
            for key, part in parts.items():
                part.load_state_dict(state[key])
        except (KeyError, RuntimeError, ValueError) as e:
            raise JobError(f'--resume: the saved state does not fit this {what} ({str(e).splitlines()[0]})') from None
        set_rng_state(state['rng'])
        self.rows, self.done = list(state['rows']), state['epoch']
        epochs = self.settings['epochs']
        self.log(f'resuming after epoch {self.done} of {epochs}' if self.done < epochs else
                 f'the run is already complete ({self.done} epochs)', flush=True)

    def write_record(self, device, extra):
        """`<name>_args.json`: what this run is (run_record) and `extra`, written by rank 0."""
        if self.world.main:
            self._record = run_record(self.settings, device, {'name': self.name, 'resumed_after_epoch': self.done,
                                                              'world_size': self.world.world_size, **extra})
            files.write_json(self._record, self.paths['record'])

    # --------------------------------------------------------------------- the epoch handed over

    def end_epoch(self, row, model, state):
        """Hand over the epoch just trained: its CSV row, the model file's dict (with its 'kind') and the
        state's own entries (weights, optimizer), to which the epoch, the arguments, the rows and the
        random-number states are added.

        Rank 0 writes the CSV and the state (and, every --save_every epochs and after the last, the model) as
        one set in the background, and redraws the statistics picture once that set is on disk (at most every
        plot.REDRAW_EVERY_S seconds); SIGINT and SIGTERM wait until the epoch is handed over. The model file's
        tensors must be the state's or frozen ones: an interrupt before the next set brings the model file
        up to this epoch from the state's copy.
        """
        self.rows.append(row)
        epoch = row['epoch']
        with_model = epoch % self.settings['save_every'] == 0 or epoch == self.settings['epochs']
        with signals.deferred():
            distributed.on_main(lambda: self._save(epoch, with_model, model, state), self.world)
            self.done = epoch

    def _save(self, epoch, with_model, model, state):
        """Wait for the previous set (a write of it that failed stops the run with one line), take a host copy
        of what this one writes, and go on training while it is written (files.write_set). The seconds the
        loop waited go in the row's save_time."""
        start = time.perf_counter()
        failed = self.settle()
        if failed is not None:
            raise UserError(f'{failed}; training stopped and {self.kept()}')
        common = {'epoch': epoch, 'args': self.settings}
        model, memo = {**model, **common}, {}
        self._snapshot = None  # its copies are overwritten now
        state = files.host_copy({'kind': self.state_kind, **state, 'rows': self.rows, 'rng': rng_state(), **common},
                                into=self._copies[1], memo=memo)
        copied = files.host_copy(model, into=self._copies[0], memo=memo) if with_model else None
        self._copies = (copied or self._copies[0], state)
        self.rows[-1]['save_time'] = state['rows'][-1]['save_time'] = time.perf_counter() - start
        rows = list(self.rows)
        table = pd.DataFrame(rows, columns=self.columns).to_csv(index=False).encode()
        parts = [(self.paths['csv'], lambda f: f.write(table))]
        if with_model:
            parts.append((self.paths['model'], _saver(copied)))
        parts.append((self.paths['state'], _saver(state)))
        self._snapshot = (epoch, model, memo)
        self._writing = (epoch, with_model)

        def write():
            files.write_set(parts, self.journal)
            self.painter.post(functools.partial(self._draw, rows))  # the picture shows what is on disk
        self.writer.start(write)

    def _draw(self, rows):
        plot.plot_statistics(pd.DataFrame(rows, columns=self.columns), self.paths['plot'], self.title)

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
            _, model, memo = self._snapshot
            with contextlib.suppress(files.WriteFailed):
                files.write_set([(self.paths['model'], _saver(files.host_copy(model, memo=memo)))], self.journal)
                self._model_epoch = self.saved_epoch
        return (f'epochs 1-{self.saved_epoch} are saved in {self.paths["state"]}' if self.saved_epoch
                else 'no epoch had completed')

    def kept(self):
        """What is on disk after a failure, for its line."""
        return (f'{self.paths["state"]} holds epoch {self.saved_epoch}, the last complete one, as does the CSV'
                if self.saved_epoch else 'nothing was saved')

    def _stopped(self, error, failed):
        """The one line of a run that a non-finite loss stopped (`failed`: a set that could not be written), and
        the reason added to its record, for report.py."""
        if failed is not None:
            return UserError(f'{failed}; training stopped and {self.kept()}')
        if self._record is not None:
            with contextlib.suppress(OSError):
                files.write_json({**self._record, 'stopped': str(error)}, self.paths['record'])
        kept = (f'the state of epoch {self.saved_epoch} is kept in {self.paths["state"]}'
                if self.saved_epoch else 'nothing was saved')
        return JobError(f'{error}; training stopped and {kept} (try a lower --lr)')

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
