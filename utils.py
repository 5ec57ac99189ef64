"""The data side: CIFAR-10/100 and image folders loaded as uint8 images + labels, the paired-augmentation
dataset (the seed's CIFAR10Pair, here `AugmentedViews`), the PIL transforms, each epoch's batches and the
source of augmented views for both augmentation paths, and the seeds every random draw derives from."""
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms as T

import augment
from augment import IMAGE_SIZE, LINEAR, MEAN, PRETRAIN, STD
from distributed import SINGLE
from errors import JobError, UserError
from signals import ignore_in_worker
from speed import AUGMENTATIONS

DATASETS = ('cifar10', 'cifar100', 'folder')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.ppm', '.pgm', '.tif', '.tiff', '.webp', '.gif')


# ----------------------------------------------------------------------------- seeds

def derive_seed(*parts):
    """A 63-bit seed that is a fixed function of integers (seed, epoch, index, ...), SplitMix64 mixing."""
    mask = (1 << 64) - 1
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (int(part) & mask)) & mask
        h = (h + 0x9E3779B97F4A7C15) & mask
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & mask
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & mask
        h ^= h >> 31
    return h >> 1


def generator(*parts, device='cpu'):
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


# ----------------------------------------------------------------------------- datasets

@dataclass
class ImageSet:
    """A split of a dataset: uint8 images (N, 3, H, W), int64 labels (N,), and the class names."""
    images: torch.Tensor
    labels: torch.Tensor
    classes: list

    def __len__(self):
        return len(self.labels)


def load_cifar(name, root, train):
    """A CIFAR split from torchvision's files in `root`: the extracted batches, else the archive (verified
    and unpacked), else downloaded. A file there that fails torchvision's MD5 check or cannot be read is
    named, with the fix; nothing is deleted."""
    import torchvision.datasets.cifar as cifar  # check_integrity looked up here, where tests can replace it
    cls = cifar.CIFAR10 if name == 'cifar10' else cifar.CIFAR100
    archive, folder = os.path.join(root, cls.filename), os.path.join(root, cls.base_folder)
    where = os.path.abspath(root)
    refetch = f'delete it and fetch {cls.filename} again from {cls.url} into {where}/'
    batches = [(os.path.join(folder, file), md5) for file, md5 in cls.train_list + cls.test_list]
    if not all(os.path.isfile(path) and cifar.check_integrity(path, md5) for path, md5 in batches):
        damaged = [path for path, md5 in batches if os.path.exists(path) and not cifar.check_integrity(path, md5)]
        if os.path.exists(archive) and not cifar.check_integrity(archive, cls.tgz_md5):
            raise UserError(f'{archive!r} is damaged (its MD5 sum is not the published one: truncated or '
                            f'another file); {refetch}')
        if damaged and not os.path.exists(archive):
            raise UserError(f'{damaged[0]!r} is damaged (its MD5 sum is not the published one); delete '
                            f'{folder!r} and put {cls.filename} in {where}/ (or let the script download it)')
        try:
            # torchvision skips the download when a verified archive is already in root, and unpacks it
            cls(root, train=train, download=True)
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise UserError(f'{archive!r} cannot be unpacked ({e}): it is damaged; {refetch}') from None
        except (OSError, RuntimeError) as e:
            reason = str(getattr(e, 'reason', e)).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(
                f'{name} is not in {root!r} and could not be downloaded ({reason}); on a machine with '
                f'internet fetch {cls.url} and put {cls.filename} in {where}/') from None
    try:
        ds = cls(root, train=train, download=False)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, RuntimeError, OSError) as e:
        raise UserError(f'the {name} files in {folder!r} cannot be read ({type(e).__name__}: '
                        f'{str(e).splitlines()[0] if str(e) else "damaged"}); delete {folder!r} and put '
                        f'{cls.filename} in {where}/ (or let the script download it)') from None
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    return ImageSet(images, labels, list(ds.classes))


def load_folder(root, train, classes=None):
    """An image folder `root/{train,test}/<class>/*`; images become RGB and are resized to 32x32."""
    split = os.path.join(root, 'train' if train else 'test')
    if not os.path.isdir(split):
        raise UserError(f'--dataset folder: {split!r} is not a directory (expected {root}/train/<class>/*'
                        f' and {root}/test/<class>/*)')
    found = sorted(d for d in os.listdir(split) if os.path.isdir(os.path.join(split, d)))
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(f'{split!r} has classes that the training split lacks: {", ".join(unknown)}')
    images, labels = [], []
    for label, cls in enumerate(classes):
        folder = os.path.join(split, cls)
        if not os.path.isdir(folder):
            continue
        for file in sorted(os.listdir(folder)):
            if not file.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(folder, file)
            try:
                with Image.open(path) as img:
                    img = img.convert('RGB').resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            except (UnidentifiedImageError, OSError, ValueError) as e:
                why = 'it is empty' if os.path.getsize(path) == 0 else str(e).replace(repr(path), '').strip() or 'damaged'
                raise UserError(f'cannot read image {path!r} ({why}): replace it with a readable image or '
                                f'move it out of {split!r}') from None
            images.append(np.asarray(img, dtype=np.uint8))
            labels.append(label)
    if not images:
        raise UserError(f'--dataset folder: no images found under {split!r}')
    array = np.stack(images).transpose(0, 3, 1, 2)
    return ImageSet(torch.from_numpy(np.ascontiguousarray(array)), torch.tensor(labels), list(classes))


def load_dataset(name, root, train, classes=None):
    """Either split of cifar10, cifar100 or an image folder, as an ImageSet."""
    if name in ('cifar10', 'cifar100'):
        return load_cifar(name, root, train)
    if name == 'folder':
        if not os.path.isdir(root):
            raise UserError(f'--data_root {root!r} does not exist')
        return load_folder(root, train, classes)
    raise UserError(f'unknown dataset {name!r}; choose from {", ".join(DATASETS)}')


def split_off(data, fraction, seed):
    """(rest, held out): a fixed `fraction` of `data`'s images, drawn from the seed, held out (for choosing
    among linear heads without the test set); the rest keeps its order."""
    held = torch.randperm(len(data), generator=generator(seed, 0xFA1))[:round(fraction * len(data))]
    keep = torch.ones(len(data), dtype=torch.bool)
    keep[held] = False
    held = held.sort().values
    return (ImageSet(data.images[keep], data.labels[keep], data.classes),
            ImageSet(data.images[held], data.labels[held], data.classes))


def load_splits(name, root):
    """(train, test) ImageSets of a dataset; the test split uses the training split's classes."""
    train = load_dataset(name, root, train=True)
    return train, load_dataset(name, root, train=False, classes=train.classes)


def require_a_step(batch_size, images, what='the training set'):
    """Refuse a batch larger than the `images` it is drawn from: incomplete batches are dropped, so no step
    would run."""
    if batch_size > images:
        raise JobError(f'--batch_size {batch_size} is larger than {what} ({images} images): no step would run')


# ----------------------------------------------------------------------------- augmentation (PIL path)

def pretrain_transform(mean=MEAN, std=STD, size=IMAGE_SIZE, recipe=PRETRAIN):
    """The SimSiam CIFAR augmentation (paper Sec. 4 and App. D; no blur at 32x32), with augment.PRETRAIN's
    numbers."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=recipe['scale'], ratio=recipe['ratio']),
        T.RandomHorizontalFlip(p=recipe['flip_p']),
        T.RandomApply([T.ColorJitter(*recipe['jitter'])], p=recipe['jitter_p']),
        T.RandomGrayscale(p=recipe['grey_p']),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def linear_transform(mean=MEAN, std=STD, size=IMAGE_SIZE, recipe=LINEAR):
    """Linear-evaluation training augmentation: random resized crop and flip, with augment.LINEAR's numbers."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=recipe['scale'], ratio=recipe['ratio']),
        T.RandomHorizontalFlip(p=recipe['flip_p']),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


class AugmentedViews(torch.utils.data.Dataset):
    """`views` independently augmented views of each image, plus its label (CIFAR10Pair for views=2).

    Items are addressed by (epoch, index): the randomness of an item is a fixed function of
    (seed, epoch, index), so it does not depend on the worker that draws it, on the number of workers,
    or on what ran before; an interrupted run resumed at an epoch boundary sees the same views.
    """

    def __init__(self, data, transform, seed, views=2):
        self.hwc = np.ascontiguousarray(data.images.permute(0, 2, 3, 1).numpy())
        self.labels = data.labels
        self.transform = transform
        self.seed = seed
        self.views = views

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        epoch, index = key
        img = Image.fromarray(self.hwc[index])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, epoch, index))
            views = [self.transform(img) for _ in range(self.views)]
        return (*views, self.labels[index])


def epoch_batches(n, batch_size, seed, epoch, rank=0, world_size=1):
    """This process's index batches for one epoch: a shuffle that depends only on (seed, epoch).

    Incomplete final batches are dropped (a BN layer needs more than one sample). With world_size W,
    each global batch of `batch_size` is split into W consecutive slices and this rank takes its own.
    """
    order = torch.randperm(n, generator=generator(seed, epoch))
    local = batch_size // world_size
    steps = n // batch_size
    return [order[s * batch_size + rank * local: s * batch_size + (rank + 1) * local] for s in range(steps)]


class EpochBatchSampler:
    """A DataLoader batch_sampler over epoch_batches that yields (epoch, index) keys."""

    def __init__(self, n, batch_size, seed, epoch, rank=0, world_size=1):
        self.batches = epoch_batches(n, batch_size, seed, epoch, rank, world_size)
        self.epoch = epoch

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            yield [(self.epoch, int(i)) for i in batch]


class ViewSource:
    """Each epoch's batches of augmented views, already on the device, from one of two paths.

    'pil': the reference path, per-image PIL transforms (pretrain_transform or linear_transform) in
    DataLoader worker processes. 'batched': the whole uint8 dataset lives on the device and whole
    batches are augmented there (augment.pretrain_augment or augment.linear_augment) with a generator
    seeded by (seed, epoch, rank). Both iterate over epoch_batches, so they see the same images in the
    same order; only the augmentation randomness differs. Yields ([view, ...], labels).
    """

    def __init__(self, data, stage, aug, seed, device, num_workers=0, world=SINGLE):
        assert stage in ('pretrain', 'linear') and aug in AUGMENTATIONS
        self.views = 2 if stage == 'pretrain' else 1
        self.aug, self.seed, self.device = aug, seed, device
        self.num_workers, self.world = num_workers, world
        self.n = len(data)
        if aug == 'pil':
            transform = pretrain_transform() if stage == 'pretrain' else linear_transform()
            self.dataset = AugmentedViews(data, transform, seed, self.views)
        else:
            self.images = data.images.to(device)
            self.labels = data.labels.to(device)
            self.augment = augment.pretrain_augment if stage == 'pretrain' else augment.linear_augment

    def epoch(self, epoch, batch_size):
        """(iterable of ([views], labels), number of steps) for one epoch."""
        if self.aug == 'pil':
            sampler = EpochBatchSampler(self.n, batch_size, self.seed, epoch, self.world.rank,
                                        self.world.world_size)
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                pin_memory=self.device.type == 'cuda', worker_init_fn=ignore_in_worker)
            return self._from_loader(loader), len(loader)
        batches = epoch_batches(self.n, batch_size, self.seed, epoch, self.world.rank, self.world.world_size)
        if not batches:
            return iter(()), 0
        batches = torch.stack(batches).to(self.device)  # one copy per epoch, not one per step
        return self._batched(batches, generator(self.seed, epoch, self.world.rank, device=self.device)), len(batches)

    def _from_loader(self, loader):
        for *views, labels in loader:
            yield [v.to(self.device, non_blocking=True) for v in views], labels.to(self.device, non_blocking=True)

    def _batched(self, batches, gen):
        for index in batches:
            images = self.images[index]
            # all views of a batch in one call: per-image randomness makes them independent
            views = self.augment(images.repeat(self.views, 1, 1, 1), gen).chunk(self.views)
            yield list(views), self.labels[index]
