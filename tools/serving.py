"""The trained network as a service: encoded images in, the top five classes out, with the paper's test-time
preprocessing inside (§2: shorter side to 256, the central 256x256, the mean image subtracted; §4.1: the central
224 patch, or the ten patches). `python -m tools.export` writes it; `python -m tools.predict` and TF Serving run it.
"""

import dataclasses
import re

import tensorflow as tf

from model import classifier
from pipeline import example_spec
from pipeline.beam import images

TOP_K = 5


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one served image may be, checked from its header before any pixel is decoded: decoding is bounded by
    its pixels, and the resize of the shorter side to 256 by the aspect ratio (a 1x3000 PNG would become 256 x
    768,000). min_side defaults to the converter's: no smaller image was trained on. max_pixels is below the
    converter's (a guard against decompression bombs in a batch job) so that one request stays near a GB."""

    max_bytes: int = 20 << 20
    max_pixels: int = 50_000_000
    min_side: int = images.MIN_SIDE
    max_aspect_ratio: float = 50.0

    def describe(self):
        return (
            f"at most {self.max_bytes >> 20} MB, {self.max_pixels:,} pixels and an aspect ratio of "
            f"{self.max_aspect_ratio:g}, sides of at least {self.min_side} px"
        )


def _unsigned(data, offset, size, big_endian):
    """The unsigned integer of `size` bytes at `offset` of a string padded past its header's end."""
    raw = tf.cast(tf.io.decode_raw(tf.strings.substr(data, offset, size), tf.uint8), tf.int64)
    weights = tf.constant([256**i for i in (reversed(range(size)) if big_endian else range(size))], tf.int64)
    return tf.reduce_sum(raw * weights)


def _signed32(value):
    return tf.where(value >= 2**31, value - 2**32, value)


def header_size(image_bytes):
    """(height, width) that an encoded image's header declares, read without decoding it; (0, 0) for bytes that are
    none of JPEG, PNG, GIF and BMP. A JPEG's header is TensorFlow's to parse (it refuses a broken one)."""
    data = tf.strings.join([image_bytes, tf.constant(b"\0" * 32)])  # Every header field below exists.
    magic = tf.strings.substr(data, 0, 4)
    jpeg = tf.strings.substr(magic, 0, 3) == b"\xff\xd8\xff"
    png, gif, bmp = magic == b"\x89PNG", magic == b"GIF8", tf.strings.substr(magic, 0, 2) == b"BM"
    branches = [
        lambda: tf.cast(tf.io.extract_jpeg_shape(image_bytes)[:2], tf.int64),
        lambda: tf.stack([_unsigned(data, 20, 4, True), _unsigned(data, 16, 4, True)]),  # IHDR: width, height.
        lambda: tf.stack([_unsigned(data, 8, 2, False), _unsigned(data, 6, 2, False)]),  # Logical screen.
        lambda: tf.abs(tf.stack([_signed32(_unsigned(data, 22, 4, False)), _signed32(_unsigned(data, 18, 4, False))])),
        lambda: tf.zeros(2, tf.int64),
    ]
    index = tf.argmax(tf.cast(tf.stack([jpeg, png, gif, bmp, True]), tf.int32))  # The first format that matches.
    return tf.switch_case(tf.cast(index, tf.int32), branches)


def check_limits(image_bytes, limits):
    """An op that fails (InvalidArgumentError; INVALID_ARGUMENT through TF Serving) naming the first limit that an
    image breaks."""
    size = header_size(image_bytes)
    height, width = size[0], size[1]
    short, long = tf.minimum(height, width), tf.maximum(height, width)
    length = tf.cast(tf.strings.length(image_bytes), tf.int64)
    sized = tf.strings.format("an image of {}x{} pixels", (width, height))
    checks = [
        (length <= limits.max_bytes, f"more than the {limits.max_bytes} bytes this model serves"),
        (long > 0, "not a JPEG, PNG, GIF or BMP"),
        (height * width <= limits.max_pixels, f"more than the {limits.max_pixels} pixels this model serves"),
        (short >= limits.min_side, f"a side shorter than the {limits.min_side} px this model serves"),
        (
            tf.cast(long, tf.float64) <= limits.max_aspect_ratio * tf.cast(short, tf.float64),
            f"an aspect ratio beyond the {limits.max_aspect_ratio:g} this model serves",
        ),
    ]
    ok = tf.stack([passed for passed, _ in checks])
    what = tf.stack(
        [tf.strings.join([sized if i > 1 else "image_bytes", why], ": ") for i, (_, why) in enumerate(checks)]
    )
    what = tf.strings.regex_replace(what, "^image_bytes", tf.strings.format("image_bytes of {} bytes", length))
    first = tf.argmin(tf.cast(ok, tf.int32))
    return tf.debugging.Assert(tf.reduce_all(ok), [tf.gather(what, first)])


def refusal(error):
    """What an InvalidArgumentError from the signature says about the image: the limit it broke, or that it does
    not decode."""
    # In a graph (the SavedModel) the assertion says "assertion failed: [...]"; run eagerly, "Summarized data: b'...'".
    limit = re.search(r"assertion failed: \[(.*?)\]|Summarized data: b[\"'](.*?)[\"']", error.message)
    return (limit.group(1) or limit.group(2)) if limit else "not an image TensorFlow can decode"


def decode_and_crop(image_bytes, size=example_spec.IMAGE_SIZE, limits=Limits()):
    """An encoded JPEG, PNG, GIF or BMP of any size within `limits` -> float32 size x size x 3 in 0..255: the
    shorter side scaled to `size` (bicubic, antialiased, as the converter's Pillow resize), then the central
    square (§2). An image beyond the limits is refused before any of its pixels is decoded."""
    with tf.control_dependencies([check_limits(image_bytes, limits)]):
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    scale = size / tf.cast(tf.minimum(height, width), tf.float64)
    new_height = tf.cast(tf.round(tf.cast(height, tf.float64) * scale), tf.int32)
    new_width = tf.cast(tf.round(tf.cast(width, tf.float64) * scale), tf.int32)
    resized = tf.image.resize(image, [new_height, new_width], method="bicubic", antialias=True)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return tf.clip_by_value(resized[top : top + size, left : left + size], 0.0, 255.0)


class Serving(tf.Module):
    """serving_default: image_bytes (a batch of encoded images, any sizes) -> scores, classes, wnids, names
    (the top five, descending probabilities)."""

    def __init__(self, model, labels, crops=1, limits=Limits()):
        super().__init__()
        self.model, self.crops, self.k, self.limits = model, crops, min(TOP_K, len(labels)), limits
        self.image_size = model.preprocess.image_size
        self.wnids = tf.constant([wnid for wnid, _ in labels])
        self.names = tf.constant([name for _, name in labels])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve(self, image_bytes):
        spec = tf.TensorSpec([example_spec.IMAGE_SIZE, example_spec.IMAGE_SIZE, 3], tf.float32)
        decode = lambda data: decode_and_crop(data, limits=self.limits)  # noqa: E731
        pixels = tf.map_fn(decode, image_bytes, fn_output_signature=spec)
        if self.image_size != example_spec.IMAGE_SIZE:  # As the reader decodes the records at a reduced size.
            pixels = tf.image.resize(pixels, [self.image_size] * 2, method="area")
        scores, classes = tf.math.top_k(classifier.probabilities(self.model, pixels, self.crops), k=self.k)
        return {
            "scores": scores,
            "classes": classes,
            "wnids": tf.gather(self.wnids, classes),
            "names": tf.gather(self.names, classes),
        }


def export(model, labels, export_dir, crops=1, limits=Limits()):
    """Writes the SavedModel; it needs TensorFlow only (no code of this project) to load and run."""
    serving = Serving(model, labels, crops, limits)
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)  # Inference only.
    tf.saved_model.save(serving, export_dir, signatures={"serving_default": serving.serve}, options=options)
