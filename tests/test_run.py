"""The life of a run below the scripts: atomic files and checkpoints, signals, the device, the schedule."""
import math
import os
import signal
import time

import pytest
import torch

import files
import launch
import run


# ----------------------------------------------------------------------------- files

def test_atomic_open_replaces_or_keeps(tmp_path):
    path = tmp_path / 'f.txt'
    with files.atomic_open(str(path), 'w') as f:
        f.write('old')
    with pytest.raises(ZeroDivisionError):
        with files.atomic_open(str(path), 'w') as f:
            f.write('half')
            1 / 0
    assert path.read_text() == 'old'
    assert os.listdir(tmp_path) == ['f.txt']  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not mkstemp's 0600


def test_load_checkpoint_refuses_what_it_cannot_use(tmp_path):
    good = tmp_path / 'good.pth'
    files.save_checkpoint({'kind': 'simsiam_model', 'x': torch.ones(2)}, str(good))
    assert files.load_checkpoint(str(good), ('simsiam_model',), '--model_path')['x'].sum() == 2
    (tmp_path / 'empty.pth').write_bytes(b'')
    (tmp_path / 'noise.pth').write_bytes(os.urandom(4096))
    (tmp_path / 'table.csv').write_text('epoch,train_loss\n1,0.5\n')
    (tmp_path / 'cut.pth').write_bytes(good.read_bytes()[:200])
    torch.save({'conv1.weight': torch.ones(1)}, tmp_path / 'plain.pth')
    cases = {'missing.pth': 'does not exist', 'empty.pth': 'is empty', 'noise.pth': 'not a checkpoint',
             'table.csv': 'not a checkpoint', 'cut.pth': 'not a checkpoint', 'plain.pth': 'top-level keys: conv1'}
    for name, message in cases.items():
        with pytest.raises(launch.UserError, match=message):
            files.load_checkpoint(str(tmp_path / name), ('simsiam_model',), '--model_path')
    with pytest.raises(launch.UserError, match="a 'simsiam_model' file"):
        files.load_checkpoint(str(good), ('simsiam_linear',), '--model_path')


def test_resolve_device():
    assert launch.resolve_device('cpu') == torch.device('cpu')
    with pytest.raises(launch.UserError):
        launch.resolve_device('gpu0')
    if not torch.cuda.is_available():
        with pytest.raises(launch.UserError, match='CUDA is not available'):
            launch.resolve_device('cuda')
        assert launch.resolve_device('auto') == torch.device('cpu')


def test_a_signal_during_a_deferred_block_is_taken_after_it():
    finished = []
    with pytest.raises(launch._Signal) as e:
        with launch.signals_raise():
            with launch.signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler has run by now; it only noted the signal
                finished.append(True)
    assert finished == [True] and e.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


# ----------------------------------------------------------------------------- schedule

def test_cosine_lr():
    assert run.cosine_lr(0.06, 0, 800) == pytest.approx(0.06)
    assert run.cosine_lr(0.06, 400, 800) == pytest.approx(0.03)
    assert run.cosine_lr(0.06, 200, 800) == pytest.approx(0.03 * (1 + math.sqrt(0.5)))
    assert run.cosine_lr(0.06, 799, 800) < 1e-5


# ----------------------------------------------------------------------------- what the device decides

def test_auto_speed_settings_follow_the_device_type():
    cuda = launch.resolve_speed(torch.device('cuda', 0))  # a device object needs no GPU
    assert (cuda.aug, cuda.amp, cuda.channels_last, cuda.compile) == ('batched', True, True, False)
    cpu = launch.resolve_speed(torch.device('cpu'))
    assert (cpu.aug, cpu.amp, cpu.channels_last) == ('batched', False, False)
    forced = launch.resolve_speed(torch.device('cpu'), 'pil', 'on', 'on', True)
    assert (forced.aug, forced.amp, forced.channels_last, forced.compile) == ('pil', True, True, True)


def test_sync_batchnorm_is_torchs_on_cuda_and_ours_on_the_cpu():
    import distributed
    from model import SimSiam

    def kinds(device):
        torch.manual_seed(0)
        model = distributed.sync_batchnorm(SimSiam('resnet18', 32, 8, 16), device)
        return {type(m) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert kinds(torch.device('cuda')) == {torch.nn.SyncBatchNorm}  # the conversion alone needs no GPU
    assert kinds(torch.device('cpu')) == {distributed.CPUSyncBatchNorm}


def test_channels_last_forced_on_the_cpu_trains_like_the_default(folder_data, finished, tmp_path):
    import main
    import pandas as pd
    from conftest import TINY
    main.main(main.parse_args([*TINY, '--data_root', folder_data, '--results_dir', str(tmp_path), '--epochs', '2',
                               '--name', 'run', '--channels_last', 'on', '--knn_every', '2']))
    nhwc, nchw = (pd.read_csv(d / 'run_statistics.csv') for d in (tmp_path, finished))
    assert nhwc['train_loss'].tolist() == pytest.approx(nchw['train_loss'].tolist(), abs=1e-4)
    assert nhwc['test_acc@1'].iloc[-1] == nchw['test_acc@1'].iloc[-1]
