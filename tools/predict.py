r"""The top five classes of image files, from a SavedModel written by `python -m tools.export`.

    python -m tools.predict --export_dir=DIR IMAGE [IMAGE ...]

Prints one line per image; a file that cannot be read or decoded, or breaks the export's limits (its size, pixels,
sides or aspect ratio: tools.export prints them), gets a line saying so and the others are still predicted. Exits
with status 1 if any image failed.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # A file that is not an image is reported on its own line.
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from tools import serving  # noqa: E402

_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "The SavedModel (tools.export's --export_dir).", required=True)


def predict_file(serve, path):
    """'PATH: name 91.2%, name 5.1%, ...' or raises ValueError with what is wrong with the file."""
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            data = f.read()
    except (tf.errors.OpError, OSError) as e:
        raise ValueError(f"cannot read it ({e})") from None
    try:
        out = serve(image_bytes=tf.constant([data]))
    except tf.errors.InvalidArgumentError as e:
        raise ValueError(serving.refusal(e)) from None
    names = [n.decode() for n in out["names"].numpy()[0]]
    return ", ".join(f"{name} {score:.1%}" for name, score in zip(names, out["scores"].numpy()[0], strict=True))


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give the image files to predict: python -m tools.predict --export_dir=DIR IMAGE...")
    try:
        serve = tf.saved_model.load(_EXPORT_DIR.value).signatures["serving_default"]
    except (OSError, ValueError, KeyError, tf.errors.OpError) as e:  # Not a SavedModel, or not tools.export's.
        reason = " ".join(str(e).split())[:200]
        sys.exit(
            f"tools.predict: --export_dir={_EXPORT_DIR.value} is not a model tools.export wrote ({reason}): give "
            "the --export_dir of `python -m tools.export`"
        )
    failed = 0
    for path in paths:
        try:
            print(f"{path}: {predict_file(serve, path)}", flush=True)
        except ValueError as e:
            failed += 1
            print(f"{path}: {e}", flush=True)
    if failed:
        sys.exit(f"{failed} of {len(paths)} files could not be predicted")


if __name__ == "__main__":
    app.run(main)
