"""The data side: seeds and batches, the PIL transforms and the paired views, the datasets."""
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import augment
import utils
from conftest import make_shapes, write_cifar10


# ----------------------------------------------------------------------------- seeds and batches

def test_derive_seed_is_a_fixed_function():
    assert utils.derive_seed(0, 1, 2) == utils.derive_seed(0, 1, 2)
    seeds = {utils.derive_seed(s, e, i) for s in range(3) for e in range(3) for i in range(30)}
    assert len(seeds) == 270
    assert all(0 <= s < 2 ** 63 for s in seeds)


def test_epoch_batches():
    a = utils.epoch_batches(103, 10, seed=0, epoch=1)
    assert len(a) == 10 and all(len(b) == 10 for b in a)  # the incomplete batch is dropped
    assert len(torch.cat(a).unique()) == 100
    assert all(torch.equal(x, y) for x, y in zip(a, utils.epoch_batches(103, 10, seed=0, epoch=1)))
    assert not torch.equal(torch.cat(a), torch.cat(utils.epoch_batches(103, 10, seed=0, epoch=2)))
    assert not torch.equal(torch.cat(a), torch.cat(utils.epoch_batches(103, 10, seed=1, epoch=1)))


def test_epoch_batches_shard_the_global_batch():
    whole = utils.epoch_batches(64, 8, seed=3, epoch=5)
    shards = [utils.epoch_batches(64, 8, seed=3, epoch=5, rank=r, world_size=2) for r in range(2)]
    for step, batch in enumerate(whole):
        assert torch.equal(torch.cat([shards[0][step], shards[1][step]]), batch)


# ----------------------------------------------------------------------------- transforms

def test_pretrain_transform_is_the_papers():
    ops = utils.pretrain_transform().transforms
    crop, flip, jitter, gray, _, norm = ops
    assert isinstance(crop, T.RandomResizedCrop) and crop.size == (32, 32) and crop.scale == (0.2, 1.0)
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(jitter, T.RandomApply) and jitter.p == 0.8
    cj = jitter.transforms[0]
    assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))
    assert isinstance(gray, T.RandomGrayscale) and gray.p == 0.2
    assert tuple(norm.mean) == augment.MEAN and tuple(norm.std) == augment.STD
    assert not any(isinstance(op, T.GaussianBlur) for op in ops)


def test_normalize_equals_totensor_then_normalize():
    images, _ = make_shapes(2, seed=0)
    expected = torch.stack([T.Normalize(augment.MEAN, augment.STD)(T.ToTensor()(Image.fromarray(i))) for i in images])
    got = augment.normalize(torch.from_numpy(images).permute(0, 3, 1, 2))
    torch.testing.assert_close(got, expected)


def test_augmented_views_are_a_function_of_seed_epoch_index():
    images, labels = make_shapes(2, seed=0)
    data = utils.ImageSet(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels), [])
    ds = utils.AugmentedViews(data, utils.pretrain_transform(), seed=0, views=2)
    torch.manual_seed(123)
    x1, x2, y = ds[(1, 3)]
    torch.manual_seed(456)  # the global RNG has no influence...
    y1, y2, _ = ds[(1, 3)]
    assert torch.equal(x1, y1) and torch.equal(x2, y2)
    assert y == labels[3]
    assert x1.shape == (3, 32, 32)
    assert not torch.equal(x1, x2)  # the two views are drawn independently
    assert not torch.equal(x1, ds[(2, 3)][0])  # ...but the epoch does
    assert not torch.equal(x1, utils.AugmentedViews(data, utils.pretrain_transform(), seed=1)[(1, 3)][0])
    state = torch.get_rng_state()
    ds[(1, 4)]
    assert torch.equal(state, torch.get_rng_state())  # and it leaves the global RNG alone


# ----------------------------------------------------------------------------- datasets

def test_folder_dataset(tmp_path):
    for split in ('train', 'test'):
        for cls, mode, size in (('b', 'L', (40, 20)), ('a', 'RGBA', (32, 32))):
            os.makedirs(tmp_path / split / cls)
            for i in range(3):
                Image.new(mode, size, color=100 + i).save(tmp_path / split / cls / f'{i}.png')
    (tmp_path / 'train' / 'a' / 'notes.txt').write_text('not an image')
    train = utils.load_dataset('folder', str(tmp_path), train=True)
    assert train.images.shape == (6, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.classes == ['a', 'b']
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.images[3].float().std() == 0 and int(train.images[3, 0, 0, 0]) == 100  # grey became RGB


def test_folder_dataset_errors(tmp_path):
    with pytest.raises(utils.UserError, match='does not exist'):
        utils.load_dataset('folder', str(tmp_path / 'nope'), train=True)
    with pytest.raises(utils.UserError, match='is not a directory'):
        utils.load_dataset('folder', str(tmp_path), train=True)
    os.makedirs(tmp_path / 'train' / 'a')
    with pytest.raises(utils.UserError, match='no images'):
        utils.load_dataset('folder', str(tmp_path), train=True)
    (tmp_path / 'train' / 'a' / 'bad.png').write_bytes(b'not a png')
    with pytest.raises(utils.UserError, match='cannot read image'):
        utils.load_dataset('folder', str(tmp_path), train=True)


def test_cifar10_layout(tmp_path, cifar_files_ok):
    write_cifar10(tmp_path, 50, 20)
    train = utils.load_dataset('cifar10', str(tmp_path), train=True)
    test = utils.load_dataset('cifar10', str(tmp_path), train=False)
    assert train.images.shape == (50, 3, 32, 32) and test.images.shape == (20, 3, 32, 32)
    assert train.classes == [f'class{i}' for i in range(10)]
    with open(tmp_path / 'cifar-10-batches-py' / 'data_batch_1', 'rb') as f:
        first = pickle.load(f)
    assert np.array_equal(train.images[0].numpy().reshape(-1), first['data'][0])
    assert train.labels[0] == first['labels'][0]


def test_cifar_offline_is_a_clear_error(tmp_path, monkeypatch):
    import urllib.error
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError('Name or service not known')
    monkeypatch.setattr(cifar, 'download_and_extract_archive', offline)
    with pytest.raises(utils.UserError, match='cifar-10-python.tar.gz') as e:
        utils.load_dataset('cifar10', str(tmp_path), train=True)
    assert 'could not be downloaded' in str(e.value) and '\n' not in str(e.value)
