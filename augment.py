"""Batched, on-device versions of the SimSiam and linear-evaluation augmentations.

Each function takes a whole batch (B, 3, H, W) on any device and draws every random parameter per image
from a `torch.Generator`, with the distributions of the torchvision transforms the PIL path uses
(utils.pretrain_transform, utils.linear_transform): RandomResizedCrop, RandomHorizontalFlip,
RandomApply(ColorJitter) with a random operation order per image, RandomGrayscale. The operations follow
torchvision's tensor functional ops (bilinear resampling without corner alignment, `_blend` with
clamping, ITU-R 601 grey weights, hue shift in HSV), so with the same parameters they agree to float32
rounding; tests/test_augment.py pins both the operations and the distributions.
"""
import math

import torch
import torch.nn.functional as F


IMAGE_SIZE = 32
# Per-channel statistics of the CIFAR-10 training set, as the reference code uses for every dataset.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)

GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale for tensors
# The one copy of the recipe's numbers (paper Sec. 4 and App. D, as the official code's CIFAR
# augmentation); the PIL transforms of utils.py read them too.
PRETRAIN = {
    'scale': (0.2, 1.0),  # RandomResizedCrop area fraction; 0.2, not torchvision's 0.08, as for SimSiam
    'ratio': (3 / 4, 4 / 3),  # RandomResizedCrop aspect ratio, torchvision's default
    'flip_p': 0.5,  # horizontal flip
    'jitter_p': 0.8,  # ColorJitter applied with this probability
    'jitter': (0.4, 0.4, 0.4, 0.1),  # ColorJitter brightness, contrast, saturation, hue
    'grey_p': 0.2,  # RandomGrayscale
}
LINEAR = {  # linear evaluation's training augmentation: crop and flip only
    'scale': (0.08, 1.0),
    'ratio': (3 / 4, 4 / 3),
    'flip_p': 0.5,
}
CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop.get_params


def uniform(n, low, high, generator, device):
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def bernoulli(n, p, generator, device):
    return torch.rand(n, generator=generator, device=device) < p


# ----------------------------------------------------------------------------- random resized crop

def sample_crops(n, height, width, scale, ratio, generator, device):
    """Crop boxes (top, left, h, w), each (n,) int64, distributed as RandomResizedCrop.get_params.

    Up to 10 attempts per image of area ~ U(scale) x H x W and log aspect ratio ~ U(log ratio); the first
    box that fits is used; if none fits, the central crop with the ratio clamped into range.
    """
    area = height * width
    target = area * uniform((n, CROP_ATTEMPTS), *scale, generator, device)
    aspect = torch.exp(uniform((n, CROP_ATTEMPTS), math.log(ratio[0]), math.log(ratio[1]), generator, device))
    w = torch.sqrt(target * aspect).round().long()
    h = torch.sqrt(target / aspect).round().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first fitting attempt
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    found = fits.any(dim=1)
    # fallback: a central crop, as torchvision
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    top = (uniform(n, 0, 1, generator, device) * (height - h + 1)).long().clamp(max=height - h)
    left = (uniform(n, 0, 1, generator, device) * (width - w + 1)).long().clamp(max=width - w)
    top = torch.where(found, top, (height - h) // 2)
    left = torch.where(found, left, (width - w) // 2)
    return top, left, h, w


def _source_coords(start, length, full, size):
    """Normalised grid_sample coordinates (B, size) that resample [start, start + length) of an axis of
    `full` pixels to `size` pixels bilinearly, as torch's interpolate(align_corners=False) resizes the
    cropped image: pixel centres aligned, source positions clamped into the crop (never reaching a
    pixel outside it)."""
    scale = length.to(torch.float32)[:, None] / size  # Bx1
    dst = torch.arange(size, device=start.device, dtype=torch.float32)[None, :] + 0.5
    src = (scale * dst - 0.5).clamp(min=0)  # BxS, in crop coordinates
    src = torch.minimum(src, (length - 1).to(torch.float32)[:, None]) + start[:, None]
    return (2 * src + 1) / full - 1


def resized_crop(x, top, left, h, w, size=IMAGE_SIZE, flip=None):
    """Crop box b of image b, resized bilinearly to size x size: (B, C, H, W) -> (B, C, size, size).

    flip (B,) bool, optional, mirrors the result horizontally at no cost (the column taps are reversed).
    """
    B, _, H, W = x.shape
    gy = _source_coords(top, h, H, size)  # BxS
    gx = _source_coords(left, w, W, size)  # BxS
    if flip is not None:
        gx = torch.where(flip[:, None], gx.flip(1), gx)
    grid = torch.stack([gx[:, None, :].expand(B, size, size), gy[:, :, None].expand(B, size, size)], dim=-1)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)


def hflip(x, flip):
    """Mirror the images where flip (B,) is True."""
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# ----------------------------------------------------------------------------- colour

def grey(x):
    """Luma (B, 1, H, W) of RGB images in [0, 1]."""
    r, g, b = x.unbind(dim=1)
    return (GREY_WEIGHTS[0] * r).add_(g, alpha=GREY_WEIGHTS[1]).add_(b, alpha=GREY_WEIGHTS[2]).unsqueeze(1)


# The four jitter operations work in place on x (a private copy in every caller): on a CPU a fresh
# 12 MB tensor per operation costs more than the arithmetic. factor is (B,), one value per image.

def _blend_(x, other, factor):
    """x <- clamp(factor x + (1 - factor) other, 0, 1), torchvision's _blend."""
    factor = factor[:, None, None, None]
    return x.mul_(factor).add_(other * (1.0 - factor)).clamp_(0.0, 1.0)


def adjust_brightness_(x, factor):
    """Scale by factor, clamped to [0, 1] (a blend with black)."""
    return x.mul_(factor[:, None, None, None]).clamp_(0.0, 1.0)


def adjust_contrast_(x, factor):
    """Blend with the mean luma of each image."""
    return _blend_(x, grey(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation_(x, factor):
    """Blend with each image's own grey version."""
    return _blend_(x, grey(x), factor)


def adjust_hue_(x, factor):
    """factor in [-0.5, 0.5]: rotate the hue by factor of a full turn, keeping value and saturation.

    RGB -> HSV -> RGB as torchvision does, with the hue kept in sixths of a turn (h6 in [-1, 5)) and the
    inverse written without branches: channel n = v - chroma * clamp(2 - |k - 2|, 0, 1), where
    k = (n + h6) mod 6 for n = 5, 3, 1 (R, G, B) and chroma = v * s = max - min.
    """
    r, g, b = x.unbind(dim=1)
    v = x.amax(dim=1)
    chroma = v - x.amin(dim=1)
    is_r, is_g = v == r, v == g
    h6 = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g))
    h6.div_(torch.where(chroma == 0, 1.0, chroma))
    h6.add_(torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0))).add_(6.0 * factor[:, None, None])
    k = torch.empty_like(h6)
    for channel, n in enumerate((5.0, 3.0, 1.0)):
        torch.add(h6, n, out=k).remainder_(6.0).sub_(2.0).abs_()
        k.neg_().add_(2.0).clamp_(0.0, 1.0).mul_(chroma)
        torch.sub(v, k, out=x[:, channel])
    return x


JITTER_OPS = (adjust_brightness_, adjust_contrast_, adjust_saturation_, adjust_hue_)


def sample_jitter(n, strength, p, generator, device):
    """Per image: applied (n,) bool, factors (n, 4) for brightness, contrast, saturation, hue, and the
    order (n, 4) of the four operations, a uniform random permutation per image as ColorJitter draws."""
    b, c, s, hue = strength
    applied = bernoulli(n, p, generator, device)
    factors = torch.stack([uniform(n, 1 - b, 1 + b, generator, device), uniform(n, 1 - c, 1 + c, generator, device),
                           uniform(n, 1 - s, 1 + s, generator, device), uniform(n, -hue, hue, generator, device)],
                          dim=1)
    order = torch.rand(n, 4, generator=generator, device=device).argsort(dim=1)
    return applied, factors, order


def color_jitter(x, applied, factors, order, select=None):
    """Apply the four jitter operations in each image's own order to the images where `applied`.

    select=True (the default on a CPU): each operation runs on just the images that take it at that
    position. select=False (the default elsewhere, since picking those images would stall a GPU stream
    for their count): every operation runs on the whole batch and a mask keeps the right result.
    """
    if select is None:
        select = x.device.type == 'cpu'
    x = x.clone()
    for position in range(4):
        step = order[:, position]
        if select:
            for op_id, op in enumerate(JITTER_OPS):
                index = (applied & (step == op_id)).nonzero().squeeze(1)
                if len(index):
                    x[index] = op(x[index], factors[index, op_id])
        else:
            out = x
            for op_id, op in enumerate(JITTER_OPS):
                take = (applied & (step == op_id))[:, None, None, None]
                out = torch.where(take, op(x.clone(), factors[:, op_id]), out)
            x = out
    return x


def random_grey(x, to_grey):
    """Replace the images where to_grey (B,) by their 3-channel grey version."""
    return torch.where(to_grey[:, None, None, None], grey(x), x)


def normalize(images, mean=MEAN, std=STD):
    """The test transform on a batch (N, 3, H, W): exactly ToTensor() then Normalize() for uint8 images;
    float images are taken to be in [0, 1] already."""
    x = to_float(images) if images.dtype == torch.uint8 else images
    mean = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def to_float(images):
    """uint8 (B, 3, H, W) -> float32 in [0, 1], as ToTensor."""
    return images.to(torch.float32).div_(255)


# ----------------------------------------------------------------------------- the pipelines

def _crop_and_flip(images, generator, config, size):
    """RandomResizedCrop and RandomHorizontalFlip of a uint8 batch, in one resampling: float32 in [0, 1]."""
    n, _, height, width = images.shape
    box = sample_crops(n, height, width, config['scale'], config['ratio'], generator, images.device)
    flip = bernoulli(n, config['flip_p'], generator, images.device)
    return resized_crop(to_float(images), *box, size, flip=flip)


def pretrain_augment(images, generator, config=PRETRAIN, size=IMAGE_SIZE):
    """The SimSiam augmentation of utils.pretrain_transform on a uint8 batch; returns normalised float32."""
    n, device = len(images), images.device
    x = _crop_and_flip(images, generator, config, size)
    x = color_jitter(x, *sample_jitter(n, config['jitter'], config['jitter_p'], generator, device))
    x = random_grey(x, bernoulli(n, config['grey_p'], generator, device))
    return normalize(x)


def linear_augment(images, generator, config=LINEAR, size=IMAGE_SIZE):
    """The linear-evaluation augmentation of utils.linear_transform on a uint8 batch."""
    return normalize(_crop_and_flip(images, generator, config, size))
