r"""Conversion speed and memory: a plain PIL loop vs the Beam job on the DirectRunner, same photos, same run.

    python benchmarks/conversion.py [--images=600] [--workers=2]

Draws full-size ImageNet-like photos (500x375 JPEG, quality 90, like the median ImageNet file), times a plain
single-process PIL loop (decode, resize, crop, encode), then the Beam job with --workers processes over the same
files at two dataset sizes, and prints images/s, the ratio to workers x the loop's rate, and the peak RSS of the
worker processes (it must not grow with the number of images).
"""

import io
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

from pipeline import demo_data

_IMAGES = flags.DEFINE_integer("images", 600, "Training images in the smaller run (the larger one has 2x).")
_WORKERS = flags.DEFINE_integer("workers", 2, "DirectRunner worker processes.")


def draw_photos(root, count, seed=0):
    """count 500x375 photos under root/train/<wnid>/, returned as (path, bytes)."""
    rng, files = np.random.default_rng(seed), []
    for i in range(count):
        label = i % len(demo_data.CLASSES)
        img = demo_data.draw_image(label, rng).resize((500, 375), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        img.save(out, "JPEG", quality=90)
        wnid = demo_data.CLASSES[label][0]
        path = os.path.join(root, "train", wnid, f"{wnid}_{i}.JPEG")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(out.getvalue())
        files.append((path, out.getvalue()))
    os.makedirs(os.path.join(root, "val"), exist_ok=True)
    return files


def plain_loop(files):
    """The baseline: decode, shorter side to 256, centre crop, encode; images/s on one core."""
    start = time.perf_counter()
    for _, data in files:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        scale = 256 / min(img.size)
        img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.Resampling.BICUBIC)
        left, top = (img.size[0] - 256) // 2, (img.size[1] - 256) // 2
        img.crop((left, top, left + 256, top + 256)).save(io.BytesIO(), "JPEG", quality=90)
    return len(files) / (time.perf_counter() - start)


def beam_job(root, workers):
    """(images/s over the whole job including start-up, peak RSS MiB of any child process)."""
    out = tempfile.mkdtemp()
    args = [sys.executable, "-m", "pipeline.build_tfrecords", f"--input_dir={root}", f"--output_dir={out}"]
    args += ["--train_shards=8", "--validation_shards=1", f"--direct_num_workers={workers}"]
    args += ["--direct_running_mode=multi_processing"]
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    elapsed = time.perf_counter() - start
    shutil.rmtree(out)
    return elapsed, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main(argv):
    del argv
    workers = _WORKERS.value
    for count in (_IMAGES.value, 2 * _IMAGES.value):
        root = tempfile.mkdtemp()
        files = draw_photos(root, count)
        loop = plain_loop(files)
        elapsed, rss = beam_job(root, workers)
        rate = count / elapsed
        print(
            f"{count} images: plain PIL loop {loop:.0f} img/s/core; Beam ({workers} workers) {rate:.0f} img/s "
            f"in {elapsed:.1f} s = {rate / (workers * loop):.2f} x ({workers} x loop); peak child RSS {rss:.0f} MiB"
        )
        shutil.rmtree(root)


if __name__ == "__main__":
    app.run(main)
