"""What a run leaves on disk, written so that a crash never leaves half of it: atomic files, the saved set
of an epoch written as one, checkpoints and their kinds, CSV and JSON logs, and the lock that keeps a
second run off the same name."""
import contextlib
import errno
import fcntl
import glob
import json
import os
import socket
import tempfile
import threading

import torch

from errors import UserError


def check_writable(folder):
    """Create `folder` if needed and prove a file can be written in it, before any work starts."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix='.write-test-')
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f'--results_dir {folder!r} is not writable ({e.strerror or e})') from None


def _file_mode():
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_UMASK_MODE = _file_mode()  # the mode open() would give a new file


class WriteFailed(OSError):
    """A file of a saved set could not be written; `path` is the file, the OSError says why."""

    def __init__(self, path, error):
        super().__init__(error.errno, error.strerror or str(error))
        self.path = path

    def __str__(self):
        code = f' [{errno.errorcode[self.errno]}]' if self.errno in errno.errorcode else ''
        return f'could not write {self.path!r} ({self.strerror}{code})'


class _Recording:
    """A file's write(), remembering the OSError it raised: torch.save turns it into an unhelpful
    RuntimeError ('unexpected pos ...'), and this keeps the reason (ENOSPC, EFBIG, EDQUOT, EIO)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def _temporary(path):
    """(descriptor, absolute name) of a new temporary file beside `path`, whose name recover_set knows."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    try:
        os.fchmod(fd, _UMASK_MODE)  # mkstemp makes files private (0600); results are for sharing
    except OSError:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def _sync_folder(folder):
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_set(parts, journal):
    """Write several files as one set: [(path, write(f))], each `write` filling a binary file.

    Every file goes to a temporary name beside its path and is fsynced; only when all are complete is
    the list of renames committed to `journal` (itself written atomically), and then carried out. So a
    failure while writing (a full disk, a file-size limit) leaves the previous set untouched and no
    temporary file, and raises WriteFailed naming the file and the reason; a kill at any instant leaves
    either the previous set, or a committed journal that `recover_set` completes.
    """
    done = []
    try:
        for path, write in parts:
            recording = None
            try:
                fd, tmp = _temporary(path)
                done.append((tmp, os.path.abspath(path)))  # absolute: the next start may run elsewhere
                with os.fdopen(fd, 'wb') as f:
                    recording = _Recording(f)
                    write(recording)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                raise WriteFailed(path, e) from None
            except RuntimeError:
                if recording is None or recording.error is None:
                    raise  # not a failed write: a bug
                raise WriteFailed(path, recording.error) from None
        try:
            with atomic_open(journal, 'w') as f:
                json.dump([[tmp, path] for tmp, path in done], f)
        except OSError as e:
            raise WriteFailed(journal, e) from None
    except BaseException:
        for tmp, _ in done:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    try:
        _commit(done, journal)
    except OSError as e:  # committed: the next start completes the renames from the journal
        raise WriteFailed(e.filename or journal, e) from None


def _commit(renames, journal):
    for tmp, path in renames:
        if os.path.exists(tmp):
            os.replace(tmp, path)
    _sync_folder(os.path.dirname(os.path.abspath(journal)))
    os.unlink(journal)


def recover_set(journal, paths):
    """Before a run uses its files (holding its lock): complete a set that a kill interrupted after its
    commit, and remove the temporary files of one interrupted before it. Returns what it did, or None."""
    notes = []
    if os.path.exists(journal):
        try:
            with open(journal) as f:
                renames = [tuple(pair) for pair in json.load(f)]
        except (OSError, ValueError):
            renames = None  # never written whole: atomic_open makes that impossible, but do no harm
        if renames is not None:
            _commit(renames, journal)
            notes.append(f'completed the saved set that an interruption left half renamed ({journal})')
    stale = [tmp for path in [*paths, journal] for tmp in glob.glob(glob.escape(os.path.join(
        os.path.dirname(path), '.' + os.path.basename(path))) + '.*.tmp')]
    for tmp in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    if stale:
        notes.append(f'removed {len(stale)} temporary file(s) of an interrupted save')
    return '; '.join(notes) or None


def host_copy(obj, into=None, memo=None):
    """A copy of `obj` (dicts, lists and tuples of tensors and plain values) that training can no longer
    change: every tensor copied to host memory. Where `into`, an earlier copy of the same structure, holds
    a tensor of the same shape and dtype, it is copied into that one, so a copy each epoch reuses its
    memory. A tensor whose memory was met before (the weights in both the model file and the state, also
    through two state_dict() calls) is copied once: `memo` maps that memory to its copy, and a later call
    with the same memo finds the copy taken then. A CUDA tensor goes to pinned memory without waiting:
    synchronise before reading (BackgroundWriter does)."""
    memo = {} if memo is None else memo
    if torch.is_tensor(obj):
        key = (obj.device, obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.dtype, tuple(obj.shape),
               obj.stride())
        if key not in memo:
            if torch.is_tensor(into) and into.shape == obj.shape and into.dtype == obj.dtype and into is not obj:
                out = into
            else:
                out = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
            memo[key] = out.copy_(obj.detach(), non_blocking=obj.is_cuda)
        return memo[key]
    if isinstance(obj, dict):
        into = into if isinstance(into, dict) else {}
        return {k: host_copy(v, into.get(k), memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        into = into if isinstance(into, (list, tuple)) and len(into) == len(obj) else [None] * len(obj)
        return type(obj)(host_copy(v, i, memo) for v, i in zip(obj, into))
    return obj


class BackgroundWriter:
    """Writes saved sets on one thread beside the training, one set at a time.

    `start(job)` runs job() on the thread (after the CUDA copies queued so far are done); `wait()` blocks
    until it has finished and returns the WriteFailed it raised, or None; any other exception it raised
    is raised again here."""

    def __init__(self):
        self._thread, self._error = None, None

    def start(self, job):
        assert self._thread is None, 'wait() for the previous set first'
        ready = torch.cuda.Event() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        if ready is not None:
            ready.record()  # the snapshot's device-to-host copies

        def run():
            try:
                if ready is not None:
                    ready.synchronize()
                job()
            except BaseException as e:  # handed to the training thread by wait()
                self._error = e
        self._thread = threading.Thread(target=run, name='saving', daemon=True)
        self._thread.start()

    def wait(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and not isinstance(error, WriteFailed):
            raise error
        return error


@contextlib.contextmanager
def atomic_open(path, mode='wb'):
    """Write to a temporary file beside `path`, flush and fsync it, then os.replace it into place.

    A crash at any instant leaves either the old file or the complete new one.
    """
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_checkpoint(obj, path):
    with atomic_open(path, 'wb') as f:
        torch.save(obj, f)


def load_checkpoint(path, kinds, flag):
    """Load a checkpoint written by these scripts and check that its 'kind' is one of `kinds`.

    Anything else (missing, empty, truncated, not a torch file, another program's file) is a UserError.
    """
    if not os.path.isfile(path):
        raise UserError(f'{flag} {path!r} does not exist')
    if os.path.getsize(path) == 0:
        raise UserError(f'{flag} {path!r} is empty')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception:  # torch raises many types for a damaged file
        raise UserError(f'{flag} {path!r} is not a checkpoint written by torch.save '
                        f'(it is truncated, damaged or another kind of file)') from None
    kind = ckpt.get('kind') if isinstance(ckpt, dict) else None
    if kind not in kinds:
        what = f'a {kind!r} file' if isinstance(kind, str) else 'not a file written by main.py or linear.py'
        keys = ', '.join(list(ckpt)[:5]) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f'{flag} {path!r} is {what} (top-level keys: {keys}); expected {" or ".join(kinds)}')
    return ckpt


def write_json(obj, path):
    with atomic_open(path, 'w') as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write('\n')


_HELD = set()  # the descriptors of the locks this process holds


def _drop_inherited_locks():
    """In a child made by fork (a DataLoader worker): close the copies of the parent's lock descriptors, so
    that the lock dies with the parent and not with the last of its workers."""
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


class RunLock:
    """An OS file lock (flock) on `path` that keeps a second run off the same name. It dies with its
    process (forked children do not keep it), so a killed run never leaves a lock behind that blocks the
    next; the file says who holds it."""

    def __init__(self, path, what):
        self.path, self.what, self.fd = path, what, None

    def acquire(self):
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, _UMASK_MODE)
            except OSError as e:
                raise UserError(f'cannot create the lock file {self.path!r} ({e.strerror})') from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise UserError(f'cannot lock {self.path!r} ({e.strerror})') from None
                holder = os.read(fd, 200).decode(errors='replace').strip() or 'a process that has just started'
                os.close(fd)
                raise UserError(f'{self.what} is in use by another run ({holder}); wait for it to finish or '
                                f'stop it, or pick another --name or --results_dir') from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file that its last holder removed between our open and our lock
                break
            os.close(fd)
        with contextlib.suppress(OSError):  # who holds it is for the message of a second run; a full disk may refuse
            os.ftruncate(fd, 0)
            os.write(fd, f'pid {os.getpid()} on host {socket.gethostname()}\n'.encode())
        self.fd = fd
        _HELD.add(fd)
        return self

    def release(self):
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # while still held, so no one locks a file that is going away
            _HELD.discard(self.fd)
            os.close(self.fd)
            self.fd = None
