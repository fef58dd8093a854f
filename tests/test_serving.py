"""The served signature's limits (tools/serving.py): an image's size read from its header, and requests beyond
the limits refused, naming the limit, before any pixel is decoded."""

import glob
import io
import os
import struct

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.helpers import eager_compiled_and_in_data, photos_dir
from tools import serving


def _encoded(width, height, kind):
    out = io.BytesIO()
    Image.new("RGB", (width, height), (30, 120, 200)).save(out, kind)
    return out.getvalue()


def _claiming(width, height):
    """A 64x64 JPEG whose frame header claims width x height: a few hundred bytes that decode huge."""
    data = bytearray(_encoded(64, 64, "JPEG"))
    frame = data.index(b"\xff\xc0")
    data[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("kind", ["JPEG", "PNG", "GIF", "BMP"])
@pytest.mark.parametrize("width, height", [(300, 200), (37, 1201), (1, 1)])
def test_the_header_gives_the_images_size_in_every_format(kind, width, height):
    data = tf.constant(_encoded(width, height, kind))
    got = eager_compiled_and_in_data(serving.header_size, data)
    assert np.asarray(got).tolist() == [height, width]


def test_the_header_gives_real_photos_sizes_whatever_their_names_say():
    """CMYK, grayscale, progressive JPEGs, PNG and BMP data named .JPEG, EXIF-rotated (the stored size), a panorama
    and an 8000x5333 photo."""
    paths = sorted(glob.glob(os.path.join(photos_dir(), "**", "*.JPEG"), recursive=True))
    readable = [p for p in paths if "empty" not in p and "truncated" not in p]
    assert len(readable) >= 10
    for path in readable:
        with Image.open(path) as image:
            expected = [image.height, image.width]
        with open(path, "rb") as f:
            assert serving.header_size(tf.constant(f.read())).numpy().tolist() == expected, path


@pytest.mark.parametrize(
    "data, message",
    [
        (_encoded(1, 3000, "PNG"), "an image of 1x3000 pixels: a side shorter than the 32 px this model serves"),
        (_claiming(12000, 12000), "an image of 12000x12000 pixels: more than the 50000000 pixels this model serves"),
        (_encoded(40, 2100, "GIF"), "an image of 40x2100 pixels: an aspect ratio beyond the 50 this model serves"),
        (b"GIF89a\x30\x75\x30\x75" + bytes(20), "an image of 30000x30000 pixels: more than the 50000000 pixels"),
        (b"hello", "image_bytes of 5 bytes: not a JPEG, PNG, GIF or BMP"),
        (bytes(21 << 20), f"image_bytes of {21 << 20} bytes: more than the {20 << 20} bytes this model serves"),
    ],
)
def test_a_request_beyond_the_limits_is_refused_naming_the_limit(data, message):
    decode = tf.function(lambda d: serving.decode_and_crop(d))  # As served: inside the SavedModel's graph.
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"assertion failed: \\[{message}"):
        decode(tf.constant(data))


def test_the_limits_are_checked_before_decoding():
    """The JPEG claiming 12000x12000 holds 64x64 pixels of data: with limits that let it through, TensorFlow's
    decoder makes 144 million pixels of it (libjpeg pads what is missing); within the limits it is refused."""
    lying = tf.constant(_claiming(12000, 12000))
    generous = serving.Limits(max_pixels=200_000_000)
    assert serving.decode_and_crop(lying, limits=generous).shape == (256, 256, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="more than the 50000000 pixels this model serves"):
        serving.decode_and_crop(lying)


def test_images_within_the_limits_are_served_at_their_edges():
    for width, height in [(32, 32), (32, 1600), (7000, 7000)]:
        out = serving.decode_and_crop(tf.constant(_encoded(width, height, "JPEG")))
        assert out.shape == (256, 256, 3) and np.isfinite(out.numpy()).all()


def test_neighbours_query_files_meet_the_same_limits_naming_the_file(tmp_path):
    from tools import similarity

    ordinary, thin = tmp_path / "ordinary.jpg", tmp_path / "thin.png"
    ordinary.write_bytes(_encoded(300, 200, "JPEG"))
    thin.write_bytes(_encoded(1, 3000, "PNG"))
    assert similarity.images_from_files([str(ordinary)], 64).shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match=f"^{thin}: an image of 1x3000 pixels: a side shorter than the 32 px"):
        similarity.images_from_files([str(ordinary), str(thin)], 64)
