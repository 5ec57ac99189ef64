"""The stream path: image files read batch by batch, cropped in each image's own geometry, augmented on the
device; its determinism, resume, torchrun, damaged files and the choice of --aug auto."""
import json
import os
import shutil
import signal
import time

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision.transforms.v2 as T2
from PIL import Image

import augment
import main
import run
import stream
import utils
from conftest import TINY, csv_without, run_script, start, wait_for_file, wait_for_line
from errors import UserError
from test_distributed import torchrun

# TINY on the jpegs folder (non-square JPEGs of 48-160 px, some grey) at 32 px, read by two workers
STREAM = [*TINY, '--aug', 'stream', '--num_workers', '2', '--epochs', '2', '--name', 'run']


def stream_args(jpegs, out, *extra):
    return [*STREAM, '--data_root', jpegs, '--results_dir', str(out), *extra]


@pytest.fixture(scope='module')
def uninterrupted(jpegs, tmp_path_factory):
    """A finished 2-epoch stream pretraining run 'run': what the other runs must equal."""
    out = tmp_path_factory.mktemp('stream')
    r = run_script('main.py', *stream_args(jpegs, out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'speed: aug stream' in r.stdout
    return out


def test_the_crop_and_resize_is_torchvisions_random_resized_crop(jpegs):
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(os.path.join(jpegs, 'train')) for f in files)
    views = stream.FileViews(paths, torch.zeros(len(paths)), 'pretrain', seed=3, size=40)
    shapes = set()
    for index, path in enumerate(paths[:6]):
        _, _, kind, crops, params = views[(2, index)]
        assert kind == 'views' and crops.shape == (2, 3, 40, 40) and crops.dtype == torch.uint8
        image = torch.from_numpy(np.array(Image.open(path).convert('RGB'))).permute(2, 0, 1)
        height, width = image.shape[1:]
        shapes.add((height, width))
        # the boxes are drawn in the file's own geometry, from (seed, epoch, index) alone
        expected = augment.sample_pretrain(2, height, width, utils.generator(3, 2, index))
        assert torch.equal(params['box'], expected['box'])
        top, left, h, w = params['box'].T
        assert ((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width)).all()
        crop = T2.RandomResizedCrop(40, scale=augment.PRETRAIN['scale'], ratio=augment.PRETRAIN['ratio'])
        for view, box, flip in zip(crops, params['box'].tolist(), params['flip'].tolist()):
            reference = crop.transform(image, dict(zip(('top', 'left', 'height', 'width'), box)))
            assert torch.equal(view, T2.functional.horizontal_flip(reference) if flip else reference)
    assert any(h != w for h, w in shapes) and any(h > w for h, w in shapes) and any(h < w for h, w in shapes)


def test_a_batch_is_augmented_per_image_whatever_the_batch():
    """An image's views depend on (seed, epoch, index) alone: the batch it is in, or its position in it, does
    not change them (what makes torchrun's shards the single process's batch)."""
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in ((50, 70), (64, 40),
                                                                                              (33, 33))]
    batches = stream.Batches('pretrain', torch.device('cpu'), 24, augment.IMAGENET_PRETRAIN)

    def item(i):
        params = augment.sample_pretrain(2, *images[i].shape[1:], utils.generator(5, 1, i), augment.IMAGENET_PRETRAIN)
        return i, i, 'image', images[i], params

    (a1, a2), labels = batches([item(0), item(1), item(2)])
    (b1, b2), _ = batches([item(2), item(0)])
    assert labels.tolist() == [0, 1, 2]
    assert torch.equal(a1[[2, 0]], b1) and torch.equal(a2[[2, 0]], b2)
    assert not torch.equal(a1, a2)  # two different views of each image


def test_the_same_seed_gives_the_same_csv_whatever_the_workers(uninterrupted, jpegs, tmp_path, monkeypatch):
    # and --aug auto takes the stream path for a folder over the (lowered) memory budget, and says so
    monkeypatch.setattr(utils, 'host_memory_available', lambda: 200_000)
    args = main.parse_args(stream_args(jpegs, tmp_path, '--aug', 'auto', '--num_workers', '0'))
    main.main(args)
    record = json.loads((tmp_path / 'run_args.json').read_text())
    assert record['aug'] == 'stream' and record['args']['aug'] == 'stream'
    assert 'over 80% of the 0.00 GiB of host memory available' in record['args']['aug_auto']
    assert csv_without(tmp_path / 'run_statistics.csv', main.WALL_CLOCK) == \
        csv_without(uninterrupted / 'run_statistics.csv', main.WALL_CLOCK)


def test_auto_takes_batched_for_a_folder_within_the_budget(jpegs, monkeypatch):
    cpu = torch.device('cpu')
    monkeypatch.setattr(utils, 'host_memory_available', lambda: 2 ** 30)
    aug, why = utils.choose_aug('auto', 'folder', jpegs, 32, 1.0, cpu)
    assert aug == 'batched' and 'within the budget' in why
    monkeypatch.setattr(utils, 'host_memory_available', lambda: 2 ** 10)
    assert utils.choose_aug('auto', 'folder', jpegs, 32, 1.0, cpu)[0] == 'stream'
    assert utils.choose_aug('pil', 'folder', jpegs, 32, 1.0, cpu) == ('pil', None)
    assert utils.choose_aug('auto', 'cifar10', 'data', 32, 1.0, cpu)[0] == 'batched'  # arrays: never streamed
    with pytest.raises(UserError, match='--aug stream reads the files of an image folder'):
        utils.load_dataset('cifar10', 'data', True, decode=False)


def test_killed_mid_epoch_and_resumed_is_the_same_run(uninterrupted, jpegs, tmp_path):
    args = stream_args(jpegs, tmp_path)
    proc = start('main.py', args)
    wait_for_line(proc, 'epoch 1/2')
    wait_for_file(tmp_path / 'run_state.pth')
    time.sleep(0.5)  # inside epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len((tmp_path / 'run_statistics.csv').read_text().splitlines()) == 2, 'the kill should land in epoch 2'
    r = run_script('main.py', *args, '--resume', 'auto')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'resuming after epoch 1 of 2' in r.stdout
    assert csv_without(tmp_path / 'run_statistics.csv', main.WALL_CLOCK) == \
        csv_without(uninterrupted / 'run_statistics.csv', main.WALL_CLOCK)


def test_torchrun_gives_the_numbers_of_one_process(uninterrupted, jpegs, tmp_path):
    """Each process reads its slice of every global batch and augments each image as one process does: the
    numbers are one process's, to the rounding of the summed BatchNorm statistics (measured: 1e-6 relative)."""
    r = torchrun('main.py', *stream_args(jpegs, tmp_path, '--num_workers', '1'))
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (pd.read_csv(d / 'run_statistics.csv') for d in (uninterrupted, tmp_path))
    assert two['epoch'].tolist() == [1, 2]
    for column in ('test_acc@1', 'test_acc@5', 'lr'):
        assert two[column].tolist() == one[column].tolist()
    for column in ('train_loss', 'z_std'):
        assert np.allclose(two[column], one[column], rtol=1e-4, atol=0), (two[column], one[column])


def damage(path, how):
    if how == 'truncated':
        data = open(path, 'rb').read()
        open(path, 'wb').write(data[:len(data) // 2])
    else:
        open(path, 'w').write('this is not an image\n')


@pytest.mark.parametrize('how', ['truncated', 'not an image'])
def test_a_damaged_file_stops_the_run_in_one_line_naming_it(jpegs, tmp_path, monkeypatch, how):
    """The file is damaged once epoch 1's set is handed over: epoch 2 meets it, and epoch 1's set stays."""
    data = tmp_path / 'data'
    shutil.copytree(jpegs, data)
    victim = sorted((data / 'train' / 'c2').iterdir())[1]
    end_epoch = run.Run.end_epoch

    def then_damage(self, row, *a):
        end_epoch(self, row, *a)
        if row['epoch'] == 1:
            damage(victim, how)
    monkeypatch.setattr(run.Run, 'end_epoch', then_damage)
    out = tmp_path / 'out'
    with pytest.raises(UserError) as e:
        main.main(main.parse_args(stream_args(str(data), out, '--num_workers', '0', '--epochs', '2')))
    line = str(e.value)
    assert '\n' not in line and repr(str(victim)) in line, line
    assert ('truncated' in line) if how == 'truncated' else ('not an image file' in line), line
    assert f"training stopped and {out / 'run_state.pth'} holds epoch 1" in line, line
    assert torch.load(out / 'run_state.pth', weights_only=True)['epoch'] == 1
    assert len(pd.read_csv(out / 'run_statistics.csv')) == 1
    assert not [f for f in os.listdir(out) if f.endswith('.tmp')]


def test_a_damaged_file_from_the_start_is_one_line_on_stderr(jpegs, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(jpegs, data)
    victim = sorted((data / 'test' / 'c3').iterdir())[0]  # read only by the kNN monitor, after epoch 1's training
    damage(victim, 'not an image')
    r = run_script('main.py', *stream_args(str(data), tmp_path / 'out', '--epochs', '1'))
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last == (f"main.py: error: cannot read image {str(victim)!r} (not an image file): replace it with a "
                    f"readable image or move it out of {str(data / 'test')!r}; training stopped and nothing was "
                    f"saved"), last


@pytest.mark.filterwarnings('ignore:The image decoding:DeprecationWarning')  # torchvision's decoder stands in
def test_the_gpu_paths_hand_over_bytes_and_images_and_give_the_cpu_batch(jpegs, tmp_path):
    """The GPU's branch, run on the CPU with torchvision's CPU decoder standing in for nvJPEG (both are
    libjpeg-turbo's decode here): JPEGs handed over as bytes, a PNG and a CMYK JPEG decoded by the worker,
    a batch the decoder refuses decoded file by file; the views equal the CPU path's exactly."""
    import torchvision.io
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(os.path.join(jpegs, 'train')) for f in files)[:6]
    Image.open(paths[0]).save(tmp_path / 'a.png')
    Image.open(paths[1]).convert('CMYK').save(tmp_path / 'b.jpg')
    paths += [str(tmp_path / 'a.png'), str(tmp_path / 'b.jpg')]
    labels = torch.arange(len(paths))
    cpu = stream.FileViews(paths, labels, 'pretrain', 1, 32, device_type='cpu')
    gpu = stream.FileViews(paths, labels, 'pretrain', 1, 32, device_type='cuda')
    kinds = [gpu[(1, i)][2] for i in range(len(paths))]
    assert kinds == ['jpeg'] * 6 + ['image', 'image']
    batches = stream.Batches('pretrain', torch.device('cpu'), 32, augment.PRETRAIN)
    calls = []

    def decode(data, device):
        calls.append(len(data))
        if len(data) > 1:
            raise RuntimeError('a batch the decoder refuses')
        return [torchvision.io.decode_jpeg(d, mode=torchvision.io.ImageReadMode.RGB) for d in data]
    batches.decode = decode
    (g1, g2), g_labels = batches([gpu[(1, i)] for i in range(len(paths))])
    (c1, c2), c_labels = batches([cpu[(1, i)] for i in range(len(paths))])
    assert calls == [6] + [1] * 6
    assert torch.equal(g_labels, c_labels) and torch.equal(g1, c1) and torch.equal(g2, c2)


def test_a_jpeg_turned_by_its_exif_orientation_is_decoded_on_the_cpu(jpegs, tmp_path):
    """TorchCodec's GPU decoder applies the EXIF orientation and the other paths do not: such a JPEG goes to
    PIL, so that its crops are drawn in the geometry they are applied to."""
    path = sorted(os.path.join(d, f) for d, _, files in os.walk(os.path.join(jpegs, 'train')) for f in files)[0]
    image = Image.open(path).convert('RGB')
    exif = Image.Exif()
    exif[stream.EXIF_ORIENTATION] = 6  # turned 90 degrees
    image.save(tmp_path / 'turned.jpg', exif=exif)
    image.save(tmp_path / 'plain.jpg')
    assert stream.read_image(str(tmp_path / 'plain.jpg'), on_gpu=True)[0].dim() == 1  # bytes, for the GPU
    decoded, size = stream.read_image(str(tmp_path / 'turned.jpg'), on_gpu=True)
    assert decoded.dim() == 3 and tuple(decoded.shape[1:]) == size == (image.size[1], image.size[0])


def test_a_state_saved_with_aug_auto_unresolved_resumes_as_batched(tmp_path):
    """States written before --aug auto was resolved into the settings recorded 'auto', which was batched."""
    settings = {'aug': 'batched', 'lr': 0.03}
    path = tmp_path / 'run_state.pth'
    torch.save({'kind': 'simsiam_state', 'args': {**settings, 'aug': 'auto'}, 'epoch': 1, 'rows': [],
                'rng': run.rng_state()}, path)
    assert run.find_state(str(path), str(path), 'simsiam_state', 'main.py', settings)['epoch'] == 1
    with pytest.raises(UserError, match=r'--aug batched \(now stream\)'):
        run.find_state(str(path), str(path), 'simsiam_state', 'main.py', {**settings, 'aug': 'stream'})
