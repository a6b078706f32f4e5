"""resize_uint8 checked byte for byte against PIL's Image.resize (BILINEAR and BICUBIC)."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_engine.frontend.resize import BICUBIC, BILINEAR, resize_uint8

FILTERS = [BILINEAR, BICUBIC]


def pil_resize(chw: torch.Tensor, size: tuple[int, int], resample: int) -> torch.Tensor:
    hwc = chw.permute(1, 2, 0).numpy()
    out = Image.fromarray(hwc).resize((size[1], size[0]), resample=resample, reducing_gap=None)
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)


def check(chw: torch.Tensor, size: tuple[int, int], resample: int) -> None:
    out = resize_uint8(chw, size, resample)
    assert out.dtype == torch.uint8 and out.shape == (3, *size)
    torch.testing.assert_close(out, pil_resize(chw, size, resample), rtol=0, atol=0)


def random_image(rng: np.random.Generator, h: int, w: int) -> torch.Tensor:
    return torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))


def structured_images(h: int, w: int) -> dict[str, torch.Tensor]:
    yy, xx = np.indices((h, w))
    gradient = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256])
    checker = np.broadcast_to(((xx + yy) % 2) * 255, (3, h, w))
    stripes = np.broadcast_to((xx // 3 % 2) * 255, (3, h, w))
    images = {
        "gradient": gradient,
        "checker": checker,
        "stripes": stripes,
        "zeros": np.zeros((3, h, w)),
        "full": np.full((3, h, w), 255),
    }
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.uint8)) for k, v in images.items()}


@pytest.mark.parametrize("resample", FILTERS)
def test_gemma3_case(resample: int) -> None:
    rng = np.random.default_rng(0)
    check(random_image(rng, 480, 640), (896, 896), resample)
    check(random_image(rng, 640, 480), (896, 896), resample)


@pytest.mark.parametrize("resample", FILTERS)
def test_random_sizes(resample: int) -> None:
    rng = np.random.default_rng(resample)
    dims = [1, 2, 3, 4, 5, 7, 8, 13, 31, 64, 99, 100, 101, 255, 256, 479, 896, 897, 1000]
    for i in range(120):
        h, w, out_h, out_w = (int(d) for d in rng.choice(dims, 4))
        if i % 5 == 0:
            out_h = h  # only the horizontal pass runs
        elif i % 5 == 1:
            out_w = w  # only the vertical pass runs
        check(random_image(rng, h, w), (out_h, out_w), resample)


@pytest.mark.parametrize("resample", FILTERS)
@pytest.mark.parametrize(
    "shape",
    [
        ((1, 1), (896, 896)),
        ((1, 1), (1, 1)),
        ((5, 1), (1, 1)),
        ((1, 5), (3, 7)),
        ((300, 20), (17, 400)),  # down in y, up in x
        ((20, 300), (400, 17)),  # up in y, down in x
        ((123, 457), (123, 91)),
        ((457, 123), (91, 123)),
        ((37, 53), (37, 53)),
        ((10, 10), (9, 11)),
    ],
)
def test_axis_cases(shape: tuple[tuple[int, int], tuple[int, int]], resample: int) -> None:
    (h, w), size = shape
    check(random_image(np.random.default_rng(h * w), h, w), size, resample)


@pytest.mark.parametrize("resample", FILTERS)
def test_large_downscale(resample: int) -> None:
    rng = np.random.default_rng(7)
    check(random_image(rng, 2000, 3000), (896, 896), resample)
    check(random_image(rng, 2500, 40), (896, 896), resample)


@pytest.mark.parametrize("resample", FILTERS)
def test_tall_image_is_resized_vertically_first(resample: int) -> None:
    # Image.resize swaps the passes when h > 100 * w and the height shrinks
    rng = np.random.default_rng(3)
    for (h, w), size in [((2000, 1), (896, 896)), ((500, 4), (37, 9)), ((1000, 3), (50, 7))]:
        check(random_image(rng, h, w), size, resample)
    check(random_image(rng, 500, 5), (40, 9), resample)  # exactly 100x: horizontal first


@pytest.mark.parametrize("resample", FILTERS)
def test_structured_content(resample: int) -> None:
    # Black/white edges make bicubic overshoot, so the clip to 0..255 is exercised.
    for (h, w), size in [((480, 640), (896, 896)), ((61, 47), (20, 150)), ((7, 900), (30, 64))]:
        for image in structured_images(h, w).values():
            check(image, size, resample)


def test_same_size_returns_a_copy() -> None:
    image = random_image(np.random.default_rng(0), 12, 34)
    out = resize_uint8(image, (12, 34), BILINEAR)
    assert torch.equal(out, image) and out.data_ptr() != image.data_ptr()


@pytest.mark.parametrize("resample", FILTERS)
def test_batched(resample: int) -> None:
    rng = np.random.default_rng(5)
    batch = torch.from_numpy(rng.integers(0, 256, (2, 3, 3, 45, 70), dtype=np.uint8))
    out = resize_uint8(batch, (64, 33), resample)
    assert out.shape == (2, 3, 3, 64, 33)
    for i in range(2):
        for j in range(3):
            assert torch.equal(out[i, j], pil_resize(batch[i, j], (64, 33), resample))
    # a non-contiguous (channels-last) input gives the same bytes
    hwc = batch[0, 0].permute(1, 2, 0).contiguous()
    assert torch.equal(resize_uint8(hwc.permute(2, 0, 1), (64, 33), resample), out[0, 0])


def test_errors() -> None:
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    with pytest.raises(TypeError, match="uint8"):
        resize_uint8(image.float(), (4, 4), BILINEAR)
    for bad in (torch.zeros(4, 8, 8, dtype=torch.uint8), torch.zeros(8, 8, dtype=torch.uint8)):
        with pytest.raises(ValueError, match=r"\[\.\.\., 3, h, w\]"):
            resize_uint8(bad, (4, 4), BILINEAR)
    with pytest.raises(ValueError, match="h, w >= 1"):
        resize_uint8(torch.zeros(3, 0, 8, dtype=torch.uint8), (4, 4), BILINEAR)
    with pytest.raises(ValueError, match="positive"):
        resize_uint8(image, (0, 4), BILINEAR)
    with pytest.raises(ValueError, match="BILINEAR"):
        resize_uint8(image, (4, 4), 0)  # NEAREST is not implemented
