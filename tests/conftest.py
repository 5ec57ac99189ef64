"""Generated data for the tests: coloured shapes, written as an image folder or in the CIFAR-10 layout."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = ('circle', 'square', 'triangle', 'cross')


def shape_mask(kind, cy, cx, r, size=32):
    y, x = np.mgrid[:size, :size].astype(np.float32)
    dy, dx = y - cy, x - cx
    if kind == 'circle':
        return dy ** 2 + dx ** 2 <= r ** 2
    if kind == 'square':
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if kind == 'triangle':
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if kind == 'cross':
        return ((np.abs(dy) <= r * 0.3) | (np.abs(dx) <= r * 0.3)) & (np.abs(dy) <= r) & (np.abs(dx) <= r)
    raise ValueError(kind)


def make_shapes(n_per_class, seed, classes=SHAPES, size=32):
    """Images (N, size, size, 3) uint8 whose class is the shape; colour, position and size are random."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, kind in enumerate(classes):
        for _ in range(n_per_class):
            r = rng.uniform(6, 10)
            cy, cx = rng.uniform(r + 1, size - r - 1, size=2)
            fg, bg = rng.integers(0, 256, size=(2, 3))
            while np.abs(fg - bg).sum() < 150:
                fg, bg = rng.integers(0, 256, size=(2, 3))
            img = np.empty((size, size, 3), np.float32)
            img[:] = bg
            img[shape_mask(kind, cy, cx, r, size)] = fg
            img += rng.normal(0, 8, img.shape)
            images.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(label)
    order = rng.permutation(len(labels))
    return np.stack(images)[order], np.array(labels)[order]


def write_folder(root, n_train, n_test, seed=0, classes=SHAPES):
    """An image folder root/{train,test}/<class>/*.png with n_train and n_test images per class."""
    for split, n, s in (('train', n_train, seed), ('test', n_test, seed + 1000)):
        images, labels = make_shapes(n, s, classes)
        for i, (img, label) in enumerate(zip(images, labels)):
            folder = os.path.join(root, split, classes[label])
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(img).save(os.path.join(folder, f'{i:05d}.png'))
    return str(root)


def write_cifar10(root, n_train, n_test, seed=0):
    """Generated arrays in torchvision's CIFAR-10 layout (root/cifar-10-batches-py); 10 classes."""
    names = [f'class{i}' for i in range(10)]
    kinds = [SHAPES[i % len(SHAPES)] for i in range(10)]
    folder = os.path.join(root, 'cifar-10-batches-py')
    os.makedirs(folder, exist_ok=True)
    train_x, train_y = make_shapes(n_train // 10, seed, kinds)
    test_x, test_y = make_shapes(n_test // 10, seed + 1000, kinds)

    def dump(name, x, y):
        with open(os.path.join(folder, name), 'wb') as f:
            pickle.dump({'data': x.transpose(0, 3, 1, 2).reshape(len(x), -1), 'labels': [int(v) for v in y]}, f)

    for i, part in enumerate(np.array_split(np.arange(len(train_y)), 5)):
        dump(f'data_batch_{i + 1}', train_x[part], train_y[part])
    dump('test_batch', test_x, test_y)
    with open(os.path.join(folder, 'batches.meta'), 'wb') as f:
        pickle.dump({'label_names': names}, f)
    return str(root)


# The speed settings that tests comparing numbers pin: 'auto' picks bf16 on a CPU with AMX and float32 on
# others, and the suite must give the same numbers on both kinds.
FP32 = ['--amp', 'off', '--channels_last', 'off']
# The settings of most end-to-end runs: the smallest model the scripts offer, 4 steps per epoch.
TINY = ['--arch', 'resnet18', '--feature_dim', '64', '--pred_dim', '16', '--proj_hidden_dim', '64',
        '--batch_size', '8', '--k', '5', '--device', 'cpu', '--num_workers', '0', '--dataset', 'folder', *FP32]


@pytest.fixture(scope='session')
def folder_data(tmp_path_factory):
    """4 shape classes, 8 train and 4 test images per class (32 and 16)."""
    return write_folder(tmp_path_factory.mktemp('folder'), 8, 4)


# (width, height, mode) of the images of each class, cycled: landscape, portrait, square, small and grey
GEOMETRIES = [(160, 96, 'RGB'), (60, 120, 'RGB'), (48, 48, 'L'), (140, 100, 'RGB'), (72, 150, 'L')]


@pytest.fixture(scope='session')
def jpegs(tmp_path_factory):
    """A folder of JPEGs of mixed sizes (48-160 px), some portrait, some grayscale: 4 classes, 8 train and 3
    test images each."""
    root = tmp_path_factory.mktemp('jpegs')
    for split, n, seed in (('train', 8, 0), ('test', 3, 1)):
        images, labels = make_shapes(n, seed)
        for i, (img, label) in enumerate(zip(images, labels)):
            w, h, mode = GEOMETRIES[i % len(GEOMETRIES)]
            folder = root / split / f'c{label}'
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).resize((w, h), Image.BILINEAR).convert(mode).save(folder / f'{i:03d}.jpg',
                                                                                   quality=90)
    return str(root)


PIL = ['--aug', 'pil', '--num_workers', '2']  # augmentation in DataLoader worker processes


@pytest.fixture(scope='session')
def uninterrupted_pil(folder_data, tmp_path_factory):
    """A finished 3-epoch TINY pretraining run 'run' on the PIL path: what interrupted runs must end equal to."""
    out = tmp_path_factory.mktemp('whole')
    r = run_script('main.py', *TINY, *PIL, '--data_root', folder_data, '--results_dir', out, '--epochs', 3,
                   '--name', 'run')
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope='session')
def finished(folder_data, tmp_path_factory):
    """A results folder with a finished 2-epoch pretraining run 'run' and its 2-epoch linear evaluation."""
    import linear
    import main
    out = tmp_path_factory.mktemp('finished')
    main.main(main.parse_args([*TINY, '--data_root', folder_data, '--results_dir', str(out), '--epochs', '2',
                               '--name', 'run']))
    linear.main(linear.parse_args(['--model_path', str(out / 'run_model.pth'), '--results_dir', str(out),
                                   '--epochs', '2', '--batch_size', '8', '--device', 'cpu', '--num_workers', '0',
                                   *FP32]))
    return out


@pytest.fixture
def cifar_files_ok(monkeypatch):
    """Accept generated CIFAR files: torchvision checks the real files' MD5 sums."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.utils as tv_utils
    exists = lambda fpath, md5=None: os.path.isfile(fpath)
    monkeypatch.setattr(cifar, 'check_integrity', exists)
    monkeypatch.setattr(tv_utils, 'check_integrity', exists)  # the download's own check of an archive


def run_script(script, *args, timeout=600, **kwargs):
    """Run one of the scripts as a user would; returns the CompletedProcess (text mode)."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=kwargs.get('cwd', ROOT),
                          capture_output=True, text=True, timeout=timeout, env=env)


def csv_without(path, columns):
    """The cells of a CSV as text, without the given columns: for comparing runs digit for digit."""
    import csv
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    keep = [i for i, name in enumerate(rows[0]) if name not in columns]
    return [[row[i] for i in keep] for row in rows]


def png_size(path):
    """(width, height) of a PNG file, read from its header; fails if the file is not a PNG."""
    import struct
    with open(path, 'rb') as f:
        head = f.read(24)
    assert head[:8] == b'\x89PNG\r\n\x1a\n' and head[12:16] == b'IHDR', f'{path} is not a PNG'
    return struct.unpack('>II', head[16:24])


def start(script, args):
    """Start one of the scripts as a user would, reading its output as it comes."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(proc, text, timeout=300):
    """Read stdout until a line containing `text`; returns the lines read."""
    import time
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    proc.kill()
    raise AssertionError(f'{text!r} never appeared; stdout: {"".join(lines)}; stderr: {proc.stderr.read()}')


def wait_for_file(path, timeout=120):
    """Wait until `path` exists: a set handed to the background writer is on disk once its state is."""
    import time
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert time.time() < deadline, f'{path} never appeared'
        time.sleep(0.05)


# The paper's collapse findings (Sec. 4.1, 4.2) within a CPU budget: no BN on the projector output and a
# high lr make the ablations collapse in a few epochs; SimSiam itself does not. Measured over seeds 0-5 in
# README.md ("Reproducing the paper").
COLLAPSE = ['--arch', 'resnet18', '--feature_dim', '256', '--pred_dim', '64', '--proj_hidden_dim', '256',
            '--batch_size', '16', '--lr', '10', '--mlp_bn', 'hidden', '--epochs', '6', '--knn_every', '6',
            '--k', '5', '--num_workers', '0', '--device', 'cpu', '--dataset', 'folder', '--seed', '0', *FP32]
COLLAPSE_RUNS = {'simsiam': [], 'no_stop_grad': ['--stop_grad', 'off'], 'no_predictor': ['--predictor', 'none']}


@pytest.fixture(scope='session')
def shapes64(tmp_path_factory):
    """4 shape classes, 16 train and 4 test images per class (64 and 16): 4 steps of 16 an epoch."""
    return write_folder(tmp_path_factory.mktemp('shapes64'), 16, 4, seed=0)


@pytest.fixture(scope='session')
def collapse_runs(shapes64, tmp_path_factory):
    """A results folder with the three runs of COLLAPSE_RUNS, and what each printed on stderr."""
    import contextlib
    import io
    import main
    out = tmp_path_factory.mktemp('collapse')
    printed = {}
    for name, extra in COLLAPSE_RUNS.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            main.main(main.parse_args([*COLLAPSE, *extra, '--data_root', shapes64, '--results_dir', str(out),
                                       '--name', name]))
        printed[name] = err.getvalue()
    return out, printed
