"""An embedded demo dataset in raw ImageNet's layout, drawn from a seed: no download needed.

    python -m pipeline.make_demo_data --output_dir=demo/raw

Writes train/<wnid>/<wnid>_<i>.JPEG, val/ILSVRC2012_val_<8 digits>.JPEG, validation_labels.txt (one wnid per
validation image, in file-number order: the format of tensorflow-datasets' imagenet2012 validation labels) and
LOC_synset_mapping.txt (the classes' names); or,
with --as_tars, the same files in ImageNet's downloaded form (``write_as_tars``).
Ten classes of shapes, each photographed at a random place, scale, rotation and colour over a cluttered,
textured background, in varied sizes (200-700 px a side) and JPEG qualities, so resizing, cropping, flipping
and lighting all matter. A few files carry real-world quirks (CMYK, grayscale, PNG data named .JPEG, truncated).
"""

import io
import math
import os
import shutil
import tarfile

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

# (wnid, name, hue): made-up wnids in ImageNet's form; each class leans towards its own hue (saturation,
# brightness and shading vary), so a short CPU run can learn them; the shapes must do the rest.
CLASSES = (
    ("n90000001", "disc", 0.00),
    ("n90000002", "ring", 0.10),
    ("n90000003", "square", 0.20),
    ("n90000004", "triangle", 0.30),
    ("n90000005", "star", 0.40),
    ("n90000006", "cross", 0.50),
    ("n90000007", "hexagon", 0.60),
    ("n90000008", "crescent", 0.70),
    ("n90000009", "bar", 0.80),
    ("n90000010", "checker", 0.90),
)
MIN_SIDE, MAX_SIDE = 200, 700
VAL_LABELS = "validation_labels.txt"
CLASS_NAMES = "LOC_synset_mapping.txt"  # "wnid name" per line, as the ILSVRC files beside ImageNet have it.


def _rgb(rng, hue, spread=0.04):
    h = (hue + rng.normal(0, spread)) % 1.0
    s, v = rng.uniform(0.5, 1.0), rng.uniform(0.45, 1.0)
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return tuple(int(255 * c) for c in (r, g, b))


def _background(rng, width, height):
    """A smooth random colour field, fine grain and clutter strokes."""
    field = rng.integers(0, 210, size=(3, 3, 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    grain = Image.fromarray(rng.integers(0, 24, size=(height, width), dtype=np.uint8)).convert("RGB")
    img = ImageChops.add(img, grain, offset=-12)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 12))):
        xy = [tuple(rng.uniform(0, [width, height])) for _ in range(2)]
        draw.line(xy, fill=_rgb(rng, rng.uniform(), 0.0), width=int(rng.integers(1, 5)))
    return img


def _polygon(n, radius, phase=0.0, inner=None):
    points = []
    for k in range(n * (2 if inner else 1)):
        r = inner if inner and k % 2 else radius
        a = phase + math.pi * k / (n if inner else n / 2)
        points.append((r * math.cos(a), r * math.sin(a)))
    return points


def _shape_mask(name, size, rng):
    """A white-on-black mask of the class's shape, centred in a size x size square."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    c, r = size / 2, size * 0.45

    def at(points):
        return [(c + x, c + y) for x, y in points]

    if name == "disc":
        draw.ellipse([c - r, c - r, c + r, c + r], fill=255)
    elif name == "ring":
        draw.ellipse([c - r, c - r, c + r, c + r], fill=255)
        draw.ellipse([c - r * 0.6, c - r * 0.6, c + r * 0.6, c + r * 0.6], fill=0)
    elif name == "square":
        draw.rectangle([c - r * 0.8, c - r * 0.8, c + r * 0.8, c + r * 0.8], fill=255)
    elif name == "triangle":
        draw.polygon(at(_polygon(3, r, -math.pi / 2)), fill=255)
    elif name == "star":
        draw.polygon(at(_polygon(5, r, -math.pi / 2, inner=r * 0.4)), fill=255)
    elif name == "cross":
        w = r * 0.3
        draw.rectangle([c - r, c - w, c + r, c + w], fill=255)
        draw.rectangle([c - w, c - r, c + w, c + r], fill=255)
    elif name == "hexagon":
        draw.polygon(at(_polygon(6, r)), fill=255)
    elif name == "crescent":
        draw.ellipse([c - r, c - r, c + r, c + r], fill=255)
        draw.ellipse([c - r * 0.5, c - r * 1.0, c + r * 1.3, c + r * 0.8], fill=0)
    elif name == "bar":
        draw.rectangle([c - r, c - r * 0.18, c + r, c + r * 0.18], fill=255)
    elif name == "checker":
        cell = 2 * r / 4
        for i in range(4):
            for j in range(4):
                if (i + j) % 2 == 0:
                    x, y = c - r + i * cell, c - r + j * cell
                    draw.rectangle([x, y, x + cell, y + cell], fill=255)
    return mask.rotate(float(rng.uniform(0, 360)), resample=Image.Resampling.BICUBIC)


def draw_image(class_index, rng):
    """One 'photograph' of class class_index."""
    _, name, hue = CLASSES[class_index]
    width, height = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    img = _background(rng, width, height)
    size = int(min(width, height) * rng.uniform(0.45, 0.85))
    # Anywhere inside the central square, so §2's centre crop keeps the object (mostly) in view.
    side = min(width, height)
    left = (width - side) // 2 + int(rng.integers(0, side - size + 1))
    top = (height - side) // 2 + int(rng.integers(0, side - size + 1))
    mask = _shape_mask(name, size, rng)
    shade = Image.linear_gradient("L").resize((size, size)).rotate(float(rng.uniform(0, 360)))
    body = Image.merge("RGB", [ch.point(lambda v, k=k: v * (0.6 + 0.4 * k)) for k, ch in enumerate([shade] * 3)])
    colour = Image.new("RGB", (size, size), _rgb(rng, hue))
    body = Image.blend(colour, Image.composite(colour, body, shade), 0.3)
    img.paste(body, (left, top), mask)
    return img.filter(ImageFilter.BoxBlur(float(rng.uniform(0.3, 1.0))))


def _jpeg(img, rng):
    out = io.BytesIO()
    img.save(out, "JPEG", quality=int(rng.integers(70, 96)))
    return out.getvalue()


def _quirks(img, rng):
    """The real-world troublemakers, keyed by file suffix: all but 'truncated' are valid images."""
    cmyk, gray, png = io.BytesIO(), io.BytesIO(), io.BytesIO()
    img.convert("CMYK").save(cmyk, "JPEG", quality=90)
    img.convert("L").save(gray, "JPEG", quality=90)
    img.save(png, "PNG")
    full = _jpeg(img, rng)
    return {
        "cmyk": cmyk.getvalue(),
        "gray": gray.getvalue(),
        "png": png.getvalue(),
        "truncated": full[: len(full) // 2],
    }


def _write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def write_demo_dataset(output_dir, *, train_per_class, val_per_class, seed=0):
    """Writes the dataset; returns {'train': n, 'val': n, 'quirks': n} file counts."""
    rng = np.random.default_rng(seed)
    for label, (wnid, _, _) in enumerate(CLASSES):
        for i in range(train_per_class):
            _write(os.path.join(output_dir, "train", wnid, f"{wnid}_{i}.JPEG"), _jpeg(draw_image(label, rng), rng))
    for k, (kind, data) in enumerate(_quirks(draw_image(0, rng), rng).items()):
        wnid = CLASSES[k % len(CLASSES)][0]
        _write(os.path.join(output_dir, "train", wnid, f"{wnid}_{kind}.JPEG"), data)
    labels = rng.permutation(np.repeat(np.arange(len(CLASSES)), val_per_class))
    for i, label in enumerate(labels, start=1):
        _write(os.path.join(output_dir, "val", f"ILSVRC2012_val_{i:08d}.JPEG"), _jpeg(draw_image(label, rng), rng))
    with open(os.path.join(output_dir, VAL_LABELS), "w") as f:
        f.writelines(f"{CLASSES[label][0]}\n" for label in labels)
    with open(os.path.join(output_dir, CLASS_NAMES), "w") as f:
        f.writelines(f"{wnid} {name}\n" for wnid, name, _ in CLASSES)
    return {"train": train_per_class * len(CLASSES), "val": len(labels), "quirks": 4}


def _add(tar, name, fileobj, size):
    info = tarfile.TarInfo(name)
    info.size, info.mtime = size, 0  # No timestamps: the same files give the same tar.
    tar.addfile(info, fileobj)


def write_as_tars(extracted_dir, output_dir):
    """The downloaded form of an extracted layout: ILSVRC2012_img_train.tar holding one <wnid>.tar per class of
    train/, ILSVRC2012_img_val.tar holding val/'s files, and the validation labels file copied beside them."""
    os.makedirs(output_dir, exist_ok=True)
    train = os.path.join(extracted_dir, "train")
    with tarfile.open(os.path.join(output_dir, "ILSVRC2012_img_train.tar"), "w", format=tarfile.GNU_FORMAT) as outer:
        for wnid in sorted(os.listdir(train)):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w", format=tarfile.GNU_FORMAT) as tar:
                for name in sorted(os.listdir(os.path.join(train, wnid))):
                    path = os.path.join(train, wnid, name)
                    with open(path, "rb") as f:
                        _add(tar, name, f, os.path.getsize(path))
            size = inner.tell()
            inner.seek(0)
            _add(outer, f"{wnid}.tar", inner, size)
    val = os.path.join(extracted_dir, "val")
    with tarfile.open(os.path.join(output_dir, "ILSVRC2012_img_val.tar"), "w", format=tarfile.GNU_FORMAT) as tar:
        for folder, _, names in sorted(os.walk(val)):  # Flat, or val/<wnid>/ folders kept as <wnid>/<file>.
            for name in sorted(names):
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    _add(tar, os.path.relpath(path, val).replace(os.sep, "/"), f, os.path.getsize(path))
    for name in (VAL_LABELS, CLASS_NAMES):
        if os.path.exists(os.path.join(extracted_dir, name)):
            shutil.copy(os.path.join(extracted_dir, name), os.path.join(output_dir, name))
