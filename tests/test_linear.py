"""Linear evaluation that holds on any features: the normalised probe, a grid of learning rates trained on
one pass of the backbone, chosen on a validation split, with divergence visible."""
import math
import os
import re
import signal
import sys

import pandas as pd
import pytest
import torch

import cli
import errors
import linear
import probe
import signals
import utils
from conftest import FP32, csv_without
from probe import Probe, ProbeGrid

CLASSES = 4


def offset_features(n=512, dim=64, seed=0):
    """Features like a frozen ReLU backbone's: all positive, a large common mean and scale, and a class
    signal that is a small part of them."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    centres = torch.randn(CLASSES, dim, generator=g)
    x = 40.0 + 8.0 * torch.rand(n, dim, generator=g) + 2.0 * centres[labels]
    return x, labels


def batches_of(x, y, size=32):
    return [([x[i:i + size]], y[i:i + size]) for i in range(0, len(x), size)]


def train_probe(norm, lr, epochs=3, features=lambda x: x):
    torch.manual_seed(0)
    x, y = offset_features()
    head = Probe(x.size(1), CLASSES, norm)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr * 32 / 256, momentum=0.9)
    results = []
    for epoch in range(1, epochs + 1):
        (result,), diverged = probe.train_epoch(features, [head], batches_of(x, y), [optimizer], epoch)
        if diverged:
            return results, diverged[0]
        results.append(result)
    return results, None


def test_the_bn_probe_trains_at_lr_30_on_offset_features_and_the_plain_one_does_not():
    bn, stopped = train_probe('bn', 30.0)
    assert stopped is None
    assert bn[-1][0] < math.log(CLASSES) and bn[-1][1] > 90  # a sane loss, and it has learnt the classes
    plain, stopped = train_probe('none', 30.0)
    # the logits blow up: the loss is far above that of a uniform guess, or not even finite
    assert stopped is not None or probe.blowing_up(plain[-1][0], CLASSES), plain


def test_a_grid_trains_every_head_on_one_pass_of_the_backbone_each_as_if_alone():
    x, y = offset_features()
    calls = []

    def backbone(batch):
        calls.append(len(batch))
        return batch
    lrs = [0.1, 1.0, 10.0]
    heads, optimizers = [], []
    for lr in lrs:
        torch.manual_seed(0)
        heads.append(Probe(x.size(1), CLASSES, 'bn'))
        optimizers.append(torch.optim.SGD(heads[-1].parameters(), lr=lr * 32 / 256, momentum=0.9))
    results, diverged = probe.train_epoch(backbone, heads, batches_of(x, y), optimizers, 1)
    assert not diverged and len(calls) == len(batches_of(x, y))  # the backbone once per batch, not per head
    for lr, head, result in zip(lrs, heads, results):
        torch.manual_seed(0)
        alone = Probe(x.size(1), CLASSES, 'bn')
        optimizer = torch.optim.SGD(alone.parameters(), lr=lr * 32 / 256, momentum=0.9)
        (single,), _ = probe.train_epoch(lambda b: b, [alone], batches_of(x, y), [optimizer], 1)
        assert single == result
        assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(), head.state_dict().values()))


def test_selection_looks_at_the_validation_numbers_only():
    val_acc = {0: 40.0, 1: 75.0, 2: 60.0}
    assert probe.select_head(val_acc, [0, 1, 2]) == 1
    assert probe.select_head(val_acc, [0, 2]) == 2  # a diverged head is never chosen
    assert probe.select_head({0: 50.0, 1: 50.0}, [0, 1]) == 0  # a tie goes to the first


def test_the_validation_split_is_fixed_by_the_seed_and_disjoint_from_training():
    data = utils.ImageSet(torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 3, 1, 1).contiguous(),
                          torch.arange(40) % 4, list('abcd'))
    rest, held = utils.split_off(data, 0.25, seed=3)
    assert len(held) == 10 and len(rest) == 30
    ids = lambda s: set(s.images[:, 0, 0, 0].tolist())
    assert ids(rest) | ids(held) == set(range(40)) and not ids(rest) & ids(held)
    assert ids(utils.split_off(data, 0.25, seed=3)[1]) == ids(held)
    assert ids(utils.split_off(data, 0.25, seed=4)[1]) != ids(held)
    assert len(utils.split_off(data, 0.0, seed=3)[1]) == 0


# ----------------------------------------------------------------------------- end to end

GRID = ['0.5', '5', '30']


def evaluate(finished, out, *extra, lr=','.join(GRID)):
    linear.main(linear.parse_args(['--model_path', str(finished / 'run_model.pth'), '--results_dir', str(out),
                                   '--epochs', '3', '--batch_size', '8', '--device', 'cpu', '--num_workers', '0', *FP32,
                                   '--val_split', '0.25', '--lr', lr, *extra]))
    return pd.read_csv(out / 'run_linear_statistics.csv')


@pytest.fixture(scope='module')
def grid_run(finished, tmp_path_factory):
    out = tmp_path_factory.mktemp('grid')
    return out, evaluate(finished, out)


def test_a_grid_run_equals_single_value_runs_and_reports_the_head_chosen_on_validation(finished, grid_run,
                                                                                        tmp_path):
    out, grid = grid_run
    for value in GRID:
        single = evaluate(finished, tmp_path / value, lr=value)
        for column in ('train_loss', 'train_acc@1', 'val_acc@1', 'test_acc@1', 'test_acc@5'):
            assert grid[f'lr={float(value):g}:{column}'].tolist() == single[column].tolist(), (value, column)
    val = grid[[f'lr={float(v):g}:val_acc@1' for v in GRID]].to_numpy()
    chosen = [float(GRID[i]) for i in val.argmax(axis=1)]  # argmax takes the first of equals, as select_head
    assert grid['head_lr'].tolist() == chosen
    for row, lr in zip(grid.itertuples(index=False), chosen):
        assert row[list(grid.columns).index('test_acc@1')] == grid[f'lr={lr:g}:test_acc@1'][row.epoch - 1]
    model = torch.load(out / 'run_linear_model.pth', weights_only=True)
    assert model['head_lr'] == chosen[-1]  # the saved model holds the head chosen
    state = torch.load(out / 'run_linear_state.pth', weights_only=True)
    best = state['probe']['heads']
    index = [float(v) for v in GRID].index(chosen[-1])
    assert all(torch.equal(model['head'][k], best[f'{index}.{k}']) for k in model['head'])


def interrupted_in_epoch_2(finished, out, monkeypatch):
    """The grid evaluation into `out`, stopped by SIGTERM in epoch 2 (epoch 1 saved)."""
    real = probe.train_epoch

    def interrupted(features, heads, batches, optimizers, epoch, *rest, **kw):
        if epoch == 2:
            raise signals.Signal(signal.SIGTERM)
        return real(features, heads, batches, optimizers, epoch, *rest, **kw)
    monkeypatch.setattr(probe, 'train_epoch', interrupted)
    with pytest.raises(errors.Interrupted):
        evaluate(finished, out)
    monkeypatch.setattr(probe, 'train_epoch', real)


def test_a_grid_interrupted_and_resumed_is_the_same_run(finished, grid_run, tmp_path, monkeypatch):
    interrupted_in_epoch_2(finished, tmp_path, monkeypatch)
    evaluate(finished, tmp_path, '--resume', 'auto')
    assert csv_without(tmp_path / 'run_linear_statistics.csv', linear.WALL_CLOCK) == \
        csv_without(grid_run[0] / 'run_linear_statistics.csv', linear.WALL_CLOCK)


def legacy_layout(probe_state, single):
    """A linear.py state's probe as states written before the grid was one object held it, at the top level."""
    if single:
        return {'head': {k[len('0.'):]: v for k, v in probe_state['heads'].items()},
                'optimizer': probe_state['optimizers'][0], 'dead': probe_state['dead'], 'warned': probe_state['warned']}
    return {'heads': probe_state['heads'], 'optimizer': probe_state['optimizers'], 'dead': probe_state['dead'],
            'warned': probe_state['warned']}


def test_a_grid_state_of_the_earlier_layout_resumes_as_the_same_run(finished, grid_run, tmp_path, monkeypatch):
    interrupted_in_epoch_2(finished, tmp_path, monkeypatch)
    path = tmp_path / 'run_linear_state.pth'
    state = torch.load(path, weights_only=True)
    rest = {k: v for k, v in state.items() if k != 'probe'}
    torch.save({**rest, **legacy_layout(state['probe'], single=False)}, path)
    evaluate(finished, tmp_path, '--resume', 'auto')
    assert csv_without(tmp_path / 'run_linear_statistics.csv', linear.WALL_CLOCK) == \
        csv_without(grid_run[0] / 'run_linear_statistics.csv', linear.WALL_CLOCK)


def test_a_single_head_state_of_the_earlier_layout_loads_into_a_grid_of_one():
    x, y = offset_features()
    trained = ProbeGrid(x.size(1), CLASSES, [1.0], 'bn', 32, 0.9, 0, 'cpu')
    trained.set_epoch(1, 3)
    trained.train_epoch(lambda b: b, batches_of(x, y), 1)
    saved = trained.state_dict()
    legacy = legacy_layout(saved, single=True)
    assert set(legacy['head']) == {k[2:] for k in saved['heads']}  # the single head's keys have no index
    fresh = ProbeGrid(x.size(1), CLASSES, [1.0], 'bn', 32, 0.9, 1, 'cpu')
    fresh.load_state_dict(probe.saved_probe({'epoch': 1, **legacy}))
    assert all(torch.equal(a, b) for a, b in zip(fresh.heads.state_dict().values(), saved['heads'].values()))
    momentum = lambda grid: [s['momentum_buffer'] for s in grid.optimizers[0].state_dict()['state'].values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum(fresh), momentum(trained))) and momentum(fresh)
    # a state of today's layout passes through unchanged
    assert probe.saved_probe({'epoch': 1, 'probe': saved})['heads'] is saved['heads']


def test_the_frozen_backbone_is_copied_to_the_host_only_in_epochs_that_write_the_model(finished, tmp_path,
                                                                                         monkeypatch):
    import files
    real, copied = files.host_copy, []

    def recording(obj, *a, **kw):
        if isinstance(obj, dict) and obj.get('kind') == 'simsiam_linear':
            copied.append(obj['epoch'])
        return real(obj, *a, **kw)
    monkeypatch.setattr(files, 'host_copy', recording)
    evaluate(finished, tmp_path, '--save_every', '2', lr='1')  # 3 epochs: the model is written after 2 and 3
    assert copied == [2, 3]
    assert torch.load(tmp_path / 'run_linear_model.pth', weights_only=True)['epoch'] == 3


def test_a_diverging_head_stops_alone_and_says_so(finished, tmp_path, capsys):
    # 1e39, not 1e38: at 1e38 the training loss stays finite here (huge) and the test logits overflow first
    stats = evaluate(finished, tmp_path, '--probe_norm', 'none', lr='1,1e39')
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if 'diverged' in line]
    assert len(lines) == 1, err
    found = re.fullmatch(r'linear\.py: head lr=1e\+39 diverged: the loss became (nan|inf) at epoch (\d), step (\d+); '
                         r'it stops, the other heads go on', lines[0])
    assert found, lines[0]
    stopped = int(found.group(2))
    after = stats['epoch'] >= stopped
    assert stats['lr=1:train_loss'].notna().all()  # the other head went on to the end
    assert stats.loc[after, 'lr=1e+39:train_loss'].isna().all() and stats.loc[~after, 'lr=1e+39:train_loss'].notna().all()
    assert (stats.loc[after, 'head_lr'] == 1.0).all()  # a diverged head is never the one reported
    assert len(stats) == 3


def test_a_head_whose_last_step_blows_it_up_is_never_chosen(finished, tmp_path, capsys):
    # one step an epoch: the training loss of lr 1e39 is that of the weights before its step, still finite,
    # and its validation and test logits after it are not
    stats = evaluate(finished, tmp_path, '--probe_norm', 'none', '--batch_size', '24', lr='1,1e39')
    lines = [line for line in capsys.readouterr().err.splitlines() if 'diverged' in line]
    assert len(lines) == 1 and re.fullmatch(r'linear\.py: head lr=1e\+39 diverged: the (test|validation) loss became '
                                            r'(nan|inf) after epoch 1; it stops, the other heads go on', lines[0]), lines
    assert (stats['head_lr'] == 1.0).all() and stats['lr=1e+39:val_acc@1'].isna().all()
    assert torch.load(tmp_path / 'run_linear_model.pth', weights_only=True)['head_lr'] == 1.0


def test_resuming_an_evaluation_of_a_pretraining_that_moved_on_is_refused(finished, tmp_path, capsys):
    model = torch.load(finished / 'run_model.pth', weights_only=True)
    torch.save({**model, 'epoch': 1}, tmp_path / 'run_model.pth')  # a run in progress, evaluated at epoch 1
    args = ['--model_path', str(tmp_path / 'run_model.pth'), '--results_dir', str(tmp_path / 'out'), '--epochs', '1',
            '--batch_size', '8', '--device', 'cpu', '--num_workers', '0', *FP32, '--lr', '1']
    linear.main(linear.parse_args(args))
    torch.save({**model, 'epoch': 2}, tmp_path / 'run_model.pth')  # the pretraining went on
    before = sorted(os.listdir(tmp_path / 'out'))
    with pytest.raises(errors.UserError) as e:
        linear.main(linear.parse_args([*args, '--resume', 'auto']))
    assert str(e.value) == (f"--resume: the saved evaluation is of pretraining epoch 1, but "
                            f"'{tmp_path / 'run_model.pth'}' now holds epoch 2; evaluate it afresh under another "
                            f"--name or --results_dir")
    assert sorted(os.listdir(tmp_path / 'out')) == before


def test_a_loss_far_above_a_uniform_guess_gives_one_warning(finished, tmp_path, capsys):
    stats = evaluate(finished, tmp_path, '--probe_norm', 'none', lr='300')
    err = capsys.readouterr().err
    assert probe.blowing_up(stats['train_loss'].iloc[0], CLASSES), stats  # 34 here, against ln(4) = 1.39
    assert err.count('warning: linear head lr=300: training loss ') == 1  # once, though every epoch is as bad
    assert f'is far above ln(4) = {math.log(4):.2f}, the loss of a uniform guess' in err
    assert all(probe.blowing_up(loss, CLASSES) for loss in stats['train_loss'])


@pytest.mark.parametrize('extra,message', [
    (['--lr', '1,10', '--val_split', '0'], '--lr with several values needs --val_split above 0'),
    (['--lr', '1,x'], "argument --lr: 'x' is not a number"),
    (['--lr', '1,1'], "argument --lr: '1,1' names a value twice"),
    (['--lr', '1,-2'], 'argument --lr: must be a positive number, got -2'),
    (['--val_split', '1'], 'argument --val_split: must be at least 0 and under 1, got 1'),
    (['--probe_norm', 'ln'], "argument --probe_norm: invalid choice: 'ln'"),
    (['--lr', '1,10', '--val_split', '0.01', '--batch_size', '8'],
     '--val_split 0.01 holds out no image of the 32 training images'),
    (['--lr', '1e300', '--batch_size', '8'], '--lr 1e+300 gives SGD an lr of 3.13e+298 (x batch_size 8 / 256), beyond'),
])
def test_bad_grid_flags_are_one_line(extra, message, finished, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, 'argv', ['linear.py', '--model_path', str(finished / 'run_model.pth'),
                                      '--results_dir', str(tmp_path), '--device', 'cpu', *extra])
    try:
        status = cli.cli(linear.main, linear.parse_args)
    except SystemExit as e:
        status = e.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and message in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_a_grid_of_bn_probes_trains_with_lars():
    x, y = offset_features()
    # LARS steps a weight by lr x 0.001 x its norm: over these 48 steps (ImageNet's protocol takes 28k) a
    # high lr learns, a low one barely moves
    grid = ProbeGrid(x.size(1), CLASSES, [10.0, 100.0], 'bn', 32, 0.9, 0, 'cpu', optimizer='lars')
    assert all(type(o).__name__ == 'LARS' for o in grid.optimizers)
    for epoch in range(1, 4):
        grid.set_epoch(epoch, 3)
        results = grid.train_epoch(lambda b: b, batches_of(x, y), epoch)
    assert not grid.dead and all(math.isfinite(r[0]) for r in results)
    assert results[1][1] > 90 and results[1][0] < math.log(CLASSES), results  # lr 100 has learnt the classes
    before = [p.clone() for p in grid.heads.parameters()]
    state = grid.state_dict()
    again = ProbeGrid(x.size(1), CLASSES, [10.0, 100.0], 'bn', 32, 0.9, 1, 'cpu', optimizer='lars')
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(again.heads.parameters(), before))
