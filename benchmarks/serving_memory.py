r"""The memory one serving process needs for hostile requests against ordinary photos (tools/serving.py's limits).

    python benchmarks/serving_memory.py [--photos='GLOB'] [--classes=1000] [--image_size=256 --crop_size=224]

Exports a network of the paper's shapes (random weights), then, each in a fresh process that loads the export as
TF Serving would: one batch of ordinary photos (--photos, default 8 drawings enlarged to 4000x3000 JPEGs, a phone
camera's 12 MP), and the hostile requests one by one (tiny files whose headers declare huge or degenerate images,
and an oversized string), served by the export's limits and, for comparison, by an export without them. Prints
each process's peak resident memory above what loading the export and one small request took.
"""

import glob
import io
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf
from absl import app, flags
from PIL import Image

from pipeline import demo_data
from tools import serving

_PHOTOS = flags.DEFINE_string("photos", None, "Glob of real photos; default: 8 drawings as 4000x3000 JPEGs.")
_CLASSES = flags.DEFINE_integer("classes", 1000, "Classes of the exported network.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "Decode size of the exported network.")
_CROP_SIZE = flags.DEFINE_integer("crop_size", 224, "Crop of the exported network.")
_SERVE = flags.DEFINE_string("serve", None, "Internal: serve --case from this export in this process.")
_CASE = flags.DEFINE_string("case", None, "Internal: photos or hostile.")
_FILES = flags.DEFINE_string("files", None, "Internal: the folder of the case's files.")

UNLIMITED = serving.Limits(max_bytes=2**62, max_pixels=2**62, min_side=1, max_aspect_ratio=1e12)


def _encoded(image, kind):
    out = io.BytesIO()
    image.save(out, kind)
    return out.getvalue()


def hostile():
    """{name: bytes}: what a careless or hostile client sends. The unlimited export is not sent the 1x65535 PNG
    (it would need ~51 GB: 256 x 16.8M float32 pixels after the resize)."""
    jpeg = bytearray(_encoded(Image.new("RGB", (64, 64), (90, 140, 30)), "JPEG"))
    frame = jpeg.index(b"\xff\xc0")
    jpeg[frame + 5 : frame + 9] = struct.pack(">HH", 12000, 12000)  # The frame header claims 12000x12000.
    gif = bytearray(_encoded(Image.new("RGB", (8, 8)), "GIF"))
    gif[6:10] = struct.pack("<HH", 30000, 30000)  # The logical screen claims 30000x30000.
    return {
        "PNG of 1x3000": _encoded(Image.new("RGB", (1, 3000)), "PNG"),
        "PNG of 1x65535": _encoded(Image.new("RGB", (1, 65535)), "PNG"),
        "JPEG claiming 12000x12000": bytes(jpeg),
        "GIF claiming 30000x30000": bytes(gif),
        "30 MB of zeros": bytes(30 << 20),
    }


def photos():
    if _PHOTOS.value:
        paths = sorted(glob.glob(_PHOTOS.value))
        return {os.path.basename(p): tf.io.read_file(p).numpy() for p in paths}, f"{len(paths)} photos"
    rng = np.random.default_rng(0)
    drawn = {}
    for i in range(8):
        image = demo_data.draw_image(i, rng).resize((4000, 3000), Image.BICUBIC)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=90)
        drawn[f"drawing {i}"] = out.getvalue()
    return drawn, "8 drawings as 4000x3000 JPEGs"


def export(folder, limits):
    from model import classifier

    size = _IMAGE_SIZE.value
    stats = {"mean_image": np.full((size, size, 3), 120.0), "eigenvalues": np.ones(3), "eigenvectors": np.eye(3)}
    model = classifier.build_classifier(
        _CLASSES.value, stats, image_size=size, crop_size=_CROP_SIZE.value, lighting_std=0.1
    )
    labels = [(f"n{i:08d}", f"class {i}") for i in range(_CLASSES.value)]
    serving.export(model, labels, folder, limits=limits)


def _status_mb(field):
    """VmRSS (resident now) or VmHWM (the peak since the last reset) of this process, in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets VmHWM to the resident size now.
        f.write("5")


def serve_case():
    """In a fresh process: the export loaded and warmed up, then the case's requests; prints JSON."""
    serve = tf.saved_model.load(_SERVE.value).signatures["serving_default"]
    small = _encoded(Image.new("RGB", (320, 240), (200, 100, 50)), "JPEG")
    serve(image_bytes=tf.constant([small]))
    names = sorted(os.listdir(_FILES.value))
    data = []
    for name in names:
        with open(os.path.join(_FILES.value, name), "rb") as f:
            data.append(f.read())
    _reset_peak()
    before = _status_mb("VmRSS")
    refused = []
    if _CASE.value == "photos":
        serve(image_bytes=tf.constant(data))
    else:
        for name, request in zip(names, data, strict=True):
            try:
                serve(image_bytes=tf.constant([request]))
            except tf.errors.InvalidArgumentError:
                refused.append(name)
    print(json.dumps({"peak_mb": _status_mb("VmHWM") - before, "refused": len(refused), "requests": len(data)}))


def measure(export_dir, case, files):
    folder = tempfile.mkdtemp()
    for i, (name, data) in enumerate(files.items()):
        with open(os.path.join(folder, f"{i:02d} {name}"), "wb") as f:
            f.write(data)
    args = [sys.executable, __file__, f"--serve={export_dir}", f"--case={case}", f"--files={folder}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    if _SERVE.value:
        return serve_case()
    root = tempfile.mkdtemp()
    limited, unlimited = os.path.join(root, "limited"), os.path.join(root, "unlimited")
    export(limited, serving.Limits())
    export(unlimited, UNLIMITED)
    ordinary, kind = photos()
    bad = hostile()
    spared = {k: v for k, v in bad.items() if k != "PNG of 1x65535"}
    rows = [
        ("photos, limits", measure(limited, "photos", ordinary)),
        ("hostile, limits", measure(limited, "hostile", bad)),
        ("hostile, no limits", measure(unlimited, "hostile", spared)),
    ]
    print(f"Serving memory above a loaded export ({_CLASSES.value} classes), one fresh process each:")
    print(f"  limits: {serving.Limits().describe()}")
    for name, row in rows:
        print(f"  {name}: {row['peak_mb']:.0f} MB peak, {row['refused']} of {row['requests']} requests refused")
    photos_mb, hostile_mb = rows[0][1]["peak_mb"], rows[1][1]["peak_mb"]
    print(
        f"  one batch of {kind}: {photos_mb:.0f} MB; {len(bad)} hostile requests with the limits: {hostile_mb:.0f} "
        f"MB; without them: {rows[2][1]['peak_mb']:.0f} MB"
    )


if __name__ == "__main__":
    app.run(main)
