"""Every bad input ends with one line on stderr, a non-zero status, no traceback and no damaged file."""
import os
import sys
import urllib.error

import pytest
import torch

import cli
import linear
import main
from conftest import TINY, run_script

TINY = [*TINY, '--epochs', '1']


@pytest.fixture(scope='module')
def bad_files(tmp_path_factory, finished):
    d = tmp_path_factory.mktemp('bad')
    (d / 'spare').mkdir()
    (d / 'spare' / 'keep_statistics.csv').write_text('epoch,train_loss\n1,0.5\n')
    (d / 'empty.pth').write_bytes(b'')
    (d / 'noise.pth').write_bytes(os.urandom(5000))
    (d / 'cut.pth').write_bytes((finished / 'run_model.pth').read_bytes()[:4000])
    torch.save(torch.load(finished / 'run_model.pth', weights_only=True)['model'], d / 'plain.pth')
    (d / 'notes').mkdir()
    (d / 'file').write_text('x')
    return d


def snapshot(folder):
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}


def run_cli(module, argv, monkeypatch, capsys):
    """The script's command-line entry point, in-process; returns (status, stderr)."""
    monkeypatch.setattr(sys, 'argv', [f'{module.__name__}.py', *map(str, argv)])
    try:
        status = cli.cli(module.main, module.parse_args)
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


MAIN_CASES = [
    (['--batch_size', '0'], 'argument --batch_size: must be a positive integer, got 0'),
    (['--batch_size', '-4'], 'argument --batch_size: must be a positive integer, got -4'),
    (['--batch_size', 'many'], "argument --batch_size: 'many' is not an integer"),
    (['--epochs', '0'], 'argument --epochs: must be a positive integer, got 0'),
    (['--k', '0'], 'argument --k: must be a positive integer, got 0'),
    (['--feature_dim', '0'], 'argument --feature_dim: must be a positive integer, got 0'),
    (['--pred_dim', '-1'], 'argument --pred_dim: must be a positive integer, got -1'),
    (['--lr', '0'], 'argument --lr: must be a positive number, got 0'),
    (['--lr', 'nan'], 'argument --lr: must be a positive number, got nan'),
    (['--knn_t', '0'], 'argument --knn_t: must be a positive number, got 0'),
    (['--knn_t', '-0.1'], 'argument --knn_t: must be a positive number, got -0.1'),
    (['--arch', 'vgg16'], "argument --arch: invalid choice: 'vgg16'"),
    (['--dataset', 'imagenet'], "argument --dataset: invalid choice: 'imagenet'"),
    (['--batch_size', '500'], '--batch_size 500 is larger than the training set (32 images): no step would run'),
    (['--data_root', '{bad}/nowhere'], "--data_root '{bad}/nowhere' does not exist"),
    (['--data_root', '{bad}/notes'], "--dataset folder: '{bad}/notes/train' is not a directory"),
    (['--results_dir', '{bad}/file/sub'], "--results_dir '{bad}/file/sub' is not writable"),
    (['--resume', '{bad}/missing.pth'], "--resume '{bad}/missing.pth' does not exist"),
    (['--resume', '{bad}/empty.pth'], "--resume '{bad}/empty.pth' is empty"),
    (['--resume', '{bad}/cut.pth'], "--resume '{bad}/cut.pth' is not a checkpoint written by torch.save"),
    (['--resume', '{bad}/noise.pth'], "--resume '{bad}/noise.pth' is not a checkpoint written by torch.save"),
    (['--resume', '{out}/run_statistics.csv'], 'is not a checkpoint written by torch.save'),
    (['--resume', '{out}/run_linear_state.pth'], "is a 'simsiam_linear_state' file"),
    (['--resume', '{out}/run_model.pth'], "is a 'simsiam_model' file"),
    (['--resume', '{bad}/plain.pth'], 'is not a file written by main.py or linear.py (top-level keys: backbone.'),
    (['--predictor', 'none', '--fix_pred_lr'],
     "--fix_pred_lr keeps a trained predictor's lr fixed, but --predictor none has none to train"),
]
if not torch.cuda.is_available():
    MAIN_CASES.append((['--device', 'cuda'], '--device cuda: CUDA is not available on this machine'))


@pytest.mark.parametrize('extra,message', MAIN_CASES)
def test_main_bad_input(extra, message, folder_data, finished, bad_files, monkeypatch, capsys):
    fill = lambda s: s.format(bad=bad_files, out=finished)
    argv = [*TINY, '--data_root', folder_data, '--results_dir', str(finished),
            '--name', 'other', *map(fill, extra)]
    before = snapshot(finished)
    status, err = run_cli(main, argv, monkeypatch, capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('main.py: error: '), err
    assert fill(message) in lines[0]
    assert snapshot(finished) == before


LINEAR_CASES = [
    (['--model_path', '{bad}/missing.pth'], "--model_path '{bad}/missing.pth' does not exist"),
    (['--model_path', '{bad}/empty.pth'], "--model_path '{bad}/empty.pth' is empty"),
    (['--model_path', '{bad}/cut.pth'], 'is not a checkpoint written by torch.save'),
    (['--model_path', '{bad}/noise.pth'], 'is not a checkpoint written by torch.save'),
    (['--model_path', '{out}/run_statistics.csv'], 'is not a checkpoint written by torch.save'),
    (['--model_path', '{bad}/plain.pth'], 'is not a file written by main.py or linear.py'),
    (['--model_path', '{out}/run_linear_model.pth'], "is a 'simsiam_linear' file"),
    (['--resume', '{out}/run_state.pth'], "--resume '{out}/run_state.pth' is a 'simsiam_state' file"),
    (['--resume', '{bad}/noise.pth'], 'is not a checkpoint written by torch.save'),
    (['--epochs', '0'], 'argument --epochs: must be a positive integer, got 0'),
    (['--lr', '-30'], 'argument --lr: must be a positive number, got -30'),
    (['--batch_size', '100'], '--batch_size 100 is larger than the training set (32 images)'),
    (['--dataset', 'svhn'], "argument --dataset: invalid choice: 'svhn'"),
    (['--data_root', '{bad}/nowhere'], "--data_root '{bad}/nowhere' does not exist"),
    (['--results_dir', '{bad}/file/sub'], "--results_dir '{bad}/file/sub' is not writable"),
    (['--results_dir', '{out}'], "'{out}/run_linear_state.pth' already holds the state of a run"),
]


@pytest.mark.parametrize('extra,message', LINEAR_CASES)
def test_linear_bad_input(extra, message, finished, bad_files, monkeypatch, capsys):
    fill = lambda s: s.format(bad=bad_files, out=finished)
    argv = ['--model_path', str(finished / 'run_model.pth'), '--results_dir', str(bad_files / 'spare'),
            '--device', 'cpu', '--num_workers', '0', *map(fill, extra)]
    before = snapshot(finished), snapshot(bad_files / 'spare')
    status, err = run_cli(linear, argv, monkeypatch, capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('linear.py: error: '), err
    assert fill(message) in lines[0]
    assert (snapshot(finished), snapshot(bad_files / 'spare')) == before


def test_cifar_missing_offline(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')
    monkeypatch.setattr(cifar, 'download_and_extract_archive', offline)
    status, err = run_cli(main, [*TINY, '--dataset', 'cifar10', '--data_root', tmp_path / 'data',
                                 '--results_dir', tmp_path / 'r'],
                          monkeypatch, capsys)
    assert status == 2
    assert err.strip().splitlines() == [
        f"main.py: error: cifar10 is not in '{tmp_path / 'data'}' and could not be downloaded ([Errno -3] "
        f"Temporary failure in name resolution); on a machine with internet fetch "
        f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and put cifar-10-python.tar.gz in "
        f"{tmp_path / 'data'}/"]
    assert not os.listdir(tmp_path / 'r')


def test_k_larger_than_the_bank_is_clamped_with_a_warning(folder_data, tmp_path, capsys):
    main.main(main.parse_args([*TINY, '--k', '500', '--data_root', folder_data,
                               '--results_dir', str(tmp_path), '--name', 'k']))
    assert 'warning: --k 500 is larger than the kNN bank (32 images); using k=32' in capsys.readouterr().err
    assert (tmp_path / 'k_statistics.csv').exists()


def test_as_a_command_no_traceback(bad_files):
    for script, args in (('main.py', ['--knn_t', '0']), ('linear.py', ['--model_path', bad_files / 'noise.pth'])):
        r = run_script(script, *args)
        assert r.returncode == 2 and 'Traceback' not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
