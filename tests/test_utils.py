import math
import os
import pickle
import signal
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import utils
from conftest import make_shapes, write_cifar10


# ----------------------------------------------------------------------------- kNN

BANK = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
BANK_LABELS = torch.tensor([0, 1, 1, 2, 0])


def test_knn_votes_by_hand():
    query = torch.tensor([[1.0, 0.0]])
    # k=3 neighbours: sims 1.0 (class 0), 0.8 and 0.6 (class 1).
    # t=1: class 0 scores e^1 = 2.72, class 1 scores e^0.8 + e^0.6 = 4.05 -> class 1 wins.
    assert utils.knn_predict(query, BANK, BANK_LABELS, 3, k=3, t=1.0).tolist() == [[1, 0, 2]]
    # t=0.1: class 0 scores e^10 = 22026, class 1 e^8 + e^6 = 3384 -> class 0 wins.
    assert utils.knn_predict(query, BANK, BANK_LABELS, 3, k=3, t=0.1).tolist() == [[0, 1, 2]]
    # k=1: only the nearest item votes.
    assert utils.knn_predict(torch.tensor([[0.0, 1.0]]), BANK, BANK_LABELS, 3, k=1, t=0.1)[0, 0] == 2


def test_knn_chunking_does_not_change_the_answer():
    torch.manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(300, 16), dim=1)
    labels = torch.randint(0, 7, (300,))
    queries = torch.nn.functional.normalize(torch.randn(50, 16), dim=1)
    whole = utils.knn_predict(queries, bank, labels, 7, k=20, t=0.1, chunk_size=1000)
    chunked = utils.knn_predict(queries, bank, labels, 7, k=20, t=0.1, chunk_size=7)
    assert whole.shape == (50, 7)
    assert torch.equal(whole, chunked)
    # each row is a permutation of the classes
    assert torch.equal(whole.sort(dim=1).values, torch.arange(7).expand(50, 7))


def test_topk_correct():
    ranked = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [1, 0, 2, 3, 4, 5]])
    labels = torch.tensor([0, 0, 0])
    assert utils.topk_correct(ranked, labels) == [1, 2]
    assert utils.topk_correct(ranked[:, :2], labels) == [1, 2]  # k=5 is clipped to two classes


def test_knn_monitor_on_separable_features():
    bank = utils.ImageSet(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 0, 1, 1]), ['a', 'b'])
    bank.images[2:] = 255
    test = utils.ImageSet(torch.zeros(2, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 1]), ['a', 'b'])
    test.images[1] = 250
    # a feature that separates dark from bright images
    fn = lambda x: torch.stack([x.mean(dim=(1, 2, 3)), torch.ones(len(x))], dim=1)
    top1, top5, _, _ = utils.knn_monitor(fn, bank, test, k=2, t=0.1, batch_size=3, device=torch.device("cpu"))
    assert (top1, top5) == (100.0, 100.0)
    test.labels = torch.tensor([1, 0])
    top1, _, _, _ = utils.knn_monitor(fn, bank, test, k=2, t=0.1, batch_size=3, device=torch.device("cpu"))
    assert top1 == 0.0


# ----------------------------------------------------------------------------- schedule and seeds

def test_cosine_lr():
    assert utils.cosine_lr(0.06, 0, 800) == pytest.approx(0.06)
    assert utils.cosine_lr(0.06, 400, 800) == pytest.approx(0.03)
    assert utils.cosine_lr(0.06, 200, 800) == pytest.approx(0.03 * (1 + math.sqrt(0.5)))
    assert utils.cosine_lr(0.06, 799, 800) < 1e-5


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
    assert tuple(norm.mean) == utils.MEAN and tuple(norm.std) == utils.STD
    assert not any(isinstance(op, T.GaussianBlur) for op in ops)


def test_normalize_equals_totensor_then_normalize():
    images, _ = make_shapes(2, seed=0)
    expected = torch.stack([T.Normalize(utils.MEAN, utils.STD)(T.ToTensor()(Image.fromarray(i))) for i in images])
    got = utils.normalize(torch.from_numpy(images).permute(0, 3, 1, 2))
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


# ----------------------------------------------------------------------------- files

def test_atomic_open_replaces_or_keeps(tmp_path):
    path = tmp_path / 'f.txt'
    with utils.atomic_open(str(path), 'w') as f:
        f.write('old')
    with pytest.raises(ZeroDivisionError):
        with utils.atomic_open(str(path), 'w') as f:
            f.write('half')
            1 / 0
    assert path.read_text() == 'old'
    assert os.listdir(tmp_path) == ['f.txt']  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not mkstemp's 0600


def test_load_checkpoint_refuses_what_it_cannot_use(tmp_path):
    good = tmp_path / 'good.pth'
    utils.save_checkpoint({'kind': 'simsiam_model', 'x': torch.ones(2)}, str(good))
    assert utils.load_checkpoint(str(good), ('simsiam_model',), '--model_path')['x'].sum() == 2
    (tmp_path / 'empty.pth').write_bytes(b'')
    (tmp_path / 'noise.pth').write_bytes(os.urandom(4096))
    (tmp_path / 'table.csv').write_text('epoch,train_loss\n1,0.5\n')
    (tmp_path / 'cut.pth').write_bytes(good.read_bytes()[:200])
    torch.save({'conv1.weight': torch.ones(1)}, tmp_path / 'plain.pth')
    cases = {'missing.pth': 'does not exist', 'empty.pth': 'is empty', 'noise.pth': 'not a checkpoint',
             'table.csv': 'not a checkpoint', 'cut.pth': 'not a checkpoint', 'plain.pth': 'top-level keys: conv1'}
    for name, message in cases.items():
        with pytest.raises(utils.UserError, match=message):
            utils.load_checkpoint(str(tmp_path / name), ('simsiam_model',), '--model_path')
    with pytest.raises(utils.UserError, match="a 'simsiam_model' file"):
        utils.load_checkpoint(str(good), ('simsiam_linear',), '--model_path')


def test_resolve_device():
    assert utils.resolve_device('cpu') == torch.device('cpu')
    with pytest.raises(utils.UserError):
        utils.resolve_device('gpu0')
    if not torch.cuda.is_available():
        with pytest.raises(utils.UserError, match='CUDA is not available'):
            utils.resolve_device('cuda')
        assert utils.resolve_device('auto') == torch.device('cpu')


def test_a_signal_during_a_deferred_block_is_taken_after_it():
    finished = []
    with pytest.raises(utils._Signal) as e:
        with utils.signals_raise():
            with utils.signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler has run by now; it only noted the signal
                finished.append(True)
    assert finished == [True] and e.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
