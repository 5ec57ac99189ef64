"""utils.load_stl10: generated binaries in torchvision's STL-10 layout, and the one-line errors of missing or
damaged data. No test reaches the network: torchvision's download raises as if offline."""
import os
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

import utils
from errors import UserError

NAMES = [f'name{i}' for i in range(10)]
COUNTS = {'train': 6, 'test': 4, 'unlabeled': 5}


def write_stl10(root, seed=0):
    """A tiny STL-10 in torchvision's layout (root/stl10_binary): {split: (images (N, 3, 96, 96), labels)},
    the labels 0-based (-1 for unlabeled) as the loader should give them back."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, 'stl10_binary')
    os.makedirs(folder, exist_ok=True)
    written = {}
    for i, (split, n) in enumerate(COUNTS.items()):
        images = rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8)
        images[:, 0, 0, 0], images[:, 0, 0, 1] = i, np.arange(n)  # split and index: every image differs
        images[:, 0, 0, 2:4], images[:, 0, 2:4, 0] = 7, 200  # and none is its own transpose
        # torchvision reads (-1, 3, 96, 96) then swaps the last two axes: each channel is stored column-major
        np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tofile(os.path.join(folder, f'{split}_X.bin'))
        labels = np.full(n, -1) if split == 'unlabeled' else rng.integers(0, 10, size=n)
        if split != 'unlabeled':
            (labels + 1).astype(np.uint8).tofile(os.path.join(folder, f'{split}_y.bin'))  # 1-based on disk
        written[split] = images, labels
    with open(os.path.join(folder, 'class_names.txt'), 'w') as f:
        f.write('\n'.join(NAMES) + '\n')
    return written


@pytest.fixture
def offline(monkeypatch):
    """torchvision's download fails at once, as without a network."""
    import torchvision.datasets.stl10 as stl10
    import torchvision.datasets.utils as tv_utils

    def no_network(*args, **kwargs):
        raise urllib.error.URLError('no network')

    monkeypatch.setattr(stl10, 'download_and_extract_archive', no_network)
    monkeypatch.setattr(tv_utils, 'download_and_extract_archive', no_network)
    monkeypatch.setattr(tv_utils, 'download_url', no_network)
    monkeypatch.setattr(urllib.request, 'urlopen', no_network)


@pytest.fixture
def stl10_files_ok(monkeypatch):
    """Accept generated STL-10 files: torchvision checks the real files' MD5 sums."""
    import torchvision.datasets.stl10 as stl10
    import torchvision.datasets.utils as tv_utils
    exists = lambda fpath, md5=None: os.path.isfile(fpath)
    monkeypatch.setattr(stl10, 'check_integrity', exists)
    monkeypatch.setattr(tv_utils, 'check_integrity', exists)  # the download's own check of an archive


def one_line_error(root, split='train'):
    with pytest.raises(UserError) as e:
        utils.load_stl10(str(root), split)
    message = str(e.value)
    assert '\n' not in message, message
    return message


def test_stl10_reads_torchvision_layout(tmp_path, stl10_files_ok, offline):
    written = write_stl10(tmp_path)
    for split in ('train', 'test', 'unlabeled'):
        data = utils.load_stl10(str(tmp_path), split)
        images, labels = written[split]
        assert data.images.dtype == torch.uint8 and data.images.shape == (COUNTS[split], 3, 96, 96)
        assert data.images.is_contiguous()
        assert torch.equal(data.images, torch.from_numpy(images)), split
        assert data.labels.dtype == torch.int64 and data.labels.tolist() == labels.tolist(), split
        assert data.classes == NAMES
    assert set(utils.load_stl10(str(tmp_path), 'unlabeled').labels.tolist()) == {-1}
    assert utils.load_stl10(str(tmp_path), 'train').labels.min() >= 0
    both = utils.load_stl10(str(tmp_path), 'train+unlabeled')
    assert torch.equal(both.images, torch.from_numpy(np.concatenate([written['train'][0], written['unlabeled'][0]])))
    assert both.labels.tolist() == written['train'][1].tolist() + [-1] * COUNTS['unlabeled']
    assert both.labels.dtype == torch.int64 and both.classes == NAMES


def test_stl10_offline_without_files(tmp_path, offline, monkeypatch):
    """A relative root: the message says where to put the archive as an absolute path."""
    from torchvision.datasets import STL10
    monkeypatch.chdir(tmp_path)
    message = one_line_error('data')
    assert message.startswith("stl10 is not in 'data' and could not be downloaded (no network)"), message
    assert STL10.url in message, message
    assert message.endswith(f' put stl10_binary.tar.gz in {os.path.join(os.getcwd(), "data")}/'), message


@pytest.mark.parametrize('cut, named', [(100, 'train_X.bin'), (3 * 96 * 96, 'train_y.bin')])
def test_stl10_truncated_binary(tmp_path, stl10_files_ok, offline, cut, named):
    """Cut inside an image: the images file is named; cut one whole image: the labels no longer match it."""
    write_stl10(tmp_path)
    path = os.path.join(tmp_path, 'stl10_binary', 'train_X.bin')
    os.truncate(path, os.path.getsize(path) - cut)
    message = one_line_error(tmp_path)
    assert message.startswith(repr(os.path.join(tmp_path, 'stl10_binary', named))), message
    assert 'delete' in message and 'truncated' in message, message
    assert 'stl10_binary.tar.gz' in message, message


def test_stl10_fails_md5_without_archive(tmp_path, offline):
    """Without the tests' patch, torchvision's MD5 check rejects generated files: the first is named."""
    write_stl10(tmp_path)
    message = one_line_error(tmp_path)
    assert message.startswith(repr(os.path.join(tmp_path, 'stl10_binary', 'train_X.bin'))), message
    assert 'MD5' in message and 'stl10_binary.tar.gz' in message, message
