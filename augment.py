"""Batched, on-device versions of the SimSiam and linear-evaluation augmentations.

Each function takes a whole batch (B, 3, H, W) on any device and draws every random parameter per image
from a `torch.Generator`, with the distributions of the torchvision transforms the PIL path uses
(utils.pretrain_transform, utils.linear_transform): RandomResizedCrop, RandomHorizontalFlip,
RandomApply(ColorJitter) with a random operation order per image, RandomGrayscale. The operations follow
torchvision's tensor functional ops (bilinear resampling without corner alignment, `_blend` with
clamping, ITU-R 601 grey weights, hue shift in HSV), so with the same parameters they agree to float32
rounding; tests/test_augment.py pins both the operations and the distributions. The crop's resampling has
no antialiasing: where a crop is shrunk (large images) it is sharper than the PIL path's, which filters.
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
    'mean': MEAN, 'std': STD,  # Normalize
}
LINEAR = {  # linear evaluation's training augmentation: crop and flip only
    'scale': (0.08, 1.0),
    'ratio': (3 / 4, 4 / 3),
    'flip_p': 0.5,
    'mean': MEAN, 'std': STD,
}
# The ImageNet recipe (paper Sec. 4 and App. A, as the official code's ImageNet augmentation): the same
# crop, jitter, grey and flip, a Gaussian blur, and the ImageNet statistics. Its test transform resizes
# the shorter side to 256/224 of the image size, then takes the central crop.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_PRETRAIN = {**PRETRAIN, 'blur_p': 0.5, 'blur_sigma': (0.1, 2.0), 'mean': IMAGENET_MEAN,
                     'std': IMAGENET_STD}
IMAGENET_LINEAR = {**LINEAR, 'mean': IMAGENET_MEAN, 'std': IMAGENET_STD}
IMAGENET_TEST_RESIZE = 256 / 224
CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop.get_params


def uniform(n, low, high, generator, device):
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def bernoulli(n, p, generator, device):
    return torch.rand(n, generator=generator, device=device) < p


# ----------------------------------------------------------------------------- random resized crop

def sample_crops(n, height, width, scale, ratio, generator, device):
    """Crop boxes (top, left, h, w), each (n,) int64, distributed as RandomResizedCrop.get_params.

    height and width are the images' own sizes: ints for a batch of one geometry, or (n,) tensors of each
    image's, so that each box is drawn in its image's geometry. Up to 10 attempts per image of area
    ~ U(scale) x H x W and log aspect ratio ~ U(log ratio); the first box that fits is used; if none fits,
    the central crop with the ratio clamped into range.
    """
    height = torch.as_tensor(height, device=device).expand(n)
    width = torch.as_tensor(width, device=device).expand(n)
    area = (height * width)[:, None]
    target = area * uniform((n, CROP_ATTEMPTS), *scale, generator, device)
    aspect = torch.exp(uniform((n, CROP_ATTEMPTS), math.log(ratio[0]), math.log(ratio[1]), generator, device))
    w = torch.sqrt(target * aspect).round().long()
    h = torch.sqrt(target / aspect).round().long()
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first fitting attempt
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    found = fits.any(dim=1)
    # fallback: a central crop, as torchvision
    in_ratio = width / height
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fw = torch.where(wide, (height * max(ratio)).round().long(), width)
    fh = torch.where(narrow, (width / min(ratio)).round().long(), height)
    w = torch.where(found, w, fw)
    h = torch.where(found, h, fh)
    top = (uniform(n, 0, 1, generator, device) * (height - h + 1)).long()
    top = torch.minimum(top, height - h)
    left = (uniform(n, 0, 1, generator, device) * (width - w + 1)).long()
    left = torch.minimum(left, width - w)
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


def random_grey(x, to_grey, select=None):
    """Replace the images where to_grey (B,) by their 3-channel grey version. select=True (the default on a
    CPU): only those images are made grey; select=False: the whole batch, a mask keeping the right version."""
    if select is None:
        select = x.device.type == 'cpu'
    if not select:
        return torch.where(to_grey[:, None, None, None], grey(x), x)
    out = x.clone()
    index = to_grey.nonzero().squeeze(1)
    if len(index):
        out[index] = grey(x[index]).expand(-1, 3, -1, -1)
    return out


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


# ----------------------------------------------------------------------------- blur

def blur_kernel_size(sigma_max, image_size):
    """The odd kernel size of a Gaussian blur with sigma up to sigma_max on images of image_size pixels.

    The rule of the torchvision-style SimCLR/BYOL recipes: about 10% of the image size, rounded down to
    an odd number, and at least 3 (224 px: 23, 96 px: 9, 64 px: 7, 32 px: 3). Only the image size enters
    the rule; sigma_max is taken so that callers state the range the kernel serves, and is not used: on
    small images the kernel is narrower than 6 sigma_max and cuts the Gaussian's tails, as in those recipes.
    """
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def _gaussian_kernels(sigma, kernel_size, dtype):
    """One normalised 1-D Gaussian kernel per sigma: (B,) -> (B, kernel_size), as torchvision's tensor
    gaussian_blur builds it: exp(-0.5 (t / sigma)^2) over kernel_size taps t from -(k - 1) / 2 to
    (k - 1) / 2, divided by its sum."""
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, steps=kernel_size, dtype=dtype, device=sigma.device)
    pdf = torch.exp(-0.5 * (t[None, :] / sigma.to(dtype)[:, None]).pow(2))
    return pdf / pdf.sum(dim=1, keepdim=True)


def gaussian_blur(x, sigma, kernel_size):
    """Blur image b of x (B, C, H, W) float with a Gaussian of standard deviation sigma[b] (sigma (B,)).

    Equal, to float32 rounding, to torchvision's tensor gaussian_blur(img, [k, k], [s, s]) on each image:
    the same 1-D kernel, the same 'reflect' padding of (k - 1) / 2 pixels on every side (which needs
    kernel_size // 2 < H and < W). The 2-D kernel is the outer product of the 1-D one, so the blur runs as
    a horizontal then a vertical pass, each one grouped convolution over all B x C channels of the batch.
    """
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f'kernel_size must be an odd positive int, got {kernel_size}')
    B, C, H, W = x.shape
    if B == 0:
        return x.clone()
    pad = kernel_size // 2
    weight = _gaussian_kernels(sigma, kernel_size, x.dtype).repeat_interleave(C, dim=0)  # (B*C, k)
    out = F.pad(x, (pad, pad, pad, pad), mode='reflect').reshape(1, B * C, H + 2 * pad, W + 2 * pad)
    out = F.conv2d(out, weight[:, None, None, :], groups=B * C)  # along rows: (1, B*C, H + 2 pad, W)
    out = F.conv2d(out, weight[:, None, :, None], groups=B * C)  # along columns: (1, B*C, H, W)
    return out.reshape(B, C, H, W)


def sample_blur(n, p, sigma_range, generator, device):
    """Per image: applied (n,) bool with probability p, then sigma (n,) ~ U(sigma_range), drawn for every
    image whether or not it is blurred."""
    applied = bernoulli(n, p, generator, device)
    sigma = uniform(n, *sigma_range, generator, device)
    return applied, sigma


def random_blur(x, applied, sigma, kernel_size, select=None):
    """Blur the images where applied (B,) with their own sigma (B,); the others are returned unchanged.

    select=True (the default on a CPU): only the images that are blurred go through gaussian_blur.
    select=False (the default elsewhere, since picking those images would stall a GPU stream for their
    count): the whole batch is blurred and a mask keeps each image's right version. Returns a new tensor.
    """
    if select is None:
        select = x.device.type == 'cpu'
    if select:
        out = x.clone()
        index = applied.nonzero().squeeze(1)
        if len(index):
            out[index] = gaussian_blur(x[index], sigma[index], kernel_size)
        return out
    return torch.where(applied[:, None, None, None], gaussian_blur(x, sigma, kernel_size), x)


# ----------------------------------------------------------------------------- the pipelines

def sample_pretrain(n, height, width, generator, config=PRETRAIN, device='cpu'):
    """Every random parameter of the SimSiam augmentation for n images (height and width: ints, or (n,)
    tensors of each image's own size), drawn in the order pretrain_augment draws them: the crop box, the
    flip, the jitter, the grey, the blur. A dict of (n, ...) tensors."""
    box = sample_crops(n, height, width, config['scale'], config['ratio'], generator, device)
    params = {'box': torch.stack(box, dim=1), 'flip': bernoulli(n, config['flip_p'], generator, device)}
    params['jitter'], params['factors'], params['order'] = sample_jitter(n, config['jitter'], config['jitter_p'],
                                                                         generator, device)
    params['grey'] = bernoulli(n, config['grey_p'], generator, device)
    if config.get('blur_p'):
        params['blur'], params['sigma'] = sample_blur(n, config['blur_p'], config['blur_sigma'], generator, device)
    return params


def sample_linear(n, height, width, generator, config=LINEAR, device='cpu'):
    """The random parameters of the linear-evaluation augmentation (the crop box and the flip)."""
    box = sample_crops(n, height, width, config['scale'], config['ratio'], generator, device)
    return {'box': torch.stack(box, dim=1), 'flip': bernoulli(n, config['flip_p'], generator, device)}


def colour(x, params, config=PRETRAIN, size=IMAGE_SIZE):
    """What follows the crop and the flip, on float images in [0, 1] with the parameters of `params`: the
    jitter, the grey and (where the recipe has it) the blur; then the normalisation."""
    if 'jitter' in params:
        x = color_jitter(x, params['jitter'], params['factors'], params['order'])
        x = random_grey(x, params['grey'])
    if 'blur' in params:
        x = random_blur(x, params['blur'], params['sigma'], blur_kernel_size(config['blur_sigma'][1], size))
    return normalize(x, config.get('mean', MEAN), config.get('std', STD))


def _crop_and_flip(images, params, size):
    """RandomResizedCrop and RandomHorizontalFlip of a uint8 batch with the boxes and flips of `params`, in
    one resampling: float32 in [0, 1]."""
    return resized_crop(to_float(images), *params['box'].unbind(1), size, flip=params['flip'])


def _sizes(images, sizes):
    """(height, width) of the images of a batch: the batch's, or each image's of `sizes` (n, 2), its
    (height, width) in the top-left corner of its canvas."""
    return images.shape[-2:] if sizes is None else (sizes[:, 0], sizes[:, 1])


def pretrain_augment(images, generator, config=PRETRAIN, size=IMAGE_SIZE, sizes=None):
    """The SimSiam augmentation of utils.pretrain_transform on a uint8 batch; returns normalised float32."""
    params = sample_pretrain(len(images), *_sizes(images, sizes), generator, config, images.device)
    return colour(_crop_and_flip(images, params, size), params, config, size)


def linear_augment(images, generator, config=LINEAR, size=IMAGE_SIZE, sizes=None):
    """The linear-evaluation augmentation of utils.linear_transform on a uint8 batch."""
    params = sample_linear(len(images), *_sizes(images, sizes), generator, config, images.device)
    return colour(_crop_and_flip(images, params, size), params, config, size)
