"""The batched Gaussian blur of augment.py against torchvision, and the distribution of its parameters.

The reference is torchvision's tensor gaussian_blur (torchvision.transforms.functional.gaussian_blur on a
float tensor, and its v2 twin), applied image by image with the same sigma and kernel size. The batched
blur runs the same float32 kernel as two 1-D passes instead of one 2-D convolution, so the two agree to a
few float32 ulps of values in [0, 1]: atol 1e-5.
"""
import math

import pytest
import torch
import torchvision.transforms.functional as TF
import torchvision.transforms.v2.functional as TF2

import augment


SIGMAS = (0.1, 0.5, 1.0, 1.5, 2.0)


@pytest.fixture(scope='module')
def batch():
    """Five non-square RGB images in [0, 1], one per sigma of SIGMAS."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(5, 3, 40, 56, generator=g)


@pytest.mark.parametrize('kernel_size', [3, 7, 23])
def test_gaussian_blur_matches_torchvision_per_image(batch, kernel_size):
    sigma = torch.tensor(SIGMAS)
    ours = augment.gaussian_blur(batch, sigma, kernel_size)
    assert ours.shape == batch.shape and ours.dtype == torch.float32
    for b, s in enumerate(SIGMAS):
        for reference in (TF.gaussian_blur, TF2.gaussian_blur):
            theirs = reference(batch[b], [kernel_size, kernel_size], [s, s])
            torch.testing.assert_close(ours[b], theirs, atol=1e-5, rtol=0)
    # the sigmas differ enough that using another image's sigma would be caught
    wrong = TF.gaussian_blur(batch[1], [kernel_size, kernel_size], [SIGMAS[4], SIGMAS[4]])
    assert (ours[1] - wrong).abs().max() > 1e-3


def _reflect(i, n):
    """Index i of an axis of n pixels mirrored about the edge pixels, as 'reflect' padding (-1 -> 1)."""
    if i < 0:
        return -i
    if i >= n:
        return 2 * (n - 1) - i
    return i


def test_gaussian_blur_at_the_border_and_of_a_constant():
    # border and corner pixels against a direct float64 sum over reflected indices
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 9, 12, generator=g)
    sigma, k = torch.tensor([0.7, 1.8]), 7
    ours = augment.gaussian_blur(x, sigma, k)
    half = k // 2
    x64 = x.double()
    for b in range(2):
        t = torch.arange(k, dtype=torch.float64) - half
        kernel = torch.exp(-0.5 * (t / sigma[b].double()) ** 2)
        kernel = kernel / kernel.sum()
        for r, c in [(0, 0), (0, 5), (1, 11), (8, 0), (8, 11), (4, 1), (7, 10)]:
            rows = [_reflect(r + i - half, 9) for i in range(k)]
            cols = [_reflect(c + j - half, 12) for j in range(k)]
            patch = x64[b][:, rows][:, :, cols]  # C x k x k
            expected = (kernel[:, None] * kernel[None, :] * patch).sum(dim=(1, 2))
            torch.testing.assert_close(ours[b, :, r, c].double(), expected, atol=1e-6, rtol=0)
    # a blur of a constant image is the constant, at the border too
    const = torch.full((3, 2, 17, 23), 0.37)
    out = augment.gaussian_blur(const, torch.tensor([0.1, 1.0, 2.0]), 15)
    torch.testing.assert_close(out, const, atol=1e-6, rtol=0)


@pytest.mark.parametrize('applied', [
    [True, False, True, True, False],
    [False] * 5,
    [True] * 5,
])
def test_random_blur_blurs_just_the_applied_images(batch, applied):
    applied = torch.tensor(applied)
    sigma = torch.tensor(SIGMAS)
    kept = batch.clone()
    blurred = augment.gaussian_blur(batch, sigma, 7)
    results = []
    for select in (True, False):
        out = augment.random_blur(batch, applied, sigma, 7, select=select)
        assert out is not batch and torch.equal(batch, kept)  # a new tensor, the input untouched
        assert torch.equal(out[~applied], batch[~applied])  # bit for bit
        torch.testing.assert_close(out[applied], blurred[applied], atol=1e-6, rtol=0)
        if applied.any():
            assert (out[applied] - batch[applied]).abs().max() > 1e-2
        results.append(out)
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=0)
    # the default mode on a CPU is select=True
    assert torch.equal(augment.random_blur(batch, applied, sigma, 7), results[0])


def test_sample_blur_distribution_and_draw_order():
    n, p, sigma_range = 20000, 0.5, (0.1, 2.0)
    applied, sigma = augment.sample_blur(n, p, sigma_range, torch.Generator().manual_seed(2), 'cpu')
    assert applied.shape == (n,) and applied.dtype == torch.bool
    assert sigma.shape == (n,) and sigma.dtype == torch.float32
    assert abs(applied.float().mean().item() - p) < 0.01
    assert sigma.min().item() >= 0.1 and sigma.max().item() <= 2.0
    assert abs(sigma.mean().item() - 1.05) < 0.02
    assert sigma.std().item() == pytest.approx(1.9 / math.sqrt(12), rel=0.03)  # uniform, not e.g. constant
    # applied is drawn first, then sigma, from the module's helpers
    g = torch.Generator().manual_seed(2)
    assert torch.equal(applied, augment.bernoulli(n, p, g, 'cpu'))
    assert torch.equal(sigma, augment.uniform(n, *sigma_range, g, 'cpu'))


@pytest.mark.parametrize('image_size, expected', [(32, 3), (64, 7), (96, 9), (224, 23)])
def test_blur_kernel_size(image_size, expected):
    k = augment.blur_kernel_size(2.0, image_size)
    assert k == expected and k % 2 == 1
