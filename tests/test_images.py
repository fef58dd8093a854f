import io
import os

import numpy as np
import pytest
from PIL import Image

from pipeline.beam import images
from tests.helpers import photos_dir


def _photo(width=400, height=300, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def _encode(img, fmt="JPEG", **kwargs):
    out = io.BytesIO()
    img.save(out, fmt, **kwargs)
    return out.getvalue()


def _decode(jpeg):
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.float64)


def test_central_box_maps_to_the_centre_square():
    assert images.central_box(512, 256, 256) == (128.0, 0.0, 384.0, 256.0)
    assert images.central_box(300, 600, 150) == (0.0, 150.0, 300.0, 450.0)


@pytest.mark.parametrize("size", [(400, 300), (300, 700), (3000, 80), (256, 256)])
def test_resize_and_crop_matches_resizing_all_then_cropping(size):
    img = _photo(*size)
    scale = 256 / min(size)
    full = img.resize((round(size[0] * scale), round(size[1] * scale)), Image.Resampling.BICUBIC)
    left, top = (full.width - 256) // 2, (full.height - 256) // 2
    expected = np.asarray(full.crop((left, top, left + 256, top + 256)), np.float64)
    got = np.asarray(images.resize_and_crop(img), np.float64)
    assert got.shape == (256, 256, 3)
    assert np.abs(got - expected).mean() < 1.0


def test_convert_writes_a_256_jpeg_of_the_returned_pixels():
    jpeg, pixels = images.convert(_encode(_photo(500, 375)), quality=95)
    assert pixels.shape == (256, 256, 3) and pixels.dtype == np.uint8
    assert jpeg[:2] == b"\xff\xd8"
    assert np.abs(_decode(jpeg) - pixels).mean() < 2.0


def test_formats_and_modes_all_become_the_same_rgb():
    img = _photo()
    _, reference = images.convert(_encode(img, "PNG"))
    for data in (_encode(img, quality=98), _encode(img, "BMP"), _encode(img, quality=98, progressive=True)):
        _, pixels = images.convert(data)
        assert np.abs(pixels.astype(float) - reference).mean() < 2.0
    _, gray = images.convert(_encode(img.convert("L")))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    _, cmyk = images.convert(_encode(img.convert("CMYK"), quality=98))
    assert np.abs(cmyk.astype(float) - reference).mean() < 6.0


def test_transparent_pixels_are_composited_over_white():
    rgba = _photo().convert("RGBA")
    rgba.putalpha(0)
    _, pixels = images.convert(_encode(rgba, "PNG"))
    assert (pixels == 255).all()


def test_exif_orientation_is_applied():
    img = _photo(400, 300)
    exif = Image.Exif()
    exif[0x0112] = 6  # Stored rotated: a viewer turns it 90 degrees clockwise.
    _, rotated = images.convert(_encode(img, quality=98, exif=exif))
    _, upright = images.convert(_encode(img.transpose(Image.Transpose.ROTATE_270), quality=98))
    assert np.abs(rotated.astype(float) - upright).mean() < 2.0


@pytest.mark.parametrize(
    "data, kwargs, reason",
    [
        (b"", {}, "empty file"),
        (b"<html>not an image</html>", {}, "not an image"),
        (_encode(_photo())[:3000], {}, "truncated"),
        (_encode(_photo(40, 20)), {}, "too small"),
        (_encode(_photo(400, 300)), {"max_pixels": 100_000}, "too large"),
    ],
)
def test_bad_input_is_rejected_with_its_reason(data, kwargs, reason):
    with pytest.raises(images.Rejected, match=reason):
        images.convert(data, **kwargs)


# What each real-world oddity in ../shared/data/photos/oddities must give: the original photo's conversion
# (within JPEG noise), that turned clockwise, a different but valid crop, or a rejection with this reason.
ODDITIES = {
    "n02123045_cmyk.JPEG": "same",
    "n02123045_empty.JPEG": "empty file",
    "n02123045_gray.JPEG": "gray",
    "n02123045_png_named_jpeg.JPEG": "same",
    "n02123045_progressive.JPEG": "same",
    "n02123045_truncated50.JPEG": "truncated",
    "n07920052_bmp_named_jpeg.JPEG": "same",
    "n07920052_exif_orient6.JPEG": "turned",  # The original's pixels, tagged 6: shown turned 90 deg clockwise.
    "n07920052_huge_8000x5333.JPEG": "same",
    "n07920052_panorama_3000x80.JPEG": "valid",
    "n07920052_rgba_png_named_jpeg.JPEG": "same",
    "n07920052_trailing_garbage.JPEG": "same",
}


@pytest.mark.parametrize("name, expected", sorted(ODDITIES.items()))
def test_real_oddities_are_converted_or_rejected_as_designed(name, expected):
    root = photos_dir()
    wnid = name.split("_")[0]
    with open(os.path.join(root, "oddities", "train", wnid, name), "rb") as f:
        data = f.read()
    if expected not in ("same", "turned", "gray", "valid"):
        with pytest.raises(images.Rejected, match=expected):
            images.convert(data)
        return
    _, pixels = images.convert(data)
    with open(os.path.join(root, "train", wnid, f"{wnid}_0.JPEG"), "rb") as f:
        _, original = images.convert(f.read())
    if expected == "turned":
        original = np.rot90(original, k=-1)
    if expected == "gray":
        luma = np.asarray(Image.fromarray(original).convert("L"), float)
        assert np.abs(pixels[..., 0] - luma).mean() < 4.0
    elif expected in ("same", "turned"):
        assert np.abs(pixels.astype(float) - original).mean() < 4.0
    else:
        assert pixels.shape == (256, 256, 3) and pixels.std() > 10
