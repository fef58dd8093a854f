r"""Exports a trained run as a SavedModel that serves encoded images (tools/serving.py).

    python -m tools.export --model_dir=RUN --export_dir=DIR [--checkpoint=latest|best|PATH] [--crops=1|10]

The signature serving_default takes image_bytes (a batch of encoded JPEG/PNG strings of any size; the _bytes
suffix is TF Serving's REST convention for base64 input) and returns scores (float32 [batch, 5], descending
probabilities), classes (int32 [batch, 5]), wnids and names (string [batch, 5]). For TF Serving, export to
MODELS/alexnet/1 (a numbered version folder).
"""

import sys

from absl import app, flags

from tools import serving
from training import checkpoints

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "The run's folder (train.py's --model_dir).", required=True)
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "Where the SavedModel goes.", required=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "latest, best, or a checkpoint path.")
_CROPS = flags.DEFINE_enum("crops", "1", ["1", "10"], "Centre crop, or §4.1's ten patches (10x the compute).")


def main(argv):
    del argv
    try:
        model, _, labels, path = checkpoints.restore_classifier(_MODEL_DIR.value, _CHECKPOINT.value)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"tools.export: {e}")
    serving.export(model, labels, _EXPORT_DIR.value, crops=int(_CROPS.value))
    print(
        f"Exported {path} to {_EXPORT_DIR.value}: serving_default(image_bytes) -> scores, classes, wnids, names "
        f"(top {min(serving.TOP_K, len(labels))} of {len(labels)} classes, {_CROPS.value} crop(s))"
    )


if __name__ == "__main__":
    app.run(main)
