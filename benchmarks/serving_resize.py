r"""How far the served preprocessing (tools/serving.py: TensorFlow's decode and antialiased bicubic resize) is
from what training saw (pipeline/beam/images.py: Pillow's, then the record's JPEG at quality 90, decoded).

    python benchmarks/serving_resize.py [--photos='GLOB'] [--model_dir=RUN --raw_dir=RAW [--data_dir=DATA]]

Prints the mean and 99th-percentile absolute difference, in 0..255 pixel values of the 256x256 centre crop,
between (a) the served pixels and the converter's pixels before JPEG encoding, (b) the served pixels and the
record's decoded pixels (what the network trained on), and (c) the JPEG round trip alone, for comparison.
With --model_dir, also the top-1 / top-5 error of the run on the raw validation JPEGs through the served
preprocessing and on the converted records of the same images.
"""

import glob
import io
import os

import numpy as np
import tensorflow as tf
from absl import app, flags
from PIL import Image

from pipeline import demo_data
from pipeline.beam import images, sources
from pipeline.reader import input as data_input
from tools import serving
from training import checkpoints, evaluation

_PHOTOS = flags.DEFINE_string("photos", None, "Glob of real photos; default: 20 demo drawings.")
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "A trained run, to compare its errors both ways.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Its converted data (default: the run's).")
_RAW_DIR = flags.DEFINE_string("raw_dir", None, "The raw images the data were converted from (val/ and labels).")


def photos():
    if _PHOTOS.value:
        paths = sorted(glob.glob(_PHOTOS.value))
        return [tf.io.read_file(p).numpy() for p in paths], f"{len(paths)} photos ({_PHOTOS.value})"
    rng = np.random.default_rng(0)
    drawn = []
    for i in range(20):
        out = io.BytesIO()
        demo_data.draw_image(i % 10, rng).save(out, "JPEG", quality=90)
        drawn.append(out.getvalue())
    return drawn, "20 demo drawings"


def differences(encoded):
    """Per image: |served - converter|, |served - record|, |record - converter| (float arrays)."""
    out = []
    for data in encoded:
        try:
            jpeg, converted = images.convert(data)
        except images.Rejected:
            continue
        record = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.float64)
        served = serving.decode_and_crop(data).numpy().astype(np.float64)
        converted = converted.astype(np.float64)
        out.append((np.abs(served - converted), np.abs(served - record), np.abs(record - converted)))
    return out


def errors_both_ways(model_dir, data_dir, raw_dir):
    """(errors through the served preprocessing on the raw validation JPEGs, errors on the records)."""
    model, settings, labels, _ = checkpoints.restore_classifier(model_dir)
    data_dir = data_dir or settings["data_dir"]
    files = data_input.shard_files(data_dir, "validation")
    sizes = data_input.shard_sizes(files, data_input.load_summary(data_dir), "validation")
    strategy = tf.distribute.get_strategy()
    records = evaluation.evaluate(
        model, strategy, files, sizes, batch_size=64, image_size=settings["image_size"], crops=1, labels=labels
    )
    module = serving.Serving(model, labels, crops=1)
    val_labels = sources.read_val_labels(os.path.join(raw_dir, "validation_labels.txt"))
    top1 = top5 = count = 0
    for path in sorted(glob.glob(os.path.join(raw_dir, "val", "*"))):
        wnid = sources.val_wnid(os.path.basename(path), val_labels)
        with open(path, "rb") as f:
            data = f.read()
        try:
            images.convert(data)  # The records hold only what the converter accepted.
        except images.Rejected:
            continue
        predicted = [w.decode() for w in module.serve(tf.constant([data]))["wnids"].numpy()[0]]
        top1 += predicted[0] != wnid
        top5 += wnid not in predicted
        count += 1
    return {"top1_error": top1 / count, "top5_error": top5 / count, "images": count}, records


def main(argv):
    del argv
    if _MODEL_DIR.value and not _RAW_DIR.value:
        raise app.UsageError("--model_dir needs --raw_dir, the raw images its data came from (the demo's: demo/raw)")
    encoded, kind = photos()
    diffs = differences(encoded)
    print(f"{kind}, 256x256 centre crops, absolute difference in 0..255 (mean; 99th percentile):")
    for i, what in enumerate(
        ("served vs converter (Pillow)", "served vs record (what training saw)", "record vs converter (JPEG q90 alone)")
    ):
        values = np.concatenate([d[i].ravel() for d in diffs])
        print(f"  {what}: {values.mean():.2f}; {np.percentile(values, 99):.1f}")
    if _MODEL_DIR.value:
        served, records = errors_both_ways(_MODEL_DIR.value, _DATA_DIR.value, _RAW_DIR.value)
        print(
            f"Errors (centre crop): served, on the raw JPEGs: top-1 {served['top1_error']:.1%}, top-5 "
            f"{served['top5_error']:.1%} ({served['images']} images); on the records: top-1 "
            f"{records['top1_error']:.1%}, top-5 {records['top5_error']:.1%} ({records['images']} images)"
        )


if __name__ == "__main__":
    app.run(main)
