"""Finding raw ImageNet (ILSVRC-2012) images through Beam's file systems, so local paths and gs:// work alike.

Two layouts, per split:

    <input_dir>/train/<wnid>/*.JPEG                        extracted, or
    <input_dir>/ILSVRC2012_img_train.tar                   as downloaded: a tar of per-class tars <wnid>.tar
    <input_dir>/val/ILSVRC2012_val_<8 digits>.JPEG         extracted, flat (labelled by a validation labels file),
    <input_dir>/val/<wnid>/*.JPEG                          or in class folders, or
    <input_dir>/ILSVRC2012_img_val.tar                     as downloaded: a flat tar of the validation files

Kaggle's copy ("ImageNet Object Localization Challenge") is the extracted layout at ILSVRC/Data/CLS-LOC, with
the validation labels in LOC_val_solution.csv and the names in LOC_synset_mapping.txt at its top, three folders
up: both are found there.

Images inside tars are read in place (tars are uncompressed: each member is one contiguous run of bytes), never
extracted. Every image is an ImageRef named by its place in the extracted layout, so both layouts give the same
names, the same shard assignment and the same records. A validation labels file has one wnid per line, line i
for image number i (tensorflow-datasets' format), or is Kaggle's CSV. Labels are 0-based in sorted-wnid order of
the training classes.
"""

import functools
import importlib.util
import io
import os
import re
import tarfile
from typing import NamedTuple

from apache_beam.io.filesystems import CompressionTypes, FileSystems

VAL_FILE_RE = re.compile(r"ILSVRC2012_val_(\d{8})\.[A-Za-z]+$")
TFDS_VAL_LABELS = ("datasets", "imagenet2012", "validation_labels.txt")
TARS = {"train": "ILSVRC2012_img_train.tar", "val": "ILSVRC2012_img_val.tar"}
CLASS_NAME_FILES = ("LOC_synset_mapping.txt", "synset_words.txt")  # Kaggle's copy of ImageNet; the ILSVRC devkit.
KAGGLE_DATA = "ILSVRC/Data/CLS-LOC"  # Where Kaggle's copy keeps train/ and val/, below its top folder.
KAGGLE_VAL_LABELS = "LOC_val_solution.csv"
KAGGLE_CSV_HEADER = "ImageId,PredictionString"
GCS_CHUNK = 16 << 20  # What Beam's GCS reader fetches per request unless told otherwise.
HEADER_CHUNK = 64 << 10  # A tar header (512 bytes) and the next few, when a listing seeks from header to header.


class ImageRef(NamedTuple):
    """One raw image: `relative` is its path in the extracted layout (train/<wnid>/<file>, val/[<wnid>/]<file>);
    the bytes are the whole of `source`, or `size` bytes at `offset` inside it (a tar)."""

    relative: str
    source: str
    offset: int = -1
    size: int = -1

    def describe(self):
        """Where the image is, for the rejected list: its path, or the tar and its place in the layout."""
        return self.source if self.offset < 0 else f"{self.source}:{self.relative}"


def open_file(path, chunk=None):
    """A binary reader of path as stored (no decompression guessed from the name). On gs://, `chunk` is what each
    ranged request fetches (Beam's GCS reader asks for GCS_CHUNK whatever is read): small where only headers are
    read, a window's size divided evenly where a window is read front to back, so that no byte is served twice or
    past the window."""
    if chunk and FileSystems.get_scheme(path) == "gs":
        return _gcs().open(path, "rb", read_buffer_size=int(chunk))
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


@functools.cache
def _gcs():
    from apache_beam.io.gcp import gcsio

    return gcsio.GcsIO()


def even_chunk(size, most=GCS_CHUNK):
    """The chunk that reads `size` bytes in the fewest equal requests of at most `most` bytes."""
    requests = max(1, -(-size // most))
    return max(1, -(-size // requests))


def size_of(path):
    return FileSystems.match([path])[0].metadata_list[0].size_in_bytes


def relative_to(path, root):
    """path below root, with '/' separators (local paths and URLs alike)."""
    path, root = path.replace("\\", "/"), root.replace("\\", "/").rstrip("/") + "/"
    if not path.startswith(root):
        raise ValueError(f"{path} is not inside {root}")
    return path[len(root) :]


def label_of(relative, val_labels):
    """The wnid an image is labelled with, from its place in the extracted layout; None when it has none."""
    parts = relative.split("/")
    if len(parts) == 3:  # train/<wnid>/<file> or val/<wnid>/<file>
        return parts[1]
    if len(parts) == 2 and parts[0] == "val":
        return val_wnid(parts[1], val_labels)
    return None


def folder_patterns(input_dir, folder):
    """Globs of an extracted split: files in class folders, and files directly in the folder."""
    return [FileSystems.join(input_dir, folder, "*", "*"), FileSystems.join(input_dir, folder, "*")]


def match(pattern, limit=None):
    """Sorted paths of the files matching pattern (an empty list when none); at most `limit` of them."""
    result = FileSystems.match([pattern], limits=[limit] if limit else None)[0]
    return sorted(m.path for m in result.metadata_list)


def layout(input_dir, folder):
    """How a split is stored: ('folder', None), ('tar', tar path), or (None, None) when it is absent. Looks for
    one file, not all of them: the job lists the folder itself, once."""
    if any(match(pattern, limit=1) for pattern in folder_patterns(input_dir, folder)):
        return "folder", None
    tar = FileSystems.join(input_dir, TARS[folder])
    if FileSystems.exists(tar):
        return "tar", tar
    return None, None


class _Window(io.RawIOBase):
    """The bytes [start, start + size) of a seekable file, as a seekable file of its own."""

    def __init__(self, f, start, size):
        super().__init__()
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, pos, whence=io.SEEK_SET):
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + pos
        return self.pos

    def readinto(self, buffer):
        n = max(0, min(len(buffer), self.size - self.pos))
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def tar_members(f, start=0, size=None):
    """(name, offset, size) of each regular file of the uncompressed tar at [start, start + size) of the seekable
    file f, offsets counted from the start of f. Reads the 512-byte headers and seeks over the data; keeps no
    list of members, so memory stays flat over ImageNet's 50,000-member validation tar."""
    if size is None:
        size = f.seek(0, io.SEEK_END) - start
    try:
        with tarfile.open(fileobj=_Window(f, start, size), mode="r:") as tar:
            while (member := tar.next()) is not None:
                if member.isfile():
                    yield member.name, start + member.offset_data, member.size
                tar.members.clear()
    except tarfile.TarError as e:
        raise ValueError(f"not a readable uncompressed tar: {e}") from None


def tar_contents(f, start=0, size=None):
    """(name, offset, bytes) of each regular file of the uncompressed tar at [start, start + size) of f, read
    front to back: one pass over the bytes, as object stores serve best."""
    if size is None:
        size = f.seek(0, io.SEEK_END) - start
    try:
        with tarfile.open(fileobj=_Window(f, start, size), mode="r|") as tar:
            for member in tar:
                if member.isfile():
                    yield member.name, start + member.offset_data, tar.extractfile(member).read()
    except tarfile.TarError as e:
        raise ValueError(f"not a readable uncompressed tar: {e}") from None


def read_image(ref):
    """The bytes of ref: a whole file, or a member of a tar."""
    with open_file(ref.source, chunk=ref.size if ref.offset >= 0 else None) as f:
        if ref.offset < 0:
            return f.read()
        f.seek(ref.offset)
        data = f.read(ref.size)
    if len(data) != ref.size:
        raise OSError(f"{ref.source} ends inside {ref.relative}: {len(data)} of {ref.size} bytes")
    return data


def tfds_val_labels_file():
    """Path of the ILSVRC-2012 validation labels shipped by tensorflow-datasets, or None if it is absent."""
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], *TFDS_VAL_LABELS)
    return path if os.path.exists(path) else None


def read_val_labels(path):
    """{image number (1-based): wnid} from a validation labels file: one wnid per line, or Kaggle's CSV."""
    with open_file(path) as f:
        return _parse_val_labels(path, f.read().decode())


def _parse_val_labels(path, text):
    if text.startswith(KAGGLE_CSV_HEADER):
        return _read_kaggle_csv(path, text)
    return {i: wnid for i, wnid in enumerate(text.split(), start=1)}


def _read_kaggle_csv(path, text):
    """Kaggle's LOC_val_solution.csv: rows `ILSVRC2012_val_NNNNNNNN,<wnid> <box> [<wnid> <box> ...]` in no fixed
    order; every box of an image is of its one class, so the first wnid is its label."""
    labels = {}
    for number, line in enumerate(text.splitlines()[1:], start=2):
        if not line.strip():
            continue
        image_id, _, predictions = line.partition(",")
        image = VAL_FILE_RE.search(image_id.strip() + ".JPEG")
        if not image or not predictions.split():
            raise ValueError(f"{path}:{number}: expected 'ILSVRC2012_val_NNNNNNNN,<wnid> <box>...', got {line!r}")
        if int(image.group(1)) in labels:
            raise ValueError(f"{path}:{number}: {image_id} has a row already")
        labels[int(image.group(1))] = predictions.split()[0]
    return labels


def val_wnid(path, val_labels):
    """The wnid of a flat val/ file, by its number in the labels file; None if it has none."""
    number = VAL_FILE_RE.search(path)
    if val_labels is None or not number:
        return None
    return val_labels.get(int(number.group(1)))


def kaggle_top(input_dir):
    """The top folder of Kaggle's copy when input_dir is its ILSVRC/Data/CLS-LOC, else None."""
    path = input_dir.replace("\\", "/").rstrip("/")
    return path[: -len(KAGGLE_DATA) - 1] if path.endswith("/" + KAGGLE_DATA) else None


def _beside(input_dir, names):
    """The first of these files in input_dir, or at the top of Kaggle's copy; None when there is none."""
    for folder in filter(None, (input_dir, kaggle_top(input_dir))):
        for name in names:
            if FileSystems.exists(FileSystems.join(folder, name)):
                return FileSystems.join(folder, name)
    return None


def resolve_val_labels(input_dir, val_labels_file=None):
    """The labels file for a flat val/ folder: the one given, else one beside the data (or Kaggle's CSV where
    Kaggle puts it), else tensorflow-datasets'."""
    if val_labels_file:
        if not FileSystems.exists(val_labels_file):
            raise FileNotFoundError(f"--val_labels_file={val_labels_file} does not exist")
        return val_labels_file
    return _beside(input_dir, ["validation_labels.txt", KAGGLE_VAL_LABELS]) or tfds_val_labels_file()


def load_val_labels(input_dir, val_labels_file=None):
    """{image number: wnid} for a flat val/ folder (None without a labels file). Kaggle's CSV names the images
    it labels, so it must name exactly the flat val/ folder's images: else it is refused with the counts."""
    path = resolve_val_labels(input_dir, val_labels_file)
    if not path:
        return None
    with open_file(path) as f:
        text = f.read().decode()
    labels = _parse_val_labels(path, text)
    if text.startswith(KAGGLE_CSV_HEADER) and layout(input_dir, "val")[0] == "folder":
        present = {int(m[1]) for p in match(FileSystems.join(input_dir, "val", "*")) if (m := VAL_FILE_RE.search(p))}
        absent, unlabelled = sorted(labels.keys() - present), sorted(present - labels.keys())
        if absent or unlabelled:
            raise ValueError(
                f"{path} does not fit {FileSystems.join(input_dir, 'val')}: of its {len(labels)} rows, "
                f"{len(absent)} name images that are not there (first: {_val_name(absent)}), and {len(unlabelled)} "
                f"of the folder's {len(present)} images have no row (first: {_val_name(unlabelled)}). Give the CSV "
                "that came with these images (--val_labels_file), or complete the folder"
            )
    return labels


def _val_name(numbers):
    return f"ILSVRC2012_val_{numbers[0]:08d}" if numbers else "none"


def read_class_names(path):
    """{wnid: name} from a file of "wnid name" lines (the devkit's synset_words.txt, LOC_synset_mapping.txt)."""
    with open_file(path) as f:
        lines = f.read().decode().splitlines()
    names = {}
    for number, line in enumerate(lines, start=1):
        if line.strip():
            wnid, _, name = line.strip().partition(" ")
            if not name:
                raise ValueError(f"{path}:{number}: expected 'wnid name', got {line!r}")
            names[wnid] = name.strip()
    return names


def resolve_class_names(input_dir, class_names_file=None):
    """The classes' names: from the file given, else one of CLASS_NAME_FILES beside the data (or at the top of
    Kaggle's copy), else none ({})."""
    if class_names_file:
        if not FileSystems.exists(class_names_file):
            raise FileNotFoundError(f"--class_names_file={class_names_file} does not exist")
        return read_class_names(class_names_file)
    path = _beside(input_dir, CLASS_NAME_FILES)
    return read_class_names(path) if path else {}
