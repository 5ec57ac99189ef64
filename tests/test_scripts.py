"""main.py then linear.py end to end on generated data, as subprocesses and in-process."""
import os

import numpy as np
import pandas as pd
import pytest
import torch

import errors
import linear
import main
from conftest import FP32, TINY, csv_without, run_script, write_cifar10, write_folder

PRETRAIN_COLUMNS = ['epoch', 'train_loss', 'test_acc@1', 'test_acc@5']
LINEAR_COLUMNS = ['epoch', 'train_loss', 'train_acc@1', 'train_acc@5', 'test_loss', 'test_acc@1', 'test_acc@5']


def test_folder_end_to_end(folder_data, tmp_path):
    out = tmp_path / 'results'
    r = run_script('main.py', *TINY, '--epochs', '2', '--data_root', folder_data,
                   '--results_dir', out, '--num_workers', '2', '--aug', 'pil')
    assert r.returncode == 0, r.stderr
    name = 'resnet18_folder_64_5_8_2'
    assert sorted(os.listdir(out)) == sorted(f'{name}_{suffix}' for suffix in (
        'model.pth', 'state.pth', 'statistics.csv', 'statistics.png', 'neighbours.png', 'args.json'))
    stats = pd.read_csv(out / f'{name}_statistics.csv')
    assert list(stats.columns[:4]) == PRETRAIN_COLUMNS
    assert stats['epoch'].tolist() == [1, 2]
    assert stats['test_acc@1'].between(0, 100).all() and stats['test_acc@5'].between(0, 100).all()
    assert 'params: backbone 11.17 M' in r.stdout and 'FLOPs 0.56 G' in r.stdout
    assert 'speed: aug pil, amp off' in r.stdout

    ckpt = torch.load(out / f'{name}_model.pth', weights_only=True)
    assert ckpt['model_args'] == {'arch': 'resnet18', 'feature_dim': 64, 'pred_dim': 16, 'proj_hidden_dim': 64,
                                  'predictor': 'mlp', 'mlp_bn': 'default', 'stop_grad': True, 'stem': 'cifar',
                                  'proj_layers': 2, 'proj_out_affine': True}
    assert ckpt['epoch'] == 2 and ckpt['args']['dataset'] == 'folder'

    r = run_script('linear.py', '--model_path', out / f'{name}_model.pth', '--results_dir', out,
                   '--epochs', '2', '--batch_size', '16', '--num_workers', '2', '--device', 'cpu', '--aug', 'pil',
                   *FP32)
    assert r.returncode == 0, r.stderr
    stats = pd.read_csv(out / f'{name}_linear_statistics.csv')
    assert list(stats.columns[:7]) == LINEAR_COLUMNS and stats['epoch'].tolist() == [1, 2]
    assert all((out / f'{name}_linear_{suffix}').exists() for suffix in ('statistics.png', 'args.json', 'state.pth'))
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith('done: csv ') and f'test acc@1 last {stats["test_acc@1"].iloc[-1]:.2f}% (epoch 2)' in last
    head = torch.load(out / f'{name}_linear_model.pth', weights_only=True)
    assert head['head']['weight'].shape == (4, 512)
    # the backbone saved with the head is the pretrained one, unchanged
    for key, value in head['backbone'].items():
        assert torch.equal(value, ckpt['model']['backbone.' + key]), key


def test_cifar10_code_path(tmp_path, cifar_files_ok, capsys):
    data = write_cifar10(tmp_path / 'data', 40, 20)
    args = main.parse_args(TINY + ['--epochs', '1', '--dataset', 'cifar10', '--data_root', data,
                                   '--results_dir', str(tmp_path / 'r')])
    main.main(args)
    assert 'speed: aug batched, amp off, channels_last off' in capsys.readouterr().out
    name = 'resnet18_cifar10_64_5_8_1'
    stats = pd.read_csv(tmp_path / 'r' / f'{name}_statistics.csv')
    assert list(stats.columns[:4]) == PRETRAIN_COLUMNS and len(stats) == 1
    linear.main(linear.parse_args(['--model_path', str(tmp_path / 'r' / f'{name}_model.pth'), '--epochs', '1',
                                   '--batch_size', '16', '--num_workers', '0', *FP32, '--device', 'cpu',
                                   '--results_dir', str(tmp_path / 'r')]))
    stats = pd.read_csv(tmp_path / 'r' / f'{name}_linear_statistics.csv')
    assert list(stats.columns[:7]) == LINEAR_COLUMNS and len(stats) == 1


def test_same_seed_same_csv(folder_data, tmp_path):
    tables = []
    for run in ('a', 'b'):
        args = main.parse_args(TINY + ['--epochs', '2', '--data_root', folder_data,
                                       '--results_dir', str(tmp_path / run)])
        main.main(args)
        tables.append(csv_without(tmp_path / run / 'resnet18_folder_64_5_8_2_statistics.csv', main.WALL_CLOCK))
    assert tables[0] == tables[1] and len(tables[0]) == 3
    args.seed = 1
    args.results_dir = str(tmp_path / 'c')
    main.main(args)
    assert csv_without(tmp_path / 'c' / 'resnet18_folder_64_5_8_2_statistics.csv', main.WALL_CLOCK) != tables[0]


def test_knn_every_leaves_gaps_and_always_measures_the_last_epoch(folder_data, tmp_path):
    args = main.parse_args(TINY + ['--epochs', '3', '--knn_every', '2',
                                   '--data_root', folder_data, '--results_dir', str(tmp_path), '--name', 'gaps'])
    main.main(args)
    stats = pd.read_csv(tmp_path / 'gaps_statistics.csv')
    assert stats['test_acc@1'].isna().tolist() == [True, False, False]


def test_linear_refuses_a_checkpoint_that_does_not_fit(folder_data, tmp_path):
    args = main.parse_args(TINY + ['--epochs', '1', '--data_root', folder_data,
                                   '--results_dir', str(tmp_path), '--name', 'run'])
    main.main(args)
    ckpt = torch.load(tmp_path / 'run_model.pth', weights_only=True)
    ckpt['model_args']['arch'] = 'resnet34'  # the weights are a resnet18's
    torch.save(ckpt, tmp_path / 'wrong_model.pth')
    torch.save(ckpt['model'], tmp_path / 'plain_model.pth')
    torch.save({**ckpt, 'model_args': {**ckpt['model_args'], 'arch': 'resnet18', 'stem': 'imagenet'}},
               tmp_path / 'stem_model.pth')  # the weights are the CIFAR stem's
    for path, message in (('wrong_model.pth', r'does not fit a resnet34 backbone \(cifar stem\): missing'),
                          ('stem_model.pth', r'does not fit a resnet18 backbone \(imagenet stem\): size mismatch for '
                                             r'conv1.weight'),
                          ('plain_model.pth', 'not a file written by main.py'),
                          ('run_statistics.csv', 'not a checkpoint')):
        with pytest.raises(errors.UserError, match=message):
            linear.main(linear.parse_args(['--model_path', str(tmp_path / path), '--results_dir', str(tmp_path),
                                           '--device', 'cpu']))
    assert not any('linear' in f for f in os.listdir(tmp_path))


def test_bad_input_is_one_line_without_traceback(tmp_path):
    r = run_script('linear.py', '--model_path', tmp_path / 'nope.pth')
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"linear.py: error: --model_path '{tmp_path / 'nope.pth'}' does not exist"]
    r = run_script('main.py', '--batch_size', '0')
    assert r.returncode == 2 and 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert '--batch_size: must be a positive integer' in r.stderr


def test_bf16_autocast_gives_a_finite_float32_loss(tmp_path):
    root = write_folder(tmp_path / 'data', 1, 1)  # 4 images: bf16 convolutions are slow on most CPUs
    args = main.parse_args(TINY + ['--epochs', '1', '--batch_size', '4', '--k', '2', '--amp', 'on',
                                   '--data_root', root, '--results_dir', str(tmp_path / 'r'), '--name', 'bf16'])
    main.main(args)
    stats = pd.read_csv(tmp_path / 'r' / 'bf16_statistics.csv')
    assert stats['train_loss'].dtype == 'float64' and np.isfinite(stats['train_loss']).all()
    # the loss is computed in float32: its CSV value is not a bf16 number (8 bits of mantissa)
    value = float(stats['train_loss'][0])
    assert torch.tensor(value).bfloat16().float().item() != value
    assert stats['test_acc@1'].between(0, 100).all()


def test_linear_evaluates_a_run_in_progress_from_its_state(finished, tmp_path):
    linear.main(linear.parse_args(['--model_path', str(finished / 'run_state.pth'), '--results_dir', str(tmp_path),
                                   '--epochs', '1', '--batch_size', '8', '--device', 'cpu', '--num_workers', '0',
                                   *FP32]))
    state = torch.load(finished / 'run_state.pth', weights_only=True)
    saved = torch.load(tmp_path / 'run_linear_model.pth', weights_only=True)  # named after <name>_state.pth
    for key, value in saved['backbone'].items():
        assert torch.equal(value, state['model']['backbone.' + key]), key
    assert len(pd.read_csv(tmp_path / 'run_linear_statistics.csv')) == 1


def test_linear_evaluates_a_model_file_of_the_earlier_layout(finished, tmp_path):
    # model files written before the model file and the state shared one layout held the weights under
    # 'state_dict'
    model = torch.load(finished / 'run_model.pth', weights_only=True)
    old = {('state_dict' if k == 'model' else k): v for k, v in model.items()}
    assert 'model' not in old
    torch.save(old, tmp_path / 'run_model.pth')
    linear.main(linear.parse_args(['--model_path', str(tmp_path / 'run_model.pth'), '--results_dir', str(tmp_path),
                                   '--epochs', '1', '--batch_size', '8', '--device', 'cpu', '--num_workers', '0',
                                   *FP32]))
    saved = torch.load(tmp_path / 'run_linear_model.pth', weights_only=True)
    for key, value in saved['backbone'].items():
        assert torch.equal(value, model['model']['backbone.' + key]), key
    assert len(pd.read_csv(tmp_path / 'run_linear_statistics.csv')) == 1
