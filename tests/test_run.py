"""The life of a run below the scripts: atomic files and checkpoints, signals, the device, the schedule."""
import math
import os
import re
import signal
import time

import pytest
import torch

import distributed
import errors
import files
import optim
import run
import signals
import speed


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
        with pytest.raises(errors.UserError, match=message):
            files.load_checkpoint(str(tmp_path / name), ('simsiam_model',), '--model_path')
    with pytest.raises(errors.UserError, match="a 'simsiam_model' file"):
        files.load_checkpoint(str(good), ('simsiam_linear',), '--model_path')


def test_resolve_device():
    assert distributed.resolve_device('cpu') == torch.device('cpu')
    with pytest.raises(errors.UserError):
        distributed.resolve_device('gpu0')
    if not torch.cuda.is_available():
        with pytest.raises(errors.UserError, match='CUDA is not available'):
            distributed.resolve_device('cuda')
        assert distributed.resolve_device('auto') == torch.device('cpu')


def test_a_signal_during_a_deferred_block_is_taken_after_it():
    finished = []
    with pytest.raises(signals.Signal) as e:
        with signals.raised():
            with signals.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler has run by now; it only noted the signal
                finished.append(True)
    assert finished == [True] and e.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


# ----------------------------------------------------------------------------- schedule

def test_cosine_lr():
    assert optim.cosine_lr(0.06, 0, 800) == pytest.approx(0.06)
    assert optim.cosine_lr(0.06, 400, 800) == pytest.approx(0.03)
    assert optim.cosine_lr(0.06, 200, 800) == pytest.approx(0.03 * (1 + math.sqrt(0.5)))
    assert optim.cosine_lr(0.06, 799, 800) < 1e-5


# ----------------------------------------------------------------------------- what the device decides

CPU_KINDS = {'amx': (True, False, 'CPU with AMX'), 'avx512_bf16': (False, True, 'CPU with AVX512-BF16'),
             'neither': (False, False, 'CPU without bf16 instructions')}


def cpu_kind(monkeypatch, kind):
    amx, avx512_bf16, why = CPU_KINDS[kind]
    monkeypatch.setattr(speed, 'cpu_has_amx', lambda: amx)
    monkeypatch.setattr(speed, 'cpu_has_avx512_bf16', lambda: avx512_bf16)
    return why


@pytest.mark.parametrize('kind', list(CPU_KINDS))
def test_auto_speed_settings_follow_the_device_type(kind, monkeypatch):
    why = cpu_kind(monkeypatch, kind)
    fast = kind != 'neither'
    cuda = speed.resolve_speed(torch.device('cuda', 0))  # a device object needs no GPU
    assert (cuda.aug, cuda.amp, cuda.channels_last, cuda.compile) == ('batched', True, True, False)
    assert str(cuda) == 'aug batched, amp bf16, channels_last on, compile off (auto: CUDA)'  # whatever the CPU
    cpu = speed.resolve_speed(torch.device('cpu'))
    # bf16 and channels_last on a CPU with bf16 matrix instructions, where they pay; float32 on one without
    assert (cpu.aug, cpu.amp, cpu.channels_last, cpu.compile) == ('batched', fast, fast, False)
    settings = 'amp bf16, channels_last on' if fast else 'amp off, channels_last off'
    assert str(cpu) == f'aug batched, {settings}, compile off (auto: ' + \
        ('' if fast else torch.backends.cpu.get_cpu_capability() + ' ') + f'{why})'
    forced = speed.resolve_speed(torch.device('cpu'), 'pil', 'on', 'on', True)
    assert (forced.aug, forced.amp, forced.channels_last, forced.compile) == ('pil', True, True, True)
    assert str(forced) == 'aug pil, amp bf16, channels_last on, compile on'  # nothing left to auto, no reason
    off = speed.resolve_speed(torch.device('cpu'), 'auto', 'off', 'off')
    assert (off.amp, off.channels_last, off.why) == (False, False, '')
    half = speed.resolve_speed(torch.device('cpu'), 'auto', 'auto', 'off')  # one left to auto: it follows the CPU
    assert (half.amp, half.channels_last) == (fast, False) and half.why.endswith(why)


def test_the_scripts_say_and_record_what_auto_chose_on_a_cpu_with_amx(folder_data, tmp_path, monkeypatch, capsys):
    import json
    import main
    from conftest import FP32, TINY
    cpu_kind(monkeypatch, 'amx')
    assert TINY[-len(FP32):] == FP32
    args = TINY[:-len(FP32)]  # the speed flags left to auto
    main.main(main.parse_args([*args, '--data_root', folder_data, '--results_dir', str(tmp_path), '--epochs', '1',
                               '--name', 'amx']))
    line = 'aug batched, amp bf16, channels_last on, compile off (auto: CPU with AMX)'
    assert f'speed: {line}' in capsys.readouterr().out
    assert json.loads((tmp_path / 'amx_args.json').read_text())['speed'] == line
    import linear  # the frozen forward follows the same choice
    linear.main(linear.parse_args(['--model_path', str(tmp_path / 'amx_model.pth'), '--results_dir', str(tmp_path),
                                   '--epochs', '1', '--batch_size', '8', '--device', 'cpu', '--num_workers', '0']))
    assert f'speed: {line}' in capsys.readouterr().out
    assert json.loads((tmp_path / 'amx_linear_args.json').read_text())['speed'] == line


def test_sync_batchnorm_is_torchs_on_cuda_and_ours_on_the_cpu():
    import distributed
    from model import ModelConfig, SimSiam

    def kinds(device):
        torch.manual_seed(0)
        model = distributed.sync_batchnorm(SimSiam(ModelConfig('resnet18', 32, 8, 16)), device)
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


# ----------------------------------------------------------------------------- the epoch loop

class FakeTraining:
    """What a script gives run.Run: an 'epoch' that changes a weight, and its checkpoint."""

    def __init__(self, interrupt_at=None):
        self.weight = torch.zeros(1000)
        self.interrupt_at = interrupt_at

    def epoch(self, epoch):
        if epoch == self.interrupt_at:
            raise signals.Signal(signal.SIGTERM)
        self.weight += 1
        return {'epoch': epoch, 'train_loss': float(-epoch)}

    def checkpoint(self):
        return {'kind': 'fake_model', 'w': self.weight}, {'w': self.weight}


def fake_run(out, epochs=5, save_every=1, resume=None):
    from distributed import SINGLE
    settings = {'resume': resume, 'epochs': epochs, 'save_every': save_every, 'results_dir': str(out)}
    return run.Run('main.py', 'fake', settings, columns=['epoch', 'train_loss', 'save_time'], world=SINGLE,
                   state_kind='fake_state')


def loop(r, fake, describe=lambda row: None, until=None):
    """A script's epoch loop, as main.py's: each epoch trained, then handed to the run."""
    for epoch in range(r.done + 1, (until or r.settings['epochs']) + 1):
        row = fake.epoch(epoch)
        r.end_epoch(row, *fake.checkpoint())
        describe(row)


def saved(path):
    return torch.load(path, weights_only=True)


def test_the_run_writes_the_state_each_epoch_and_the_model_every_n_and_last(tmp_path, monkeypatch):
    fake, drawn, seen = FakeTraining(), [], []
    monkeypatch.setattr(run.plot, 'plot_statistics', lambda df, path, title: drawn.append(len(df)))

    def describe(row):  # what is on disk when the epoch's line is printed
        model = tmp_path / 'fake_model.pth'
        seen.append(saved(model)['epoch'] if model.exists() else None)
    with fake_run(tmp_path, save_every=2) as r:
        r.start()
        loop(r, fake, describe)
        r.finish('ok')
    state, model = saved(tmp_path / 'fake_state.pth'), saved(tmp_path / 'fake_model.pth')
    assert state['epoch'] == 5 and float(state['w'][0]) == 5 and len(state['rows']) == 5
    assert model['epoch'] == 5 and float(model['w'][0]) == 5  # written after the last epoch
    # the model file of epochs 2 and 4 (every 2nd), seen one epoch later at the latest in the background
    assert seen[0] is None and seen[1] in (None, 2) and seen[2] == 2 and seen[3] in (2, 4) and seen[4] in (4, 5)
    import pandas as pd
    table = pd.read_csv(tmp_path / 'fake_statistics.csv')
    assert table['epoch'].tolist() == [1, 2, 3, 4, 5] and (table['save_time'] >= 0).all()
    assert drawn[-1] == 5  # the picture is always drawn after the last epoch
    assert sorted(os.listdir(tmp_path)) == ['fake_model.pth', 'fake_state.pth', 'fake_statistics.csv']


def test_the_picture_shows_only_epochs_whose_set_is_on_disk(tmp_path, monkeypatch):
    real, drawn = files.write_set, []

    def failing_third(parts, journal):
        if os.path.exists(tmp_path / 'fake_state.pth') and saved(tmp_path / 'fake_state.pth')['epoch'] == 2:
            raise files.WriteFailed(parts[-1][0], OSError(28, 'No space left on device'))
        real(parts, journal)
    monkeypatch.setattr(files, 'write_set', failing_third)
    monkeypatch.setattr(run.plot, 'plot_statistics', lambda df, path, title: drawn.append(df['epoch'].tolist()))
    with pytest.raises(errors.UserError, match='holds epoch 2'):
        with fake_run(tmp_path) as r:
            r.painter = run.plot.Painter(every=0)  # every set's picture is drawn
            r.start()
            loop(r, FakeTraining())
    assert drawn == [[1], [1, 2]]  # epoch 3's set failed: no picture shows it, as the CSV does not
    import pandas as pd
    assert pd.read_csv(tmp_path / 'fake_statistics.csv')['epoch'].tolist() == [1, 2]


def test_an_interrupt_waits_for_the_write_and_brings_the_model_up_to_date(tmp_path):
    fake = FakeTraining(interrupt_at=4)
    with pytest.raises(errors.Interrupted) as e:
        with fake_run(tmp_path, save_every=10) as r:
            r.start()
            loop(r, fake)
    assert e.value.saved == f'epochs 1-3 are saved in {tmp_path / "fake_state.pth"}'
    # --save_every 10 had not written the model yet; the interrupt wrote that of the last saved epoch
    assert saved(tmp_path / 'fake_model.pth')['epoch'] == 3 and float(saved(tmp_path / 'fake_model.pth')['w'][0]) == 3
    assert saved(tmp_path / 'fake_state.pth')['epoch'] == 3
    assert not os.path.exists(tmp_path / '.fake.lock')


def test_a_model_file_brought_up_to_date_holds_the_epochs_weights_though_training_went_on(tmp_path):
    # The set of epoch 3 did not write the model file; epoch 4 changes the weights in place before the
    # interrupt: the model file written then is epoch 3's, from the state's copy.
    class Midway(FakeTraining):
        def epoch(self, epoch):
            if epoch == 4:
                self.weight += 100  # training moved on, in place
            return super().epoch(epoch)
    with pytest.raises(errors.Interrupted):
        with fake_run(tmp_path, save_every=10) as r:
            r.start()
            loop(r, Midway(interrupt_at=4))
    assert float(saved(tmp_path / 'fake_model.pth')['w'][0]) == 3


def test_a_background_write_that_fails_stops_the_run_at_the_next_epoch(tmp_path, monkeypatch):
    real, calls = files.write_set, []

    def failing_second(parts, journal):
        calls.append(1)
        if len(calls) == 2:
            raise files.WriteFailed(parts[-1][0], OSError(28, 'No space left on device'))
        return real(parts, journal)
    monkeypatch.setattr(files, 'write_set', failing_second)
    fake, trained = FakeTraining(), []
    epoch = fake.epoch
    fake.epoch = lambda e: trained.append(e) or epoch(e)
    with pytest.raises(errors.UserError) as e:
        with fake_run(tmp_path) as r:
            r.start()
            loop(r, fake)
    assert str(e.value) == (f"could not write '{tmp_path / 'fake_state.pth'}' (No space left on device "
                            f"[ENOSPC]); training stopped and {tmp_path / 'fake_state.pth'} holds epoch 1, the "
                            f"last complete one, as does the CSV")
    assert trained == [1, 2, 3]  # epoch 2's set failed while epoch 3 trained; found at epoch 3's end
    assert saved(tmp_path / 'fake_state.pth')['epoch'] == 1


def test_a_signal_while_the_run_waits_for_the_previous_set_is_taken_after_the_hand_over(tmp_path, monkeypatch):
    real = files.write_set

    def slow(parts, journal):  # the signal comes while the loop, done with the next epoch, waits for this set
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.3)
        real(parts, journal)
    monkeypatch.setattr(files, 'write_set', slow)
    fake, trained = FakeTraining(), []
    epoch = fake.epoch
    fake.epoch = lambda e: trained.append(e) or epoch(e)
    with signals.raised(), pytest.raises(errors.Interrupted) as e:
        with fake_run(tmp_path) as r:
            r.start()
            loop(r, fake)
    assert trained == [1, 2] and e.value.signum == signal.SIGTERM
    assert e.value.saved == f'epochs 1-2 are saved in {tmp_path / "fake_state.pth"}'
    assert saved(tmp_path / 'fake_state.pth')['epoch'] == 2


def test_a_failed_write_is_told_when_an_interrupt_comes_first(tmp_path, monkeypatch):
    real = files.write_set

    def failing_second(parts, journal):
        if saved(tmp_path / 'fake_state.pth')['epoch'] == 1 if (tmp_path / 'fake_state.pth').exists() else False:
            raise files.WriteFailed(parts[-1][0], OSError(28, 'No space left on device'))
        real(parts, journal)
    monkeypatch.setattr(files, 'write_set', failing_second)
    with pytest.raises(errors.Interrupted) as e:
        with fake_run(tmp_path) as r:
            r.start()
            loop(r, FakeTraining(interrupt_at=3))
    assert e.value.saved == (f"could not write '{tmp_path / 'fake_state.pth'}' (No space left on device [ENOSPC]); "
                             f"{tmp_path / 'fake_state.pth'} holds epoch 1, the last complete one, as does the CSV")


def test_a_signal_after_the_last_epoch_is_an_interrupt_with_the_run_saved(tmp_path):
    with pytest.raises(errors.Interrupted) as e:
        with fake_run(tmp_path, epochs=3) as r:
            r.start()
            loop(r, FakeTraining())
            raise signals.Signal(signal.SIGINT)  # while the last pictures are drawn, say
    assert e.value.saved == f'epochs 1-3 are saved in {tmp_path / "fake_state.pth"}'


def test_a_non_finite_loss_ends_the_run_with_what_is_kept_and_the_record_says_why(tmp_path):
    with pytest.raises(errors.JobError) as e:
        with fake_run(tmp_path) as r:
            r.start()
            r.write_record(torch.device('cpu'), {})
            loop(r, FakeTraining(), lambda row: None)
            raise errors.NonFiniteLoss(6, 2, float('nan'))
    assert str(e.value) == (f'the loss became nan at epoch 6, step 2; training stopped and the state of epoch 5 is '
                            f'kept in {tmp_path / "fake_state.pth"} (try a lower --lr)')
    import json
    record = json.loads((tmp_path / 'fake_args.json').read_text())
    assert record['stopped'] == 'the loss became nan at epoch 6, step 2'


def test_a_run_resumed_from_another_folder_has_nothing_saved_in_its_own(tmp_path):
    fake, optimizer = FakeTraining(), torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1)
    fake.checkpoint = lambda: ({'kind': 'fake_model', 'w': fake.weight}, {'optimizer': optimizer.state_dict()})
    with fake_run(tmp_path / 'a') as r:
        r.start()
        loop(r, fake, until=2)
    with pytest.raises(errors.Interrupted) as e:
        with fake_run(tmp_path / 'b', resume=str(tmp_path / 'a' / 'fake_state.pth')) as r:
            r.restore(r.start(), {'optimizer': optimizer}, 'x')
            assert r.done == 2
            fake.interrupt_at = 3
            loop(r, fake)
    assert e.value.saved == 'no epoch had completed'  # not 'epochs 1-2 are saved in b/...': nothing is there


def test_a_picture_that_fails_any_way_is_one_warning(tmp_path):
    import plot
    warnings = []
    painter = plot.Painter(every=0, warn=warnings.append)
    for error in (ValueError('bad data'), OSError(28, 'No space left on device')):
        painter.now(lambda: (_ for _ in ()).throw(error))
    assert warnings == ['warning: could not draw a picture (ValueError: bad data); the run goes on, and plot.py '
                        'redraws the statistics from the CSV']


def test_save_time_is_the_wait_and_the_snapshot(tmp_path):
    with fake_run(tmp_path, epochs=3) as r:
        r.start()
        loop(r, FakeTraining())
        r.finish('ok')
    rows = saved(tmp_path / 'fake_state.pth')['rows']
    assert [row['epoch'] for row in rows] == [1, 2, 3]
    assert all(0 <= row['save_time'] < 5 for row in rows)  # in the state's rows too, for a resumed CSV


def test_benchmark_measures_the_fixed_costs_and_the_phases_of_an_epoch():
    from conftest import run_script
    r = run_script('benchmark.py', '--arch', 'resnet18', '--parts', 'fixed,phases', '--repeats', '1', '--rows', '20',
                   '--batch_size', '16', '--images', '32', '--knn_bank', '64', '--knn_queries', '16',
                   '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    blocking, background = map(float, re.findall(r'\d+\.\d+', next(l for l in lines if 'loop waits per epoch' in l)))
    assert background < blocking
    phases = {line.split()[0]: float(line.split()[-2]) for line in lines
              if line.strip().split()[:1] and line.strip().split()[0] in ('augmentation', 'backward', 'optimizer')}
    total = float(next(line for line in lines if line.strip().startswith('total')).split()[1])
    assert set(phases) == {'augmentation', 'backward', 'optimizer'} and 0 < sum(phases.values()) < total
    assert 'blocking / background saving and plotting' in r.stdout
