r"""Exports a trained run as a SavedModel that serves encoded images (tools/serving.py), and on request as a
Keras file.

    python -m tools.export --model_dir=RUN --export_dir=DIR [--checkpoint=latest|best|PATH] [--crops=1|10]
                           [--keras_file=alexnet.keras]

The signature serving_default takes image_bytes (a batch of encoded JPEG, PNG, GIF or BMP strings within the
limits the flags set, checked from each header before any pixel is decoded; the _bytes suffix is TF Serving's REST
convention for base64 input) and returns scores (float32 [batch, 5], descending
probabilities), classes (int32 [batch, 5]), wnids and names (string [batch, 5]). For TF Serving, export to
MODELS/alexnet/1 (a numbered version folder).

--keras_file writes the Classifier (uint8 256x256 batches in, logits out) in Keras' own format, for Keras users:
`import model` (which registers the project's layers), then `keras.saving.load_model(path)`. The SavedModel stays
the way to serve: it needs no code of this project.
"""

import sys

from absl import app, flags

from pipeline.beam import images
from tools import serving
from training import checkpoints

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "The run's folder (train.py's --model_dir).", required=True)
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "Where the SavedModel goes.", required=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "latest, best, or a checkpoint path.")
_KERAS_FILE = flags.DEFINE_string("keras_file", None, "Also save the network here in Keras' format (.keras).")
_CROPS = flags.DEFINE_enum("crops", "1", ["1", "10"], "Centre crop, or §4.1's ten patches (10x the compute).")
L = serving.Limits()
_MAX_BYTES = flags.DEFINE_integer("max_bytes", L.max_bytes, "Largest encoded image served.", lower_bound=1)
_MAX_PIXELS = flags.DEFINE_integer("max_pixels", L.max_pixels, "Most pixels an image may declare.", lower_bound=1)
_MIN_SIDE = flags.DEFINE_integer("min_side", L.min_side, "Shortest side served (the converter's).", lower_bound=1)
_MAX_ASPECT = flags.DEFINE_float("max_aspect_ratio", L.max_aspect_ratio, "Longest / shortest side.", lower_bound=1)


def main(argv):
    del argv
    try:
        model, _, labels, path = checkpoints.restore_classifier(_MODEL_DIR.value, _CHECKPOINT.value)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"tools.export: {e}")
    if _KERAS_FILE.value and not _KERAS_FILE.value.endswith(".keras"):
        sys.exit(f"tools.export: --keras_file={_KERAS_FILE.value} must end in .keras (Keras' format wants it)")
    limits = serving.Limits(_MAX_BYTES.value, _MAX_PIXELS.value, _MIN_SIDE.value, _MAX_ASPECT.value)
    serving.export(model, labels, _EXPORT_DIR.value, crops=int(_CROPS.value), limits=limits)
    if _KERAS_FILE.value:
        model.save(_KERAS_FILE.value)
        print(f"Saved the network to {_KERAS_FILE.value}: keras.saving.load_model after `import model`")
    print(
        f"Exported {path} to {_EXPORT_DIR.value}: serving_default(image_bytes) -> scores, classes, wnids, names "
        f"(top {min(serving.TOP_K, len(labels))} of {len(labels)} classes, {_CROPS.value} crop(s))\n"
        f"Serves images of {limits.describe()}; others get INVALID_ARGUMENT naming the limit, before any pixel is "
        f"decoded (the converter kept sides of at least {images.MIN_SIDE} px and at most {images.MAX_PIXELS:,} pixels "
        "by default)"
    )


if __name__ == "__main__":
    app.run(main)
