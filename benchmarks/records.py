"""Converted folders written as the converter writes them (256x256 JPEG, quality 90, the Example spec), for the
benchmarks that read them: random crops of real photos, or of the demo's drawings."""

import io
import json
import os

import numpy as np
import tensorflow as tf
from PIL import Image

from pipeline import demo_data, example_spec
from pipeline.beam import images


def _sources(rng, photos):
    paths = sorted(tf.io.gfile.glob(photos)) if photos else []
    if paths:
        return [Image.open(p).convert("RGB") for p in paths], f"real photos ({photos})"
    return [demo_data.draw_image(i, rng) for i in range(len(demo_data.CLASSES))], "demo drawings"


def _write_split(folder, split, count, shards, classes, sources, rng):
    writers = [tf.io.TFRecordWriter(os.path.join(folder, f"{split}-{i:05d}-of-{shards:05d}")) for i in range(shards)]
    sizes = [0] * shards
    for i in range(count):
        img = sources[i % len(sources)]
        w, h = img.size
        side = int(min(w, h) * rng.uniform(0.5, 1.0))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        out = io.BytesIO()
        img.crop((left, top, left + side, top + side)).save(out, "JPEG", quality=90)
        jpeg, _ = images.convert(out.getvalue())
        label = i % classes
        record = example_spec.make_example(
            jpeg=jpeg, height=256, width=256, label=label, synset=f"n{label:08d}", filename=f"{i}.JPEG"
        )
        writers[i % shards].write(record)
        sizes[i % shards] += 1
    for writer in writers:
        writer.close()
    return sizes


def write(folder, count, shards, photos=None, seed=0, classes=10, validation=(0, 0)):
    """count training records dealt over `shards` shards, and validation[0] validation records over validation[1]
    shards, of `classes` classes in turn; with summary.json, labels.txt and stand-in statistics, what training
    reads. Returns what the images were cropped from."""
    rng = np.random.default_rng(seed)
    sources, kind = _sources(rng, photos)
    summary = {"image_size": 256, "classes": classes}
    for split, (n, k) in (("train", (count, shards)), ("validation", validation)):
        summary[split] = {"shard_sizes": _write_split(folder, split, n, k, classes, sources, rng)}
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(summary, f)
    with open(os.path.join(folder, "labels.txt"), "w") as f:
        f.writelines(f"n{i:08d}\n" for i in range(classes))
    np.savez(
        os.path.join(folder, "stats.npz"),
        mean_image=np.full((256, 256, 3), 120.0),
        eigenvalues=np.ones(3),
        eigenvectors=np.eye(3),
    )
    return kind
