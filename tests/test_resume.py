"""Interrupted runs: kill, resume, compare with an uninterrupted run; signals; non-finite loss."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import errors
import linear
import main
import report
import signals
from conftest import FP32, PIL, ROOT, TINY, csv_without, run_script, start, wait_for_file, wait_for_line

def same_csv(a, b, wall_clock):
    """Digit for digit the same in every column but the wall-clock ones (which no two runs share)."""
    rows = csv_without(a, wall_clock)
    assert len(rows) > 1 and len(rows[0]) >= 4
    return rows == csv_without(b, wall_clock)


def weights(path):
    return torch.load(path, weights_only=True)['model']


@pytest.fixture
def uninterrupted(uninterrupted_pil):
    return uninterrupted_pil


def test_sigkill_mid_epoch_then_resume_is_the_same_run(folder_data, uninterrupted, tmp_path):
    args = [*TINY, *PIL, '--data_root', folder_data, '--results_dir', tmp_path, '--epochs', 3, '--name', 'run']
    proc = start('main.py', args)
    wait_for_line(proc, 'epoch 1/3')
    wait_for_file(tmp_path / 'run_state.pth')  # epoch 1's set, written in the background, is on disk
    time.sleep(0.5)  # inside epoch 2 (4 steps of about half a second each)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stats = (tmp_path / 'run_statistics.csv').read_text()
    assert len(stats.splitlines()) == 2, 'the kill should land in epoch 2'
    # the set of epoch 1, or its picture, may still have been being written in the background: only such
    # temporary files can be left, and the next start on the name removes them
    left = [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]
    assert all(f.startswith(('.run_statistics.', '.run_state.pth.', '.run_model.pth.')) for f in left), left

    r = run_script('main.py', *args, '--resume', 'auto')
    assert r.returncode == 0, r.stderr
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]
    assert 'resuming after epoch 1 of 3' in r.stdout
    assert same_csv(tmp_path / 'run_statistics.csv', uninterrupted / 'run_statistics.csv', main.WALL_CLOCK)
    a, b = weights(tmp_path / 'run_model.pth'), weights(uninterrupted / 'run_model.pth')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_signal_keeps_the_last_state_and_says_how_to_resume(folder_data, uninterrupted, tmp_path, signum):
    args = [*TINY, *PIL, '--data_root', folder_data, '--results_dir', tmp_path, '--epochs', 3, '--name', 'run']
    proc = start('main.py', args)
    wait_for_line(proc, 'epoch 1/3')
    time.sleep(0.5)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert 'Traceback' not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f'main.py: interrupted by {signal.Signals(signum).name}; epochs 1-1 are saved in ')
    assert last.endswith('--resume auto')
    state = torch.load(tmp_path / 'run_state.pth', weights_only=True)
    assert state['epoch'] == 1 and len(state['rows']) == 1
    expected = csv_without(uninterrupted / 'run_statistics.csv', main.WALL_CLOCK)[:2]
    assert csv_without(tmp_path / 'run_statistics.csv', main.WALL_CLOCK) == expected


def test_batched_path_interrupted_and_resumed_is_the_same_run(folder_data, tmp_path, monkeypatch):
    def args(out):
        return main.parse_args([*TINY, '--aug', 'batched', '--data_root', folder_data, '--results_dir', str(out),
                                '--epochs', '3', '--num_workers', '0', '--name', 'run'])
    main.main(args(tmp_path / 'whole'))
    real = main.train_epoch

    def interrupted_in_epoch_2(model, batches, steps, optimizer, epoch, *rest, **kw):
        if epoch == 2:
            next(iter(batches))  # part of the epoch's data is drawn, then the signal arrives
            raise signals.Signal(signal.SIGTERM)
        return real(model, batches, steps, optimizer, epoch, *rest, **kw)
    monkeypatch.setattr(main, 'train_epoch', interrupted_in_epoch_2)
    with pytest.raises(errors.Interrupted, match='SIGTERM') as e:
        main.main(args(tmp_path / 'cut'))
    assert 'epochs 1-1 are saved' in e.value.saved
    monkeypatch.setattr(main, 'train_epoch', real)
    resumed = args(tmp_path / 'cut')
    resumed.resume = 'auto'
    main.main(resumed)
    assert same_csv(tmp_path / 'cut' / 'run_statistics.csv', tmp_path / 'whole' / 'run_statistics.csv',
                    main.WALL_CLOCK)
    a, b = weights(tmp_path / 'cut' / 'run_model.pth'), weights(tmp_path / 'whole' / 'run_model.pth')
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_run_but_allows_harmless_changes(folder_data, tmp_path):
    args = main.parse_args([*TINY, '--data_root', folder_data, '--results_dir', str(tmp_path), '--epochs', '1',
                            '--num_workers', '0', '--name', 'run'])
    main.main(args)
    before = (tmp_path / 'run_state.pth').read_bytes()
    with pytest.raises(errors.UserError, match='already holds the state of a run'):
        main.main(args)  # a fresh start must not overwrite a run
    for flag, value in (('--batch_size', '4'), ('--arch', 'resnet34'), ('--feature_dim', '32'), ('--epochs', '2')):
        changed = main.parse_args([*TINY, '--data_root', folder_data, '--results_dir', str(tmp_path), '--epochs', '1',
                                   '--name', 'run', flag, value, '--resume', 'auto'])
        with pytest.raises(errors.UserError, match=f'differ from the saved run: {flag} '):
            main.main(changed)
    assert (tmp_path / 'run_state.pth').read_bytes() == before
    harmless = main.parse_args([*TINY, '--data_root', folder_data, '--results_dir', str(tmp_path), '--epochs', '1',
                                '--name', 'run', '--num_workers', '1', '--resume', str(tmp_path / 'run_state.pth')])
    main.main(harmless)  # complete already: nothing to do, nothing rewritten
    assert (tmp_path / 'run_state.pth').read_bytes() == before


def test_non_finite_loss_stops_at_once_and_keeps_the_last_good_state(folder_data, tmp_path, monkeypatch):
    args = main.parse_args([*TINY, '--data_root', folder_data, '--results_dir', str(tmp_path), '--epochs', '3',
                            '--num_workers', '0', '--name', 'run'])
    real_loss = main.simsiam_loss
    calls = []

    def diverging(*a, **kw):  # the 7th step of the run (epoch 2, step 3 of 4) diverges
        calls.append(1)
        loss = real_loss(*a, **kw)
        return loss * float('nan') if len(calls) == 7 else loss
    monkeypatch.setattr(main, 'simsiam_loss', diverging)
    with pytest.raises(errors.UserError, match=r'the loss became nan at epoch 2, step 3; .* epoch 1 is kept'):
        main.main(args)
    assert len(calls) <= 8  # it stopped within the epoch
    state = torch.load(tmp_path / 'run_state.pth', weights_only=True)
    assert state['epoch'] == 1
    assert len((tmp_path / 'run_statistics.csv').read_text().splitlines()) == 2
    # the record says why the run stopped, and the report tells it apart from a run in progress
    record = json.loads((tmp_path / 'run_args.json').read_text())
    assert record['stopped'] == 'the loss became nan at epoch 2, step 3'
    rows = report.report(str(tmp_path))[1]
    assert [row['Epoch Num'] for row in rows] == ['1 of 3 (stopped: the loss became nan at epoch 2, step 3)']


def test_linear_sigkill_then_resume_is_the_same_run(folder_data, uninterrupted, tmp_path):
    model = uninterrupted / 'run_model.pth'
    base = ['--model_path', model, '--epochs', 3, '--batch_size', 8, '--device', 'cpu', '--num_workers', 2, *FP32]
    r = run_script('linear.py', *base, '--results_dir', tmp_path / 'whole')
    assert r.returncode == 0, r.stderr
    proc = start('linear.py', [*base, '--results_dir', tmp_path / 'cut'])
    wait_for_line(proc, 'epoch 1/3')
    wait_for_file(tmp_path / 'cut' / 'run_linear_state.pth')
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = run_script('linear.py', *base, '--results_dir', tmp_path / 'cut', '--resume', 'auto')
    assert r.returncode == 0, r.stderr
    assert 'resuming after epoch' in r.stdout
    assert same_csv(tmp_path / 'cut' / 'run_linear_statistics.csv', tmp_path / 'whole' / 'run_linear_statistics.csv',
                    linear.WALL_CLOCK)
    a = torch.load(tmp_path / 'cut' / 'run_linear_model.pth', weights_only=True)['head']
    b = torch.load(tmp_path / 'whole' / 'run_linear_model.pth', weights_only=True)['head']
    assert all(torch.equal(a[k], b[k]) for k in a)


WRITER = '''
import sys, torch
sys.path.insert(0, sys.argv[2])
import files
for i in range(1, 10 ** 6):
    files.save_checkpoint({"i": i, "x": torch.full((1_000_000,), float(i))}, sys.argv[1])
    print(i, flush=True)
'''


def test_a_file_being_replaced_is_never_seen_truncated(tmp_path):
    path = tmp_path / 'ckpt.pth'
    writer = subprocess.Popen([sys.executable, '-c', WRITER, str(path), ROOT], stdout=subprocess.PIPE, text=True)
    try:
        writer.stdout.readline()  # the first version is in place
        seen = set()
        for _ in range(200):
            ckpt = torch.load(path, weights_only=True)  # a truncated file would fail to load here
            assert bool((ckpt['x'] == ckpt['i']).all())
            seen.add(ckpt['i'])
        assert len(seen) > 1, 'the writer should have replaced the file while it was read'
    finally:
        writer.send_signal(signal.SIGKILL)  # killed at an arbitrary point of a write
        writer.wait()
    ckpt = torch.load(path, weights_only=True)
    assert bool((ckpt['x'] == ckpt['i']).all())
