"""Faults that must end well: a second run on the same name, writes that fail (a full disk, a file-size
limit), a kill in the middle of a save, damaged data files."""
import errno
import os
import resource
import signal
import socket
import subprocess
import sys
import tarfile

import pytest
import torch

import errors
import files
import linear
import main
import utils
from conftest import FP32, PIL, ROOT, TINY, csv_without, start, wait_for_line, write_cifar10


def temporaries(folder):
    return [f for f in os.listdir(folder) if f.endswith('.tmp')]


# ----------------------------------------------------------------------------- one run per name

def test_a_second_run_on_the_same_name_is_refused_and_the_first_is_unharmed(folder_data, tmp_path):
    args = [*TINY, *PIL, '--data_root', folder_data, '--results_dir', tmp_path, '--epochs', 5, '--name', 'run']
    first = start('main.py', args)
    wait_for_line(first, 'speed:')  # it holds the lock from before it loads the data
    second = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *map(str, args), '--resume', 'auto'],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"main.py: error: {tmp_path / 'run'} is in use by another run (pid {first.pid} on host "
        f"{socket.gethostname()}); wait for it to finish or stop it, or pick another --name or --results_dir"]
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    state = torch.load(tmp_path / 'run_state.pth', weights_only=True)
    assert state['epoch'] == 5 and len((tmp_path / 'run_statistics.csv').read_text().splitlines()) == 6
    assert not os.path.exists(tmp_path / '.run.lock')  # a finished run takes its lock file with it


def test_linear_refuses_a_name_in_use_and_a_pretraining_run_does_not_block_it(finished, tmp_path):
    holder = files.RunLock(str(tmp_path / '.run_linear.lock'), 'x').acquire()
    try:
        argv = ['--model_path', str(finished / 'run_model.pth'), '--results_dir', str(tmp_path), '--epochs', '1',
                '--batch_size', '8', '--device', 'cpu', '--num_workers', '0', *FP32]
        with pytest.raises(errors.UserError, match=rf'is in use by another run \(pid {os.getpid()} on host '):
            linear.main(linear.parse_args(argv))
        assert os.listdir(tmp_path) == ['.run_linear.lock']
    finally:
        holder.release()
    # the lock of a pretraining run named 'run' is another lock: its evaluation may run beside it
    pretraining = files.RunLock(str(finished / '.run.lock'), 'x').acquire()
    try:
        linear.main(linear.parse_args(argv))
    finally:
        pretraining.release()
    assert (tmp_path / 'run_linear_state.pth').exists()


def test_a_lock_dies_with_its_process(tmp_path):
    path = str(tmp_path / '.x.lock')
    holder = subprocess.Popen([sys.executable, '-c', f'''
import sys, time
sys.path.insert(0, {ROOT!r})
import files
files.RunLock({path!r}, 'x').acquire()
print('locked', flush=True)
time.sleep(600)
'''], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(errors.UserError, match=f'pid {holder.pid} on host'):
        files.RunLock(path, 'x').acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert os.path.exists(path)  # left behind by the kill, but no longer held
    files.RunLock(path, 'x').acquire().release()
    assert not os.path.exists(path)


# ----------------------------------------------------------------------------- writes that fail

@pytest.mark.parametrize('code', [errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG])
def test_a_set_that_cannot_be_written_leaves_the_previous_one(tmp_path, code):
    paths = [str(tmp_path / name) for name in ('a.csv', 'b.pth', 'c.pth')]
    journal = str(tmp_path / '.x.saving')
    files.write_set([(p, lambda f, p=p: f.write(b'old ' + p.encode())) for p in paths], journal)

    def full(f):
        f.write(b'partial')
        raise OSError(code, os.strerror(code))
    parts = [(paths[0], lambda f: f.write(b'new')), (paths[1], full), (paths[2], lambda f: f.write(b'new'))]
    with pytest.raises(files.WriteFailed) as e:
        files.write_set(parts, journal)
    assert str(e.value) == f'could not write {paths[1]!r} ({os.strerror(code)} [{errno.errorcode[code]}])'
    assert [open(p, 'rb').read() for p in paths] == [b'old ' + p.encode() for p in paths]
    assert sorted(os.listdir(tmp_path)) == ['a.csv', 'b.pth', 'c.pth']  # no temporary file, no journal


def test_torch_save_failing_names_the_reason_not_torchs_message(tmp_path):
    r = subprocess.run([sys.executable, '-c', f'''
import resource, sys, torch
sys.path.insert(0, {ROOT!r})
import files
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    files.write_set([({str(tmp_path / 'big.pth')!r}, lambda f: torch.save(torch.zeros(100_000), f))],
                    {str(tmp_path / '.j')!r})
except files.WriteFailed as e:
    print(e)
'''], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == f"could not write {str(tmp_path / 'big.pth')!r} (File too large [EFBIG])", r.stderr
    assert os.listdir(tmp_path) == []


def test_a_kill_between_the_commit_and_the_renames_is_completed_on_the_next_start(tmp_path, monkeypatch):
    paths = [str(tmp_path / name) for name in ('a.csv', 'b.pth')]
    journal = str(tmp_path / '.x.saving')
    files.write_set([(p, lambda f: f.write(b'1')) for p in paths], journal)
    real_replace, calls = os.replace, []

    def killed_after_the_first_rename(src, dst):
        if str(dst) in paths:
            if calls:
                raise KeyboardInterrupt  # as if the process died here
            calls.append(dst)
        real_replace(src, dst)
    monkeypatch.setattr(os, 'replace', killed_after_the_first_rename)
    with pytest.raises(KeyboardInterrupt):
        files.write_set([(p, lambda f: f.write(b'2')) for p in paths], journal)
    monkeypatch.setattr(os, 'replace', real_replace)
    assert [open(p, 'rb').read() for p in paths] == [b'2', b'1'] and os.path.exists(journal)  # mixed, committed
    assert 'completed the saved set' in files.recover_set(journal, paths)
    assert [open(p, 'rb').read() for p in paths] == [b'2', b'2']
    assert sorted(os.listdir(tmp_path)) == ['a.csv', 'b.pth']


def test_temporaries_of_a_save_killed_before_its_commit_are_removed_on_the_next_start(tmp_path):
    paths = [str(tmp_path / 'a.csv'), str(tmp_path / 'b.pth')]
    for p in paths:
        open(p, 'w').write('kept')
    stray = tmp_path / '.b.pth.x1y2.tmp'
    stray.write_text('half a checkpoint')
    (tmp_path / '.other.pth.z.tmp').write_text('not ours')
    assert files.recover_set(str(tmp_path / '.x.saving'), paths) == 'removed 1 temporary file(s) of an interrupted save'
    assert sorted(os.listdir(tmp_path)) == ['.other.pth.z.tmp', 'a.csv', 'b.pth']


def test_a_full_disk_during_a_save_stops_the_run_and_a_resume_finishes_it(folder_data, uninterrupted_pil, tmp_path):
    """Killed after epoch 1; resumed under a file-size limit that the state does not fit, so epoch 2's save
    fails (in the background: the run stops at the end of epoch 3 at the latest); resumed without it: the
    CSV is that of an uninterrupted run."""
    args = [*TINY, *PIL, '--data_root', folder_data, '--results_dir', tmp_path, '--epochs', 3, '--name', 'run']
    proc = start('main.py', args)
    wait_for_line(proc, 'epoch 2/3')  # epoch 1's set is complete on disk once epoch 2 has started
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(tmp_path / 'run_state.pth', weights_only=True)['epoch'] in (1, 2)
    limit = os.path.getsize(tmp_path / 'run_state.pth') // 2  # the CSV fits, the state does not

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *map(str, args), '--resume', 'auto'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=limited)
    assert r.returncode == 2, r.stderr
    done = torch.load(tmp_path / 'run_state.pth', weights_only=True)['epoch']
    assert 'Traceback' not in r.stderr
    assert r.stderr.strip().splitlines()[-1:] == [  # after the progress bars, one line
        f"main.py: error: could not write '{tmp_path / 'run_state.pth'}' (File too large [EFBIG]); training "
        f"stopped and {tmp_path / 'run_state.pth'} holds epoch {done}, the last complete one, as does the CSV"]
    assert len((tmp_path / 'run_statistics.csv').read_text().splitlines()) == done + 1
    assert temporaries(tmp_path) == [] and not os.path.exists(tmp_path / '.run.saving')

    r = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *map(str, args), '--resume', 'auto'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert csv_without(tmp_path / 'run_statistics.csv', main.WALL_CLOCK) == \
        csv_without(uninterrupted_pil / 'run_statistics.csv', main.WALL_CLOCK)


# ----------------------------------------------------------------------------- damaged data

def test_a_damaged_cifar_archive_is_named_and_kept(tmp_path):
    root = tmp_path / 'data'
    root.mkdir()
    (root / 'cifar-10-python.tar.gz').write_bytes(os.urandom(50_000))
    with pytest.raises(errors.UserError) as e:
        utils.load_dataset('cifar10', str(root), train=True)
    assert str(e.value) == (
        f"'{root / 'cifar-10-python.tar.gz'}' is damaged (its MD5 sum is not the published one: truncated or "
        f"another file); delete it and fetch cifar-10-python.tar.gz again from "
        f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into {root}/")
    assert os.path.getsize(root / 'cifar-10-python.tar.gz') == 50_000  # nothing deleted for the user


def test_a_damaged_extracted_batch_is_named(tmp_path):
    write_cifar10(tmp_path, 50, 20)  # its files are not the published ones, so the MD5 check fails for each
    (tmp_path / 'cifar-10-batches-py' / 'data_batch_1').write_bytes(b'')
    with pytest.raises(errors.UserError) as e:
        utils.load_dataset('cifar10', str(tmp_path), train=True)
    assert str(e.value).startswith(f"'{tmp_path / 'cifar-10-batches-py' / 'data_batch_1'}' is damaged (its MD5 "
                                   f"sum is not the published one); delete '{tmp_path / 'cifar-10-batches-py'}' "
                                   f"and put cifar-10-python.tar.gz in {tmp_path}/")


def test_a_truncated_archive_and_an_unreadable_batch_are_named(tmp_path, cifar_files_ok):
    # With the MD5 check reduced to 'the file exists' (the generated files are not the published ones), the
    # damage shows when the files are read.
    source = tmp_path / 'source'
    write_cifar10(source, 50, 20)
    root = tmp_path / 'data'
    root.mkdir()
    with tarfile.open(root / 'whole.tar.gz', 'w:gz') as tar:
        tar.add(source / 'cifar-10-batches-py', arcname='cifar-10-batches-py')
    whole = (root / 'whole.tar.gz').read_bytes()
    (root / 'whole.tar.gz').unlink()
    (root / 'cifar-10-python.tar.gz').write_bytes(whole[:len(whole) // 2])
    with pytest.raises(errors.UserError, match=r"cifar-10-python.tar.gz' cannot be unpacked \(.*\): it is "
                                               r"damaged; delete it and fetch cifar-10-python.tar.gz again"):
        utils.load_dataset('cifar10', str(root), train=True)
    assert os.path.getsize(root / 'cifar-10-python.tar.gz') == len(whole) // 2

    (source / 'cifar-10-batches-py' / 'data_batch_3').write_bytes(b'')
    with pytest.raises(errors.UserError, match=rf"the cifar10 files in '{source / 'cifar-10-batches-py'}' cannot "
                                               rf"be read \(EOFError: .*\); delete "):
        utils.load_dataset('cifar10', str(source), train=True)


@pytest.mark.parametrize('content,why', [(b'', 'it is empty'), (b'not a png', 'cannot identify image file')])
def test_an_image_that_cannot_be_read_is_named_with_the_fix(tmp_path, content, why):
    (tmp_path / 'train' / 'a').mkdir(parents=True)
    path = tmp_path / 'train' / 'a' / 'bad.png'
    path.write_bytes(content)
    with pytest.raises(errors.UserError) as e:
        utils.load_dataset('folder', str(tmp_path), train=True)
    assert str(e.value) == (f"cannot read image '{path}' ({why}): replace it with a readable image or move it "
                            f"out of '{tmp_path / 'train'}'")
    assert path.read_bytes() == content


SLOW_WRITES = '''
import sys, time
sys.path.insert(0, sys.argv[1])
import cli, files, main
real = files._Recording.write
def slow(self, data):  # about one second per checkpoint file: a kill can land in the middle of a write
    print('writing', flush=True)
    time.sleep(0.25)
    return real(self, data)
files._Recording.write = slow
sys.argv = ['main.py', *sys.argv[2:]]
sys.exit(cli.cli(main.main, main.parse_args))
'''


def test_a_kill_in_the_middle_of_a_background_write_leaves_the_last_complete_set(folder_data, uninterrupted_pil,
                                                                                tmp_path):
    args = [*TINY, *PIL, '--data_root', folder_data, '--results_dir', tmp_path, '--epochs', 3, '--name', 'run']
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    proc = subprocess.Popen([sys.executable, '-c', SLOW_WRITES, ROOT, *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(proc, 'epoch 1/3')  # epoch 1's set has been handed to the writer
    wait_for_line(proc, 'writing')  # and it is being written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = temporaries(tmp_path)
    assert left, 'the kill should land in the middle of a write'
    assert not os.path.exists(tmp_path / 'run_state.pth')  # no set had completed: nothing but temporaries

    r = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *map(str, args), '--resume', 'auto'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert 'removed' in r.stdout and 'temporary file(s) of an interrupted save' in r.stdout
    assert temporaries(tmp_path) == []
    assert csv_without(tmp_path / 'run_statistics.csv', main.WALL_CLOCK) == \
        csv_without(uninterrupted_pil / 'run_statistics.csv', main.WALL_CLOCK)


def test_no_room_for_a_new_file_is_a_failed_write_too(tmp_path, monkeypatch):
    # out of inodes or an inode quota: the temporary file itself cannot be made
    def no_room(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(files.tempfile, 'mkstemp', no_room)
    with pytest.raises(files.WriteFailed) as e:
        files.write_set([(str(tmp_path / 'a.csv'), lambda f: f.write(b'x'))], str(tmp_path / '.x.saving'))
    assert str(e.value) == f"could not write {str(tmp_path / 'a.csv')!r} (No space left on device [ENOSPC])"


def test_a_journal_written_under_a_relative_folder_is_completed_from_anywhere(tmp_path, monkeypatch):
    (tmp_path / 'results').mkdir()
    monkeypatch.chdir(tmp_path)
    paths = ['results/a.csv', 'results/b.pth']
    real_replace = os.replace

    def killed_at_the_renames(src, dst):
        if os.path.basename(dst) in ('a.csv', 'b.pth'):
            raise KeyboardInterrupt  # as if the process died after the commit
        real_replace(src, dst)
    monkeypatch.setattr(os, 'replace', killed_at_the_renames)
    with pytest.raises(KeyboardInterrupt):
        files.write_set([(p, lambda f: f.write(b'2')) for p in paths], 'results/.x.saving')
    monkeypatch.setattr(os, 'replace', real_replace)
    (tmp_path / 'results' / '..x.saving.k2j4.tmp').write_text('the temporary of a journal a kill cut short')
    monkeypatch.chdir('/')  # a requeued job started elsewhere, with --results_dir given absolutely
    folder = tmp_path / 'results'
    note = files.recover_set(str(folder / '.x.saving'), [str(folder / 'a.csv'), str(folder / 'b.pth')])
    assert note == (f"completed the saved set that an interruption left half renamed ({folder / '.x.saving'}); "
                    f"removed 1 temporary file(s) of an interrupted save")
    assert sorted(os.listdir(folder)) == ['a.csv', 'b.pth'] and (folder / 'b.pth').read_bytes() == b'2'
