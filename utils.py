"""The data side: CIFAR-10/100, STL-10 and image folders of any size loaded as uint8 images + labels at the
run's image size (with what the augmentation crops, in each image's own geometry), the memory check, the
paired-augmentation dataset (the seed's CIFAR10Pair, here `AugmentedViews`), the PIL transforms, each
epoch's batches and the source of augmented views for both augmentation paths, and the seeds every random
draw derives from."""
import dataclasses
import functools
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision import transforms as T

import augment
from augment import IMAGE_SIZE, LINEAR, MEAN, PRETRAIN, STD
from distributed import SINGLE
from errors import JobError, UserError
from signals import ignore_in_worker

DATASETS = ('cifar10', 'cifar100', 'stl10', 'folder')
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
    """A split of a dataset: uint8 images (N, 3, S, S) at the run's image size under the test transform,
    int64 labels (N,) (-1: unlabelled), and the class names; with the normalisation of the recipe.

    What the training augmentation crops, when it is not `images` itself: `views`, a uint8 canvas
    (N, 3, H, W) holding each image, downscaled with its aspect ratio kept (utils.stored_size), in its
    top-left (sizes[i] = its (height, width)); and `paths`, the image files, which the PIL path opens
    itself so that it crops the original.

    On the stream path nothing is decoded in advance: `images` is None, and the files are read batch by batch
    (stream.py) under the test transform of `image_size` and `test_resize`.
    """
    images: torch.Tensor
    labels: torch.Tensor
    classes: list
    views: torch.Tensor = None
    sizes: torch.Tensor = None
    paths: list = None
    mean: tuple = MEAN
    std: tuple = STD
    image_size: int = IMAGE_SIZE
    test_resize: float = 1.0

    def __len__(self):
        return len(self.labels)

    def subset(self, index):
        """The images at `index` (a tensor of indices or a bool mask), with what the augmentation crops."""
        pick = (lambda t: None if t is None else t[index])
        paths = None if self.paths is None else [self.paths[i] for i in torch.arange(len(self))[index].tolist()]
        return dataclasses.replace(self, images=pick(self.images), labels=self.labels[index], views=pick(self.views),
                                   sizes=pick(self.sizes), paths=paths)

    @property
    def crop_source(self):
        """(uint8 images, their sizes or None) that the batched augmentation crops."""
        return (self.images, None) if self.views is None else (self.views, self.sizes)


def refuse_damaged(archive, archive_ok, damaged, refetch, delete_damaged):
    """One line for a download that is damaged: the archive, when it is there and fails its MD5 check
    (archive_ok False), else the first of the extracted files that fail theirs (`damaged`) when there is no
    archive to unpack again. `refetch` and `delete_damaged` say what to do about each."""
    if os.path.exists(archive) and not archive_ok:
        raise UserError(f'{archive!r} is damaged (its MD5 sum is not the published one: truncated or '
                        f'another file); {refetch}')
    if damaged and not os.path.exists(archive):
        raise UserError(f'{damaged[0]!r} is damaged (its MD5 sum is not the published one); {delete_damaged}')


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
        refuse_damaged(archive, cifar.check_integrity(archive, cls.tgz_md5), damaged, refetch,
                       f'delete {folder!r} and put {cls.filename} in {where}/ (or let the script download it)')
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


def stored_size(height, width, image_size):
    """The (height, width) at which the batched path keeps an image of a folder for cropping: its own,
    downscaled (never enlarged, aspect ratio kept) so that its shorter side is at most image_size x 256/224
    (the resize of the ImageNet test transform: 256 px for 224) and its longer side at most twice that."""
    cap = round(image_size * 256 / 224)
    scale = min(1.0, cap / min(height, width), 2 * cap / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def host_memory_available():
    """Bytes of memory this machine can still give (MemAvailable), or None where that is unknown."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
        return None


MEMORY_BUDGET = 0.8  # of the memory available: what a dataset held in memory may take


def check_memory(needed, available, where, instead):
    """Refuse, before anything is decoded or trained, a dataset that would not fit: one line with what it
    needs, what there is, and the path to take instead."""
    if available is not None and needed > MEMORY_BUDGET * available:
        raise UserError(f'the dataset needs {needed / 2 ** 30:.2f} GiB of {where} memory and '
                        f'{available / 2 ** 30:.2f} GiB are available ({MEMORY_BUDGET:.0%} may be used): {instead}')


UNREADABLE = (UnidentifiedImageError, OSError, ValueError)  # what PIL raises for a file it cannot read


def _unreadable(path, split, e):
    why = 'it is empty' if os.path.getsize(path) == 0 else str(e).replace(repr(path), '').strip() or 'damaged'
    return UserError(f'cannot read image {path!r} ({why}): replace it with a readable image or '
                     f'move it out of {split!r}')


def _open_rgb(path, split):
    """The image file at `path`, decoded as RGB; one line naming it when it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.convert('RGB')
    except UNREADABLE as e:
        raise _unreadable(path, split, e) from None


def _header_size(path, split):
    """(height, width) from the file's header, without decoding it."""
    try:
        with Image.open(path) as img:
            return img.size[1], img.size[0]
    except UNREADABLE as e:
        raise _unreadable(path, split, e) from None


def load_stl10(root, split):
    """An STL-10 split ('train', 'test', 'unlabeled' or 'train+unlabeled') from torchvision's extracted
    binaries in `root/stl10_binary/`, else downloaded (the archive, if already in `root` and verified, is
    unpacked instead). Images are 96x96, uint8 (N, 3, 96, 96); labels are 0-based, -1 for the unlabeled
    images; 'train+unlabeled' is the train split followed by the unlabeled one.

    Pretraining uses 'train+unlabeled' (105k images); the kNN monitor's bank is the labelled 'train' split
    (5k) and its queries are 'test' (8k): the monitor never uses an image without a label.

    A binary of the wrong size, one that fails torchvision's MD5 check or cannot be read is named, with the
    fix, in one line; nothing is deleted."""
    import torchvision.datasets.stl10 as stl10  # check_integrity looked up here, where tests can replace it
    cls = stl10.STL10
    if split not in cls.splits:
        raise ValueError(f'split must be one of {", ".join(map(repr, cls.splits))}, not {split!r}')
    folder, archive = os.path.join(root, cls.base_folder), os.path.join(root, cls.filename)
    where = os.path.abspath(root)
    refetch = f'fetch {cls.filename} again from {cls.url} into {where}/'
    binaries = [(os.path.join(folder, file), md5) for file, md5 in cls.train_list + cls.test_list]
    path = dict((os.path.basename(p), p) for p, _ in binaries).get
    per_image = 3 * 96 * 96
    # sizes first (cheap): a truncated file is named as such before any MD5 sum is computed
    for x, y in (('train_X.bin', 'train_y.bin'), ('test_X.bin', 'test_y.bin'), ('unlabeled_X.bin', None)):
        if not os.path.isfile(path(x)):
            continue
        size = os.path.getsize(path(x))
        if size == 0 or size % per_image:
            raise UserError(f'{path(x)!r} is damaged ({size} bytes, not a whole number of {per_image}-byte '
                            f'96x96 images: truncated); delete it and {refetch}')
        if y and os.path.isfile(path(y)) and os.path.getsize(path(y)) != size // per_image:
            raise UserError(f'{path(y)!r} has {os.path.getsize(path(y))} labels for the {size // per_image} '
                            f'images of {path(x)!r}: one of them is truncated; delete both and {refetch}')

    def unreadable(e):
        why = str(e).splitlines()[0] if str(e).strip() else 'damaged'
        return UserError(f'the stl10 files in {folder!r} cannot be read ({type(e).__name__}: {why}); delete '
                         f'{folder!r} and {refetch}')

    try:
        ds = cls(root, split=split, download=False)  # torchvision checks the MD5 sums of all five binaries
    except RuntimeError:  # one of them is missing or fails the check
        ds = None
    except (ValueError, OSError) as e:
        raise unreadable(e) from None
    if ds is None:
        damaged = [p for p, md5 in binaries if os.path.isfile(p) and not stl10.check_integrity(p, md5)]
        refuse_damaged(archive, stl10.check_integrity(archive, cls.tgz_md5), damaged, f'delete it and {refetch}',
                       f'delete it and {refetch}')
        try:
            # torchvision skips the download when a verified archive is already in root, and unpacks it
            ds = cls(root, split=split, download=True)
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise UserError(f'{archive!r} cannot be unpacked ({e}): it is damaged; delete it and {refetch}') from None
        except ValueError as e:
            raise unreadable(e) from None
        except (OSError, RuntimeError) as e:  # urllib's URLError is an OSError
            reason = (str(getattr(e, 'reason', e)).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(
                f'stl10 is not in {root!r} and could not be downloaded ({reason}); on a machine with '
                f'internet fetch {cls.url} and put {cls.filename} in {where}/') from None
    names = os.path.join(folder, cls.class_names_file)
    classes = list(getattr(ds, 'classes', None) or [])
    if len(classes) != 10:
        what = f'has {len(classes)} class names, not 10' if os.path.isfile(names) else 'is missing'
        raise UserError(f'{names!r} {what}; extract it again from {cls.filename} (from {cls.url}) into '
                        f'{where}/')
    images = torch.from_numpy(np.ascontiguousarray(ds.data))  # torchvision already lays it out (N, 3, 96, 96)
    labels = torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))
    return ImageSet(images, labels, classes)


def list_folder(root, train, classes=None):
    """(the split's directory, its image files, their labels, the classes) of an image folder
    `root/{train,test}/<class>/*` (or `val/` for `test/`, as ImageNet's); the classes are the split's own
    unless given (the training split's, for its test split)."""
    if not os.path.isdir(root):
        raise UserError(f'--data_root {root!r} does not exist')
    split = os.path.join(root, 'train' if train else 'test')
    if not train and not os.path.isdir(split) and os.path.isdir(os.path.join(root, 'val')):
        split = os.path.join(root, 'val')  # the ImageNet layout
    if not os.path.isdir(split):
        raise UserError(f'--dataset folder: {split!r} is not a directory (expected {root}/train/<class>/*'
                        f' and {root}/test/<class>/*)')
    found = sorted(d for d in os.listdir(split) if os.path.isdir(os.path.join(split, d)))
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(f'{split!r} has classes that the training split lacks: {", ".join(unknown)}')
    paths, labels = [], []
    for label, cls in enumerate(classes):
        folder = os.path.join(split, cls)
        if not os.path.isdir(folder):
            continue
        for file in sorted(os.listdir(folder)):
            if file.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(folder, file))
                labels.append(label)
    if not paths:
        raise UserError(f'--dataset folder: no images found under {split!r}')
    return split, paths, labels, list(classes)


def kept_views(sizes, image_size, test_resize=1.0, views=True):
    """(the (height, width) at which the batched path keeps a copy of each image of `sizes` to crop, and the
    canvas (height, width) that holds them): none with `views` False, or for a folder whose images are all
    image_size square and left as they are by the test transform (they are their own copies)."""
    resized = round(image_size * test_resize) != image_size  # the test transform changes even a square image
    if not views or (not resized and all(size == (image_size, image_size) for size in sizes)):
        return [], (0, 0)
    stored = [stored_size(h, w, image_size) for h, w in sizes]
    return stored, (max(h for h, _ in stored), max(w for _, w in stored))


def held_bytes(sizes, image_size, test_resize=1.0, views=True):
    """The bytes the batched path holds of images of (height, width) `sizes`: each under the test transform,
    and the canvas of the copies it crops (kept_views)."""
    height, width = kept_views(sizes, image_size, test_resize, views)[1]
    return len(sizes) * 3 * (image_size ** 2 + height * width)


FOLDER_SAMPLE = 256  # the files whose headers --aug auto reads to estimate what a folder needs


def choose_aug(aug, dataset, root, image_size, test_resize, device):
    """(the augmentation path, why --aug auto chose it, or None when --aug named it): 'auto' takes 'batched'
    when the dataset fits in the memory budget (MEMORY_BUDGET of the host memory available, and of the GPU's
    free memory on CUDA), else 'stream'. A folder's need is estimated from the headers of FOLDER_SAMPLE of
    its files, spread evenly through it."""
    if aug != 'auto':
        return aug, None
    if dataset != 'folder':
        return 'batched', f'{dataset} is held in memory'
    split, paths, _, classes = list_folder(root, True)
    sample = paths[::max(1, len(paths) // FOLDER_SAMPLE)][:FOLDER_SAMPLE]
    sizes = [_header_size(path, split) for path in sample]
    test = len(list_folder(root, False, classes)[1])
    needed = held_bytes(sizes, image_size, test_resize) * len(paths) / len(sizes) + test * 3 * image_size ** 2
    budgets = [('host', host_memory_available())]
    if device.type == 'cuda':
        budgets.append(('GPU', torch.cuda.mem_get_info(device)[0]))
    for where, available in budgets:
        if available is not None and needed > MEMORY_BUDGET * available:
            return 'stream', (f'the folder would take about {needed / 2 ** 30:.2f} GiB in memory, over '
                              f'{MEMORY_BUDGET:.0%} of the {available / 2 ** 30:.2f} GiB of {where} memory available')
    return 'batched', f'the folder takes about {needed / 2 ** 30:.2f} GiB in memory, within the budget'


def load_folder(root, train, classes=None, image_size=IMAGE_SIZE, test_resize=1.0, views=True, decode=True):
    """An image folder `root/{train,test}/<class>/*` (or `val/` for `test/`, as ImageNet's) of any sizes and
    aspect ratios, images made RGB.

    `images` are the test transform's: the shorter side resized to image_size x test_resize, then the
    central image_size x image_size. With `views`, the batched path's copy of each image is kept too, at
    stored_size in a canvas (a folder of images all image_size x image_size needs none: they are their
    own). The memory all this takes is checked before the first image is decoded. Without `decode` (the
    stream path), the files are only listed.
    """
    split, paths, labels, classes = list_folder(root, train, classes)
    if not decode:
        return ImageSet(None, torch.tensor(labels), classes, paths=paths, image_size=image_size,
                        test_resize=test_resize)
    sizes = [_header_size(path, split) for path in paths]
    resized = round(image_size * test_resize) != image_size  # the test transform changes even a square image
    stored, canvas = kept_views(sizes, image_size, test_resize, views)
    keep = bool(stored)
    check_memory(held_bytes(sizes, image_size, test_resize, views), host_memory_available(), 'host',
                 'train with --aug stream, which reads the files batch by batch' if keep else
                 'use a smaller --image_size, or --aug stream')
    test = T.Compose([T.Resize(round(image_size * test_resize)), T.CenterCrop(image_size)])
    images = np.empty((len(paths), image_size, image_size, 3), np.uint8)
    kept = np.zeros((len(paths), canvas[0], canvas[1], 3), np.uint8) if keep else None
    for i, path in enumerate(paths):
        img = _open_rgb(path, split)
        images[i] = np.asarray(test(img) if resized or img.size != (image_size, image_size) else img, dtype=np.uint8)
        if keep:
            h, w = stored[i]
            small = img if img.size == (w, h) else img.resize((w, h), Image.BILINEAR)
            kept[i, :h, :w] = np.asarray(small, dtype=np.uint8)
    chw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    return ImageSet(chw(images), torch.tensor(labels), classes, chw(kept) if keep else None,
                    torch.tensor(stored) if keep else None, paths, image_size=image_size, test_resize=test_resize)


def at_size(data, image_size, test_resize=1.0):
    """A dataset of one geometry (CIFAR, STL-10) at the run's image size: its images under the test
    transform (shorter side to image_size x test_resize, then the central image_size x image_size), the
    originals kept as what the augmentation crops. Unchanged when they are that size already."""
    height, width = data.images.shape[-2:]
    resize = round(image_size * test_resize)
    if (height, width) == (image_size, image_size) and resize == image_size:
        return data
    check_memory(len(data) * 3 * image_size ** 2, host_memory_available(), 'host',
                 'use a smaller --image_size')
    scale = resize / min(height, width)
    size = (max(resize, round(height * scale)), max(resize, round(width * scale)))
    top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    images = torch.empty(len(data), 3, image_size, image_size, dtype=torch.uint8)
    for start in range(0, len(data), 1024):  # in chunks: a float copy of the whole split would not fit
        x = F.interpolate(data.images[start:start + 1024].float(), size=size, mode='bilinear', antialias=True,
                          align_corners=False)
        images[start:start + 1024] = x[..., top:top + image_size, left:left + image_size].round_().clamp_(0, 255)
    return ImageSet(images, data.labels, data.classes, views=data.images, mean=data.mean, std=data.std)


def load_dataset(name, root, train, classes=None, image_size=IMAGE_SIZE, test_resize=1.0, views=True,
                 split=None, decode=True):
    """A split of cifar10, cifar100, stl10 or an image folder at the run's image size, as an ImageSet
    (`split` names STL-10's: 'train', 'test', 'unlabeled' or 'train+unlabeled'); an image folder's files only
    listed without `decode` (the stream path, which only folders take)."""
    if not decode and name != 'folder':
        raise UserError(f'--aug stream reads the files of an image folder, and {name} comes as arrays that are '
                        f'held in memory: use --aug batched or pil (or auto)')
    if name in ('cifar10', 'cifar100'):
        return at_size(load_cifar(name, root, train), image_size, test_resize)
    if name == 'stl10':
        return at_size(load_stl10(root, split or ('train' if train else 'test')), image_size, test_resize)
    if name == 'folder':
        return load_folder(root, train, classes, image_size, test_resize, views, decode)
    raise UserError(f'unknown dataset {name!r}; choose from {", ".join(DATASETS)}')


def only_tested(data):
    """`data` without what only the training augmentation crops (its files too, unless they are all it has)."""
    return dataclasses.replace(data, views=None, sizes=None, paths=None if data.images is not None else data.paths)


def split_off(data, fraction, seed):
    """(rest, held out): a fixed `fraction` of `data`'s images, drawn from the seed, held out (for choosing
    among linear heads without the test set); the rest keeps its order."""
    held = torch.randperm(len(data), generator=generator(seed, 0xFA1))[:round(fraction * len(data))]
    if not len(held):
        return data, data.subset(held)  # nothing held out: no copy
    keep = torch.ones(len(data), dtype=torch.bool)
    keep[held] = False
    held = held.sort().values
    tested = only_tested(data)  # the held-out part is only tested
    return data.subset(keep), tested.subset(held)


def load_splits(name, root, image_size=IMAGE_SIZE, test_resize=1.0, mean=MEAN, std=STD, views=True, decode=True):
    """(train, test) labelled ImageSets of a dataset, normalised by mean and std; the test split uses the
    training split's classes. For STL-10, train is the labelled 5k; pretraining_set adds the unlabelled.
    Without `decode` (the stream path), a folder's files are only listed."""
    train = load_dataset(name, root, True, None, image_size, test_resize, views, decode=decode)
    test = load_dataset(name, root, False, train.classes, image_size, test_resize, False, decode=decode)
    return [dataclasses.replace(d, mean=tuple(mean), std=tuple(std)) for d in (train, test)]


def pretraining_set(name, root, train, image_size=IMAGE_SIZE, test_resize=1.0, views=True, decode=True):
    """What pretraining trains on: the labelled training split (`train`), and for STL-10 its 100k
    unlabelled images after it (labels -1; the kNN monitor uses only `train`)."""
    if name != 'stl10':
        return train
    unlabeled = load_dataset(name, root, True, None, image_size, test_resize, views, split='unlabeled', decode=decode)
    cat = lambda a, b: None if a is None else torch.cat([a, b])
    return ImageSet(torch.cat([train.images, unlabeled.images]), torch.cat([train.labels, unlabeled.labels]),
                    train.classes, cat(train.views, unlabeled.views), None, None, train.mean, train.std)


def capped(data, limit, seed, salt):
    """At most `limit` images of `data` (0 or None: all) under the test transform alone (what the kNN
    monitor reads): a fixed subset drawn from the seed, in the split's order."""
    if not limit or limit >= len(data):
        return data
    data = only_tested(data)  # no copy of the crop canvas
    return data.subset(torch.randperm(len(data), generator=generator(seed, 0xCA9, salt))[:limit].sort().values)


def require_a_step(batch_size, images, what='the training set'):
    """Refuse a batch larger than the `images` it is drawn from: incomplete batches are dropped, so no step
    would run."""
    if batch_size > images:
        raise JobError(f'--batch_size {batch_size} is larger than {what} ({images} images): no step would run')


# ----------------------------------------------------------------------------- augmentation (PIL path)

def pretrain_transform(mean=MEAN, std=STD, size=IMAGE_SIZE, recipe=PRETRAIN):
    """The SimSiam augmentation with a recipe's numbers: augment.PRETRAIN (CIFAR, paper App. D; no blur at
    32x32) or augment.IMAGENET_PRETRAIN (Sec. 4 and App. A, with the Gaussian blur)."""
    blur = [T.RandomApply([T.GaussianBlur(augment.blur_kernel_size(recipe['blur_sigma'][1], size),
                                          recipe['blur_sigma'])], p=recipe['blur_p'])] \
        if recipe.get('blur_p') else []
    return T.Compose([
        T.RandomResizedCrop(size, scale=recipe['scale'], ratio=recipe['ratio']),
        T.RandomHorizontalFlip(p=recipe['flip_p']),
        T.RandomApply([T.ColorJitter(*recipe['jitter'])], p=recipe['jitter_p']),
        T.RandomGrayscale(p=recipe['grey_p']),
        *blur,
        T.ToTensor(),
        T.Normalize(recipe.get('mean', mean), recipe.get('std', std)),
    ])


def linear_transform(mean=MEAN, std=STD, size=IMAGE_SIZE, recipe=LINEAR):
    """Linear-evaluation training augmentation: random resized crop and flip, with augment.LINEAR's numbers."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=recipe['scale'], ratio=recipe['ratio']),
        T.RandomHorizontalFlip(p=recipe['flip_p']),
        T.ToTensor(),
        T.Normalize(recipe.get('mean', mean), recipe.get('std', std)),
    ])


class AugmentedViews(torch.utils.data.Dataset):
    """`views` independently augmented views of each image, plus its label (CIFAR10Pair for views=2).

    Items are addressed by (epoch, index): the randomness of an item is a fixed function of
    (seed, epoch, index), so it does not depend on the worker that draws it, on the number of workers,
    or on what ran before; an interrupted run resumed at an epoch boundary sees the same views.
    """

    def __init__(self, data, transform, seed, views=2):
        self.paths = data.paths  # an image folder's files: opened here, so that the crop sees the original
        source = data.images if data.views is None else data.views
        self.hwc = None if self.paths else np.ascontiguousarray(source.permute(0, 2, 3, 1).numpy())
        self.labels = data.labels
        self.transform = transform
        self.seed = seed
        self.views = views

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        epoch, index = key
        img = _open_rgb(self.paths[index], os.path.dirname(self.paths[index])) if self.paths else \
            Image.fromarray(self.hwc[index])
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

    def __init__(self, data, stage, aug, seed, device, num_workers=0, world=SINGLE, size=IMAGE_SIZE, recipe=None):
        assert stage in ('pretrain', 'linear') and aug in ('batched', 'pil')
        self.views = 2 if stage == 'pretrain' else 1
        self.aug, self.seed, self.device = aug, seed, device
        self.num_workers, self.world = num_workers, world
        self.n = len(data)
        recipe = recipe or (PRETRAIN if stage == 'pretrain' else LINEAR)
        if aug == 'pil':
            transform = (pretrain_transform if stage == 'pretrain' else linear_transform)(size=size, recipe=recipe)
            self.dataset = AugmentedViews(data, transform, seed, self.views)
        else:
            images, sizes = data.crop_source
            if device.type == 'cuda':
                free, _ = torch.cuda.mem_get_info(device)
                check_memory(images.numel(), free, 'GPU', 'train with --aug pil, which augments in DataLoader '
                                                          'workers and keeps only each batch on the GPU')
            self.images = images.to(device)
            self.sizes = None if sizes is None else sizes.to(device)
            self.labels = data.labels.to(device)
            self.augment = functools.partial(
                augment.pretrain_augment if stage == 'pretrain' else augment.linear_augment, config=recipe, size=size)

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
            sizes = None if self.sizes is None else self.sizes[index].repeat(self.views, 1)
            # all views of a batch in one call: per-image randomness makes them independent
            views = self.augment(images.repeat(self.views, 1, 1, 1), gen, sizes=sizes).chunk(self.views)
            yield list(views), self.labels[index]
