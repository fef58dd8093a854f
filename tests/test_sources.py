import io
import os
import tarfile

import pytest

from pipeline.beam import sources


def _tar(files):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("a_folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)  # Not a regular file: not listed.
    return buffer.getvalue()


def test_tar_members_give_each_files_bytes_in_place():
    files = {"a.JPEG": b"x" * 700, "b" * 120 + ".JPEG": b"yz", "empty.JPEG": b""}  # A GNU long name, an empty file.
    data = _tar(files)
    f = io.BytesIO(data)
    members = list(sources.tar_members(f))
    assert [name for name, _, _ in members] == list(files)
    for name, offset, size in members:
        assert data[offset : offset + size] == files[name]


def test_tar_members_inside_a_tar_count_offsets_from_the_outer_file():
    inner = _tar({"n1_0.JPEG": b"first", "n1_1.JPEG": b"second"})
    outer = _tar({"readme.txt": b"?" * 1000, "n1.tar": inner})
    f = io.BytesIO(outer)
    (_, start, size) = [m for m in sources.tar_members(f) if m[0] == "n1.tar"][0]
    members = list(sources.tar_members(f, start, size))
    assert [(name, outer[o : o + s]) for name, o, s in members] == [("n1_0.JPEG", b"first"), ("n1_1.JPEG", b"second")]


def test_not_a_tar_is_a_clear_error():
    with pytest.raises(ValueError, match="not a readable uncompressed tar"):
        list(sources.tar_members(io.BytesIO(b"\x1f\x8b" + b"gzip, not tar" * 100)))


def test_read_image_of_a_file_and_of_a_tar_member(tmp_path):
    (tmp_path / "img.JPEG").write_bytes(b"whole file")
    data = _tar({"m.JPEG": b"member"})
    (tmp_path / "t.tar").write_bytes(data)
    (_, offset, size) = next(sources.tar_members(io.BytesIO(data)))
    assert sources.read_image(sources.ImageRef("train/n1/img.JPEG", str(tmp_path / "img.JPEG"))) == b"whole file"
    ref = sources.ImageRef("train/n1/m.JPEG", str(tmp_path / "t.tar"), offset, size)
    assert sources.read_image(ref) == b"member"
    with pytest.raises(OSError, match="ends inside"):
        sources.read_image(ref._replace(offset=len(data) - 2))


def test_tar_contents_give_each_files_bytes_reading_front_to_back():
    files = {"a.JPEG": b"x" * 700, "b" * 120 + ".JPEG": b"yz", "empty.JPEG": b""}
    inner = _tar(files)
    outer = _tar({"readme.txt": b"?" * 1000, "n1.tar": inner})
    (_, start, size) = [m for m in sources.tar_members(io.BytesIO(outer)) if m[0] == "n1.tar"][0]
    contents = list(sources.tar_contents(io.BytesIO(outer), start, size))
    assert [(name, data) for name, _, data in contents] == list(files.items())
    for _, offset, data in contents:  # Offsets in the outer file, as the rejected list names them.
        assert outer[offset : offset + len(data)] == data
    with pytest.raises(ValueError, match="not a readable uncompressed tar"):
        list(sources.tar_contents(io.BytesIO(b"\x1f\x8b" + b"gzip, not tar" * 100)))


def test_layout_looks_for_one_file_not_all(tmp_path, monkeypatch):
    """The launcher checks the layout; the job lists the folder (once)."""
    for i in range(5):
        (tmp_path / "train" / f"n{i}").mkdir(parents=True)
        (tmp_path / "train" / f"n{i}" / "a.JPEG").write_bytes(b"x")
    limits = []
    match = sources.FileSystems.match
    monkeypatch.setattr(sources.FileSystems, "match", lambda p, limits=None: limits_seen(p, limits))

    def limits_seen(patterns, given):
        limits.append(given)
        return match(patterns, given)

    assert sources.layout(str(tmp_path), "train") == ("folder", None)
    assert limits == [[1]]


@pytest.mark.parametrize(
    "relative, wnid",
    [
        ("train/n01440764/n01440764_10026.JPEG", "n01440764"),
        ("val/n01440764/ILSVRC2012_val_00000293.JPEG", "n01440764"),
        ("val/ILSVRC2012_val_00000002.JPEG", "n09999999"),
        ("val/ILSVRC2012_val_00000003.JPEG", None),  # Past the end of the labels file.
        ("val/photo.JPEG", None),  # Not numbered.
        ("train/stray.JPEG", None),  # Not in a class folder.
    ],
)
def test_labels_come_from_the_place_in_the_extracted_layout(relative, wnid):
    assert sources.label_of(relative, {1: "n01440764", 2: "n09999999"}) == wnid


def test_relative_to_works_for_paths_and_urls():
    assert sources.relative_to(os.path.join("/data", "raw", "train", "n1", "a.JPEG"), "/data/raw/") == "train/n1/a.JPEG"
    assert sources.relative_to("gs://bucket/raw/val/x.JPEG", "gs://bucket/raw") == "val/x.JPEG"
    with pytest.raises(ValueError):
        sources.relative_to("/elsewhere/a.JPEG", "/data/raw")


def test_layout_prefers_extracted_folders_and_finds_the_tars(tmp_path):
    assert sources.layout(str(tmp_path), "train") == (None, None)
    (tmp_path / sources.TARS["train"]).write_bytes(_tar({}))
    assert sources.layout(str(tmp_path), "train") == ("tar", str(tmp_path / sources.TARS["train"]))
    (tmp_path / "train" / "n1").mkdir(parents=True)
    (tmp_path / "train" / "n1" / "a.JPEG").write_bytes(b"x")
    assert sources.layout(str(tmp_path), "train") == ("folder", None)


def test_kaggles_csv_labels_each_image_by_its_first_wnid_whatever_the_row_order(tmp_path):
    path = tmp_path / sources.KAGGLE_VAL_LABELS
    rows = ["ILSVRC2012_val_00000003,n02 1 2 3 4", "ILSVRC2012_val_00000001,n01 5 6 7 8 n01 1 1 2 2", ""]
    path.write_text("\n".join([sources.KAGGLE_CSV_HEADER, *rows]))
    assert sources.read_val_labels(str(path)) == {3: "n02", 1: "n01"}
    path.write_text("\n".join([sources.KAGGLE_CSV_HEADER, "ILSVRC2012_val_00000003,"]))
    with pytest.raises(ValueError, match=r"LOC_val_solution.csv:2: expected"):
        sources.read_val_labels(str(path))
    path.write_text("\n".join([sources.KAGGLE_CSV_HEADER, rows[0], rows[0]]))
    with pytest.raises(ValueError, match=r":3: ILSVRC2012_val_00000003 has a row already"):
        sources.read_val_labels(str(path))


def test_kaggles_top_folder_is_three_up_from_its_data(tmp_path):
    assert sources.kaggle_top("gs://b/imagenet/ILSVRC/Data/CLS-LOC/") == "gs://b/imagenet"
    assert sources.kaggle_top(str(tmp_path)) is None
