"""The stream path: a dataset of image files read batch by batch, never held in memory.

DataLoader workers read each batch's files. A JPEG that the GPU can decode goes to the device as its
bytes and is decoded there, the whole batch in one call (TorchCodec's nvJPEG decoder, or torchvision's
where TorchCodec is not installed); every other file (PNG, CMYK JPEG, ..., and every file when the device
is a CPU) is decoded by the worker with PIL. Each image is decoded once for both its views. The random
parameters of an image's views are drawn by the worker, per image, from (seed, epoch, index), in the
image's own geometry, with the distributions of augment.py: an image's views do not depend on the batch,
the process or the worker that takes it. The crops are resized to the image size with torchvision's
RandomResizedCrop resampling (bilinear, antialiased) on the device, by the worker itself when the device
is the CPU; the flip, jitter, grey and blur then run on the whole batch (augment.colour). On a CPU device
the workers make the whole batch (their cores are the device's). The test transform (shorter side
resized, central crop) runs the same way.

A file that cannot be read stops the run with one line naming it (DamagedImage).
"""
import io
import os
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import augment
from augment import LINEAR, PRETRAIN
from distributed import SINGLE
from errors import DataError
from signals import ignore_in_worker
from utils import UNREADABLE, EpochBatchSampler, generator

JPEG_MODES = ('RGB', 'L')
EXIF_ORIENTATION = 0x0112  # the JPEGs the GPU decodes; CMYK and YCCK ones are decoded on the CPU


class DamagedImage(DataError):
    """An image file of the dataset that cannot be read, met during a run."""


# ----------------------------------------------------------------------------- the GPU decoder

def gpu_decoder():
    """(decode(list of 1-D uint8 CPU tensors, device) -> list of (3, H, W) uint8 RGB, its name): TorchCodec's
    batched nvJPEG decoder where it is installed, else torchvision's (deprecated since 0.29 for it)."""
    try:
        from torchcodec.decoders import decode_jpeg
        return (lambda data, device: decode_jpeg(data, mode='RGB', device=device)), 'torchcodec'
    except ImportError:
        from torchvision.io import ImageReadMode, decode_jpeg

        def decode(data, device):
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')  # its deprecation warning, once per batch
                return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        return decode, 'torchvision'


# ----------------------------------------------------------------------------- in the workers

def damaged(path, why):
    """The error of an image file of a class folder that cannot be read, `why` it cannot."""
    return DamagedImage(f'cannot read image {path!r} ({why}): replace it with a readable image or move it out of '
                        f'{os.path.dirname(os.path.dirname(path))!r}')


def _why(path, error):
    if os.path.exists(path) and os.path.getsize(path) == 0:
        return 'it is empty'
    text = str(error).replace(repr(path), '').strip()
    return 'not an image file' if 'cannot identify image file' in text else text or type(error).__name__


def read_image(path, on_gpu):
    """(what the device gets, the image's (height, width)): the file's bytes as a 1-D uint8 tensor when
    `on_gpu` and it is a JPEG that the GPU decodes, else the image decoded here, (3, H, W) uint8 RGB.
    Raises one of UNREADABLE for a file that cannot be read."""
    with open(path, 'rb') as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as img:
        size = img.size[1], img.size[0]
        # a JPEG cut short lacks its end-of-image marker: the CPU decoder names it, nvJPEG might not; TorchCodec
        # turns a JPEG by its EXIF orientation, which no other path does, so such a JPEG is decoded here
        if on_gpu and img.format == 'JPEG' and img.mode in JPEG_MODES and data.rstrip(b'\0')[-2:] == b'\xff\xd9' \
                and img.getexif().get(EXIF_ORIENTATION, 1) == 1:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), size
        rgb = img.convert('RGB')
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous(), size


def crop_views(image, boxes, size, flips=None):
    """The crops (top, left, h, w) of `boxes` (V, 4) of a (3, H, W) uint8 image, each resized to size x size
    as torchvision's RandomResizedCrop resamples (bilinear, antialiased), and mirrored where `flips` (V,):
    (V, 3, size, size) uint8."""
    flips = [False] * len(boxes) if flips is None else flips.tolist()  # host values: no device sync per image
    return torch.stack([TF.horizontal_flip(view) if flip else view for view, flip in
                        ((TF.resized_crop(image, *box, [size, size], antialias=True), flip)
                         for box, flip in zip(boxes.tolist(), flips))])


def test_view(image, size, resize):
    """The test transform of a (3, H, W) uint8 image: the shorter side resized to `resize`, then the
    central size x size. (1, 3, size, size) uint8."""
    return TF.center_crop(TF.resize(image, resize, antialias=True), [size, size])[None]


class FileViews(torch.utils.data.Dataset):
    """The items of a stream batch, addressed by (epoch, index) for augmented views, or by index alone for
    the test transform.

    An item is (index, label, kind, payload, params): kind 'views' with payload the views (V, 3, S, S)
    uint8 already cropped and resized (the CPU device), 'image' with the decoded image, 'jpeg' with its
    bytes (decoded on the GPU), or 'damaged' with the reason the file cannot be read (the main process
    reports it: an error raised in a worker would reach it with the worker's traceback in its text).
    params are the views' random parameters (augment.sample_pretrain or sample_linear, V per image).
    """

    def __init__(self, paths, labels, stage, seed, size, recipe=None, device_type='cpu', test_resize=1.0):
        assert stage in ('pretrain', 'linear', 'test')
        self.paths, self.labels, self.stage, self.seed, self.size = paths, labels, stage, seed, size
        self.recipe = recipe or (PRETRAIN if stage == 'pretrain' else LINEAR)
        self.on_gpu = device_type == 'cuda'
        self.resize = round(size * test_resize)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (None, key)
        label, path = int(self.labels[index]), self.paths[index]
        try:
            payload, (height, width) = read_image(path, self.on_gpu)
        except UNREADABLE as e:
            return index, label, 'damaged', (path, _why(path, e)), None
        if self.stage == 'test':
            params = None
        else:
            sample = augment.sample_pretrain if self.stage == 'pretrain' else augment.sample_linear
            views = 2 if self.stage == 'pretrain' else 1
            params = sample(views, height, width, generator(self.seed, epoch, index), self.recipe)
        if payload.dim() == 1:
            return index, label, 'jpeg', (payload, path), params
        if self.on_gpu:
            return index, label, 'image', payload, params
        views = test_view(payload, self.size, self.resize) if params is None else \
            crop_views(payload, params['box'], self.size, params['flip'])
        return index, label, 'views', views, params


# ----------------------------------------------------------------------------- on the device

class Batches:
    """Turns the items of a batch into ([views], labels) on the device; a damaged file stops the run."""

    def __init__(self, stage, device, size, recipe, test_resize=1.0):
        self.stage, self.device, self.size, self.recipe = stage, device, size, recipe
        self.resize = round(size * test_resize)
        self.views = {'pretrain': 2, 'linear': 1, 'test': 1}[stage]
        self.decode = gpu_decoder()[0] if device.type == 'cuda' else None

    def images(self, items):
        """The batch's views (V x B, 3, S, S) uint8 on the device, view-major."""
        for _, _, kind, payload, _ in items:
            if kind == 'damaged':
                raise damaged(*payload)
        jpegs = [i for i, item in enumerate(items) if item[2] == 'jpeg']
        decoded = dict(zip(jpegs, self.on_gpu([items[i][3] for i in jpegs]))) if jpegs else {}
        views = []
        for i, (_, _, kind, payload, params) in enumerate(items):
            if kind == 'views':
                views.append(payload.to(self.device, non_blocking=True))
                continue
            image = decoded[i] if kind == 'jpeg' else payload.to(self.device, non_blocking=True)
            views.append(test_view(image, self.size, self.resize) if params is None else
                         crop_views(image, params['box'], self.size, params['flip']))
        # (B, V, 3, S, S) -> view-major (V x B, 3, S, S): the first views of all images, then the second
        return torch.stack(views).transpose(0, 1).flatten(0, 1)

    def on_gpu(self, jpegs):
        """The (bytes, path) of a batch's JPEGs decoded on the GPU in one call; should the decoder refuse one,
        each is decoded alone, and what it refuses is decoded on the CPU (a file that cannot be read at
        all stops the run)."""
        try:
            return self.decode([data for data, _ in jpegs], self.device)
        except RuntimeError:
            pass
        out = []
        for data, path in jpegs:
            try:
                out.append(self.decode([data], self.device)[0])
            except RuntimeError:
                try:
                    with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
                        rgb = np.array(img.convert('RGB'))
                except UNREADABLE as e:
                    raise damaged(path, _why(path, e)) from None
                out.append(torch.from_numpy(rgb).permute(2, 0, 1).to(self.device))
        return out

    def __call__(self, items):
        images = self.images(items)
        labels = torch.tensor([item[1] for item in items], dtype=torch.int64).to(self.device, non_blocking=True)
        if self.stage == 'test':
            return [images], labels
        params = {key: torch.stack([item[4][key] for item in items], dim=1).flatten(0, 1).to(self.device,
                                                                                              non_blocking=True)
                  for key in items[0][4] if key != 'box'}  # the boxes were used in the crops
        x = augment.colour(augment.to_float(images), params, self.recipe, self.size)
        return list(x.chunk(self.views)), labels


class _Failed:
    """What a worker hands over in place of a batch with a damaged file: the line to report. (An exception
    raised in a worker reaches the main process with the worker's traceback in its text.)"""

    def __init__(self, line):
        self.line = line


class _Collate:
    """The DataLoader's collate_fn, run by the workers: on a CPU device the whole batch is made there (their
    cores are the device's), `batches` (a Batches); on a GPU, the items are handed over as they are."""

    def __init__(self, batches):
        self.batches = batches

    def __call__(self, items):
        if self.batches is None:
            return items
        try:
            return self.batches(items)
        except DamagedImage as e:
            return _Failed(str(e))


def batches_of(dataset, sampler, num_workers, batches):
    """The batches ([views], labels) on the device of `dataset`'s items as `sampler` groups them, read by
    `num_workers` DataLoader workers and made by `batches` (a Batches): in the workers on a CPU device, in
    this process (which decodes on the GPU) on a GPU."""
    on_gpu = batches.device.type == 'cuda'
    for batch in torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                             collate_fn=_Collate(None if on_gpu else batches), pin_memory=on_gpu,
                                             worker_init_fn=ignore_in_worker):
        if isinstance(batch, _Failed):
            raise DamagedImage(batch.line)
        yield batches(batch) if on_gpu else batch


class StreamSource:
    """Each epoch's batches of augmented views of an image folder's files, on the device: the stream path's
    counterpart of utils.ViewSource, over the same epoch_batches (torchrun: each process reads its own
    slice of every global batch). Yields ([view, ...], labels)."""

    def __init__(self, data, stage, seed, device, num_workers=0, world=SINGLE, size=augment.IMAGE_SIZE,
                 recipe=None):
        assert stage in ('pretrain', 'linear') and data.paths is not None
        recipe = recipe or (PRETRAIN if stage == 'pretrain' else LINEAR)
        self.dataset = FileViews(data.paths, data.labels, stage, seed, size, recipe, device.type)
        self.batches = Batches(stage, device, size, recipe)
        self.seed, self.device, self.num_workers, self.world, self.n = seed, device, num_workers, world, len(data)

    def epoch(self, epoch, batch_size):
        """(iterable of ([views], labels), number of steps) for one epoch."""
        sampler = EpochBatchSampler(self.n, batch_size, self.seed, epoch, self.world.rank, self.world.world_size)
        return batches_of(self.dataset, sampler, self.num_workers, self.batches), len(sampler)


class _Ranges:
    """A batch sampler over given (start, stop) row ranges."""

    def __init__(self, ranges):
        self.ranges = ranges

    def __len__(self):
        return len(self.ranges)

    def __iter__(self):
        return (list(range(start, stop)) for start, stop in self.ranges)


def test_images(data, ranges, device, num_workers=0):
    """(uint8 images (B, 3, S, S), labels (B,)) on the device, of the rows [start, stop) of each of `ranges`
    of an ImageSet under the test transform, in order: sliced from its images, or, for a set of files (the
    stream path), read, decoded and transformed batch by batch. A damaged file stops with one line (a test
    set is never shortened: its numbers would no longer be comparable)."""
    if data.images is not None:
        for start, stop in ranges:
            yield (data.images[start:stop].to(device, non_blocking=True),
                   data.labels[start:stop].to(device, non_blocking=True))
        return
    dataset = FileViews(data.paths, data.labels, 'test', 0, data.image_size, device_type=device.type,
                        test_resize=data.test_resize)
    batches = Batches('test', device, data.image_size, None, test_resize=data.test_resize)
    for (images,), labels in batches_of(dataset, _Ranges(ranges), num_workers, batches):
        yield images, labels


def pictures(data, index):
    """The images at `index` (a tensor of indices, of any shape) of an ImageSet under the test transform,
    uint8 (*index.shape, 3, S, S) on the CPU: taken from its images, or read from its files."""
    if data.images is not None:
        return data.images[index]
    files = FileViews(data.paths, data.labels, 'test', 0, data.image_size, test_resize=data.test_resize)
    batches = Batches('test', torch.device('cpu'), data.image_size, None, test_resize=data.test_resize)
    (images,), _ = batches([files[i] for i in index.flatten().tolist()])
    return images.view(*index.shape, *images.shape[1:])
