r"""Conversion speed and memory: a plain PIL loop vs the Beam job on the DirectRunner, same photos, same run.

    python benchmarks/conversion.py [--images=2000] [--workers=0 (one per core)] [--layout=folder|tar]

Makes ImageNet-like photos (the longer side 500 px, JPEG quality 90, like the median ImageNet file) from real
photos given by --photos (random crops of them), else from the demo set's drawings. Runs the
whole Beam job at N and 2N images, and a plain single-process PIL loop (decode, resize, crop, encode) over N of
the same photos just before and just after each job (the machine is shared; its speed drifts). For each size it
prints the conversion's rate as the job reports it (images / seconds from the first shard started to the last
one written: what a long run sustains, start-up excluded) as a ratio to cores x the loop's rate, the whole job's
rate with start-up, and the peak RSS of any process of the job (it must not grow with N); then the CPU time
per image of the job's shard writers (per-thread CPU clocks, reported by the job) against the loop's. That ratio
does not depend on what else shares the machine's cores (this VM shows up to 100% steal). Last, what full
ImageNet costs in core-hours at the job's CPU time per image.
"""

import glob
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

from pipeline import demo_data

_IMAGES = flags.DEFINE_integer("images", 2000, "Training images in the smaller run (the larger one has 2x).")
_WORKERS = flags.DEFINE_integer("workers", 0, "DirectRunner workers (threads or processes); 0: as many as cores.")
_CORES = flags.DEFINE_integer("cores", os.cpu_count(), "Cores the job may use: the loop's rate is multiplied by this.")
_MODE = flags.DEFINE_enum(
    "mode", "multi_processing", ["multi_processing", "multi_threading"], "DirectRunner's --direct_running_mode."
)
_LAYOUT = flags.DEFINE_enum("layout", "folder", ["folder", "tar"], "Extracted folders or the downloaded tar form.")
_TAR_READS = flags.DEFINE_enum(
    "tar_reads", "auto", ["auto", "in_order", "at_offsets"], "The job's --tar_reads (auto: at offsets, a local disk)."
)
_PHOTOS = flags.DEFINE_string("photos", None, "Glob of real photos to crop the test images from; default: drawings.")

CLASSES = 10
IMAGENET_IMAGES = 1_281_167 + 50_000


def _sources(rng):
    paths = sorted(glob.glob(_PHOTOS.value)) if _PHOTOS.value else []
    if paths:
        return [Image.open(p).convert("RGB") for p in paths], f"real photos ({_PHOTOS.value})"
    return [demo_data.draw_image(i, rng) for i in range(len(demo_data.CLASSES))], "demo drawings"


def make_photos(count, seed=0):
    """count JPEGs (wnid, name, bytes): random crops of the source photos, longer side 500, quality 90."""
    rng = np.random.default_rng(seed)
    sources, kind = _sources(rng)
    files = []
    for i in range(count):
        img = sources[i % len(sources)]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((left, top, left + cw, top + ch))
        scale = 500 / max(cw, ch)
        crop = crop.resize((round(cw * scale), round(ch * scale)), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        crop.save(out, "JPEG", quality=90)
        wnid = f"n{90000001 + i % CLASSES}"
        files.append((wnid, f"{wnid}_{i}.JPEG", out.getvalue()))
    return files, kind


def write_input(root, files, layout):
    """The raw input as extracted folders, or as ILSVRC2012_img_train.tar holding one <wnid>.tar per class."""
    folder = root if layout == "folder" else tempfile.mkdtemp()
    for wnid, name, data in files:
        os.makedirs(os.path.join(folder, "train", wnid), exist_ok=True)
        with open(os.path.join(folder, "train", wnid, name), "wb") as f:
            f.write(data)
    if layout == "tar":
        os.makedirs(os.path.join(folder, "val"))
        demo_data.write_as_tars(folder, root)
        shutil.rmtree(folder)


def plain_loop(files):
    """The baseline: decode, shorter side to 256, centre crop, encode; (images/s on one core, CPU ms per image)."""
    start, cpu = time.perf_counter(), time.process_time()
    for _, _, data in files:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        scale = 256 / min(img.size)
        img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.Resampling.BICUBIC)
        left, top = (img.size[0] - 256) // 2, (img.size[1] - 256) // 2
        img.crop((left, top, left + 256, top + 256)).save(io.BytesIO(), "JPEG", quality=90)
    return len(files) / (time.perf_counter() - start), 1000 * (time.process_time() - cpu) / len(files)


# Runs the job as a child and reports the peak RSS over it and every process it waited for (the Beam workers).
_MEASURE = """
import re, resource, subprocess, sys, time
start = time.perf_counter()
job = subprocess.run(sys.argv[1:], check=True, stdout=subprocess.PIPE, text=True)
rate, cpu = map(float, re.search(r"([0-9.]+) images/s, ([0-9.]+) ms of CPU", job.stdout).groups())
print(time.perf_counter() - start, rate, cpu, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""


def beam_job(root, workers):
    """(seconds for the whole job, the conversion's images/s and CPU ms per image, peak RSS MiB of any process)."""
    out = tempfile.mkdtemp()
    args = [sys.executable, "-m", "pipeline.build_tfrecords", f"--input_dir={root}", f"--output_dir={out}"]
    args += ["--train_shards=16", "--validation_shards=1", f"--direct_num_workers={workers}"]
    args += [f"--direct_running_mode={_MODE.value}", f"--tar_reads={_TAR_READS.value}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, *args], check=True, capture_output=True, env=env, text=True
    )
    shutil.rmtree(out)
    return tuple(map(float, result.stdout.split()))


def main(argv):
    del argv
    workers, cores, n = _WORKERS.value or os.cpu_count(), _CORES.value, _IMAGES.value
    files, kind = make_photos(2 * n)
    size = np.mean([len(d) for _, _, d in files]) / 1024
    print(
        f"{kind}, {size:.0f} KiB per file; input as {_LAYOUT.value} (tars read {_TAR_READS.value}); "
        f"DirectRunner {_MODE.value}, {workers} workers on {cores} cores"
    )
    sample = files[:n]
    for count in (n, 2 * n):
        root = tempfile.mkdtemp()
        write_input(root, files[:count], _LAYOUT.value)
        before = plain_loop(sample)  # The machine is shared: the loop runs just before and just after each job.
        elapsed, rate, cpu_ms, rss = beam_job(root, workers)
        after = plain_loop(sample)
        loop, loop_cpu_ms = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
        shutil.rmtree(root)
        print(
            f"{count} images: plain PIL loop {loop:.0f} img/s on one core; Beam conversion {rate:.0f} img/s = "
            f"{rate / (cores * loop):.2f} x ({cores} cores x loop); whole job {elapsed:.1f} s = "
            f"{count / elapsed:.0f} img/s with start-up; peak RSS {rss:.0f} MiB"
        )
        print(
            f"  CPU per image: Beam {cpu_ms:.1f} ms, loop {loop_cpu_ms:.1f} ms: the job needs "
            f"{cpu_ms / loop_cpu_ms:.2f} x the loop's CPU per image (what a steal-free machine would show)"
        )
    print(
        f"{cpu_ms:.1f} ms of CPU per image: full ImageNet ({IMAGENET_IMAGES:,} images) = "
        f"{IMAGENET_IMAGES * cpu_ms / 3.6e6:.1f} core-hours at this rate"
    )


if __name__ == "__main__":
    app.run(main)
