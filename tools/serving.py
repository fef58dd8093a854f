"""The trained network as a service: encoded images in, the top five classes out, with the paper's test-time
preprocessing inside (§2: shorter side to 256, the central 256x256, the mean image subtracted; §4.1: the central
224 patch, or the ten patches). `python -m tools.export` writes it; `python -m tools.predict` and TF Serving run it.
"""

import tensorflow as tf

from model import classifier
from pipeline import example_spec

TOP_K = 5


def decode_and_crop(image_bytes, size=example_spec.IMAGE_SIZE):
    """An encoded JPEG, PNG, GIF or BMP of any size -> float32 size x size x 3 in 0..255: the shorter side scaled
    to `size` (bicubic, antialiased, as the converter's Pillow resize), then the central square (§2)."""
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

    def __init__(self, model, labels, crops=1):
        super().__init__()
        self.model, self.crops, self.k = model, crops, min(TOP_K, len(labels))
        self.image_size = model.preprocess.image_size
        self.wnids = tf.constant([wnid for wnid, _ in labels])
        self.names = tf.constant([name for _, name in labels])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve(self, image_bytes):
        spec = tf.TensorSpec([example_spec.IMAGE_SIZE, example_spec.IMAGE_SIZE, 3], tf.float32)
        images = tf.map_fn(decode_and_crop, image_bytes, fn_output_signature=spec)
        if self.image_size != example_spec.IMAGE_SIZE:  # As the reader decodes the records at a reduced size.
            images = tf.image.resize(images, [self.image_size] * 2, method="area")
        scores, classes = tf.math.top_k(classifier.probabilities(self.model, images, self.crops), k=self.k)
        return {
            "scores": scores,
            "classes": classes,
            "wnids": tf.gather(self.wnids, classes),
            "names": tf.gather(self.names, classes),
        }


def export(model, labels, export_dir, crops=1):
    """Writes the SavedModel; it needs TensorFlow only (no code of this project) to load and run."""
    serving = Serving(model, labels, crops)
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)  # Inference only.
    tf.saved_model.save(serving, export_dir, signatures={"serving_default": serving.serve}, options=options)
