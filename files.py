"""What a run leaves on disk, written so that a crash never leaves half of it: atomic files, checkpoints and
their kinds, CSV and JSON logs."""
import contextlib
import json
import os
import tempfile

import torch

from launch import UserError


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


@contextlib.contextmanager
def atomic_open(path, mode='wb'):
    """Write to a temporary file beside `path`, flush and fsync it, then os.replace it into place.

    A crash at any instant leaves either the old file or the complete new one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    try:
        os.fchmod(fd, _UMASK_MODE)  # mkstemp makes files private (0600); results are for sharing
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


def write_csv(rows, columns, path):
    """Write all rows (dicts) to `path` atomically, columns in the given order."""
    import pandas as pd
    with atomic_open(path, 'w') as f:
        pd.DataFrame(rows, columns=columns).to_csv(f, index=False)


def write_json(obj, path):
    with atomic_open(path, 'w') as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write('\n')
