"""Converting one raw image (§2): any format PIL decodes -> RGB -> shorter side 256 -> central 256x256 -> JPEG.

Choices (docs/choices.md, "Conversion"):
- EXIF orientation is applied, so the stored image is upright as a viewer shows it.
- Transparency is composited over white, as a browser shows it on a white page.
- Only the central region is resampled (PIL's ``box``), with an antialiased bicubic filter; large JPEGs are first
  decoded at a reduced DCT scale (``draft``) that still leaves the shorter side >= 256.
"""

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps

from pipeline import example_spec

JPEG_QUALITY = 90
MIN_SIDE = 32
MAX_PIXELS = 100_000_000
ORIENTATION = 0x0112  # The EXIF tag.


class Rejected(Exception):
    """The image is not written; the message is the reason listed in the rejected file."""


def _open(data, max_pixels, min_side):
    if not data:
        raise Rejected("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise Rejected(f"too large: {e}") from None
    except Exception as e:  # PIL raises many types for undecodable data.
        raise Rejected(f"not an image PIL can decode: {e}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise Rejected(f"too large: {width}x{height} is over --max_pixels={max_pixels}")
    if min(width, height) < min_side:
        raise Rejected(f"too small: {width}x{height} has a side under --min_side={min_side}")
    return img


def _decode(img, size):
    scale = size / min(img.size)
    img.draft("RGB", (math.ceil(img.size[0] * scale), math.ceil(img.size[1] * scale)))
    try:
        img.load()
    except Exception as e:
        raise Rejected(f"truncated or corrupt: {e}") from None
    if img.getexif().get(ORIENTATION, 1) != 1:  # exif_transpose copies even upright images: skip those.
        img = ImageOps.exif_transpose(img)
    return _to_rgb(img)


def _to_rgb(img):
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def central_box(width, height, size):
    """Source-pixel box that maps onto the central size x size patch after scaling the shorter side to size."""
    scale = size / min(width, height)
    out_w, out_h = round(width * scale), round(height * scale)
    left, top = (out_w - size) // 2, (out_h - size) // 2
    return (left / scale, top / scale, (left + size) / scale, (top + size) / scale)


def resize_and_crop(img, size=example_spec.IMAGE_SIZE):
    """§2: rescale so the shorter side is `size`, then take the central size x size patch."""
    box = central_box(*img.size, size)
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box)


def convert(
    data,
    *,
    size=example_spec.IMAGE_SIZE,
    quality=JPEG_QUALITY,
    min_side=MIN_SIDE,
    max_pixels=MAX_PIXELS,
):
    """Returns (jpeg_bytes, uint8 HxWx3 pixels as encoded); raises Rejected with the reason."""
    img = _decode(_open(data, max_pixels, min_side), size)
    img = resize_and_crop(img, size)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue(), np.asarray(img)


def convert_or_reject(data, **kwargs):
    """(JPEG bytes, None), or (None, the reason) when the image is rejected: one image never fails the job,
    whatever PIL raises on it (decoding, EXIF transposition, mode conversion)."""
    try:
        return convert(data, **kwargs)[0], None
    except Rejected as e:
        return None, str(e)
    except Exception as e:  # PIL raises many types on bad data.
        return None, f"cannot convert: {type(e).__name__}: {e}"
