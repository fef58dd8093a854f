import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from pipeline import demo_data as demo_module
from pipeline import example_spec
from pipeline.beam import images, sources
from pipeline.reader import input as data_input
from tests.helpers import TRAIN_PER_CLASS, VAL_PER_CLASS, photos_dir, run, run_conversion

WNIDS = [wnid for wnid, _, _ in demo_module.CLASSES]


def _records(data_dir, split):
    files = data_input.shard_files(data_dir, split)
    out = []
    for path in files:
        for serialized in tf.data.TFRecordDataset(path):
            parsed = example_spec.parse_example(serialized)
            out.append({k: v.numpy() for k, v in parsed.items()} | {"shard": os.path.basename(path)})
    return out


def test_summary_accounts_for_every_file(demo_data, demo_raw):
    with open(os.path.join(demo_data, "summary.json")) as f:
        summary = json.load(f)
    train_files = glob.glob(os.path.join(demo_raw, "train", "*", "*"))
    sizes = summary["train"].pop("shard_sizes")
    files = data_input.shard_files(demo_data, "train")
    assert summary["train"].pop("bytes") == sum(os.path.getsize(f) for f in files)
    assert summary["train"] == {"seen": len(train_files), "written": len(train_files) - 1, "rejected": 1, "shards": 4}
    assert sizes == [sum(1 for _ in tf.data.TFRecordDataset(f)) for f in files] and sum(sizes) == len(train_files) - 1
    assert summary["image_size"] == 256
    assert summary["validation"]["seen"] == summary["validation"]["written"] == len(WNIDS) * VAL_PER_CLASS
    with open(os.path.join(demo_data, "rejected.tsv")) as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    assert len(rows) == 1 and rows[0][1].endswith("_truncated.JPEG") and "truncated" in rows[0][2]


TFDS_READ = """
import json, sys
import tensorflow_datasets as tfds
builder = tfds.builder_from_directory(sys.argv[1])
label = builder.info.features["image"]["class"]["label"]
counts = {}
for split in ("train", "validation"):
    for example in tfds.as_numpy(builder.as_dataset(split=split)):
        image = example["image"]
        wnid = label.int2str(image["class"]["label"])
        assert wnid == image["class"]["synset"].decode(), (wnid, image["class"]["synset"])
        assert image["encoded"].shape == (256, 256, 3), image["encoded"].shape
        counts.setdefault(split, {}).setdefault(wnid, 0)
        counts[split][wnid] += 1
sizes = {split: builder.info.splits[split].num_examples for split in counts}
print(json.dumps(dict(names=label.names, class_names=builder.info.metadata["class_names"], counts=counts,
                      sizes=sizes, shards={s: builder.info.splits[s].shard_lengths for s in counts})))
"""


def test_tensorflow_datasets_reads_the_converted_folder_as_it_is(demo_data):
    result = run("-c", TFDS_READ, demo_data)
    assert result.returncode == 0, result.stderr[-3000:]
    read = json.loads(result.stdout.strip().splitlines()[-1])
    with open(os.path.join(demo_data, "labels.txt")) as f:
        labels = [line.rstrip("\n").split("\t") for line in f]
    with open(os.path.join(demo_data, "summary.json")) as f:
        summary = json.load(f)
    assert read["names"] == [wnid for wnid, _ in labels]  # Label i is labels.txt's line i.
    assert read["class_names"] == dict(labels)
    for split in ("train", "validation"):
        assert read["sizes"][split] == summary[split]["written"] == sum(read["counts"][split].values())
        assert read["shards"][split] == summary[split]["shard_sizes"]
        by_class = {}
        for record in _records(demo_data, split):
            by_class[record[example_spec.SYNSET].decode()] = by_class.get(record[example_spec.SYNSET].decode(), 0) + 1
        assert read["counts"][split] == by_class


def test_records_hold_the_converted_images_with_sorted_wnid_labels(demo_data, demo_raw):
    with open(os.path.join(demo_data, "labels.txt")) as f:  # With the names LOC_synset_mapping.txt gives.
        assert f.read().splitlines() == [f"{w}\t{name}" for w, name, _ in sorted(demo_module.CLASSES)]
    records = _records(demo_data, "train")
    assert len(records) == len(WNIDS) * TRAIN_PER_CLASS + 3  # + CMYK, grayscale and PNG quirks.
    for record in records[:12]:
        synset = record[example_spec.SYNSET].decode()
        assert record[example_spec.LABEL] == sorted(WNIDS).index(synset)
        path = os.path.join(demo_raw, "train", synset, record[example_spec.FILENAME].decode())
        with open(path, "rb") as f:
            _, expected = images.convert(f.read())
        decoded = tf.io.decode_jpeg(record[example_spec.ENCODED]).numpy().astype(float)
        assert decoded.shape == (256, 256, 3)
        assert np.abs(decoded - expected).mean() < 4.0  # JPEG quality 90 on grainy images.


def test_flat_validation_is_labelled_from_the_labels_file(demo_data, demo_raw):
    labels = sources.read_val_labels(os.path.join(demo_raw, demo_module.VAL_LABELS))
    for record in _records(demo_data, "validation"):
        number = int(sources.VAL_FILE_RE.search(record[example_spec.FILENAME].decode()).group(1))
        assert record[example_spec.SYNSET].decode() == labels[number]


def test_shards_are_shuffled_mixes_of_classes(demo_data):
    records = _records(demo_data, "train")
    for shard in {r["shard"] for r in records}:
        labels = [r[example_spec.LABEL] for r in records if r["shard"] == shard]
        assert len(set(labels)) >= 5, f"{shard} holds only classes {set(labels)}"


def test_statistics_are_those_of_the_images_the_reader_delivers(demo_data):
    """The mean image and PCA of the training records as tf.data decodes them (not of the pixels before JPEG
    encoding: chroma subsampling changes the smaller eigenvalues)."""
    files = data_input.shard_files(demo_data, "train")
    pixels = [data_input.decode(r)[0].numpy() for r in tf.data.TFRecordDataset(files)]
    pixels = np.stack(pixels).astype(np.float64)
    stats = np.load(os.path.join(demo_data, "stats.npz"))
    assert stats["image_count"] == len(pixels)
    np.testing.assert_allclose(stats["mean_image"], pixels.mean(axis=0), atol=1e-9)
    covariance = np.cov(pixels.reshape(-1, 3), rowvar=False, bias=True)
    np.testing.assert_allclose(stats["eigenvalues"], np.linalg.eigvalsh(covariance)[::-1], rtol=1e-9)
    with open(os.path.join(demo_data, "stats.json")) as f:
        assert json.load(f)["eigenvalues"] == pytest.approx(stats["eigenvalues"].tolist())


def test_rerun_is_deterministic_and_replaces_the_previous_output(demo_data, demo_raw, tmp_path):
    out = str(tmp_path / "out")
    run_conversion(demo_raw, out, train_shards=3, validation_shards=1)
    run_conversion(demo_raw, out)  # Same as the fixture's run: 4 + 2 shards, seed 0.
    names = sorted(os.listdir(out))
    assert [n for n in names if n.startswith("train-")] == [f"train-{i:05d}-of-00004" for i in range(4)]
    assert not [n for n in names if n.startswith(".staging")]
    for name in names:
        if name.startswith(("train-", "validation-")):
            with open(os.path.join(out, name), "rb") as a, open(os.path.join(demo_data, name), "rb") as b:
                assert a.read() == b.read(), name


def test_real_photos_and_oddities_are_all_accounted_for(tmp_path):
    root = os.path.join(photos_dir(), "oddities")
    out = run_conversion(root, str(tmp_path / "out"), train_shards=2, validation_shards=1)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["train"]["seen"] == 12
    assert summary["train"]["written"] == 10 and summary["train"]["rejected"] == 2
    with open(os.path.join(out, "rejected.tsv")) as f:
        reasons = {os.path.basename(line.split("\t")[1]): line.split("\t")[2] for line in list(f)[1:]}
    assert reasons.keys() == {"n02123045_empty.JPEG", "n02123045_truncated50.JPEG"}


@pytest.fixture(scope="module")
def demo_tars(demo_raw, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tars"))
    demo_module.write_as_tars(demo_raw, root)
    return root


@pytest.mark.parametrize("tar_reads", ["in_order", "at_offsets"])
def test_downloaded_tars_give_the_same_output_as_extracted_folders(demo_tars, demo_data, tmp_path, tar_reads):
    assert sorted(os.listdir(demo_tars)) == [
        "ILSVRC2012_img_train.tar",
        "ILSVRC2012_img_val.tar",
        demo_module.CLASS_NAMES,
        demo_module.VAL_LABELS,
    ]
    out = run_conversion(demo_tars, str(tmp_path / "out"), tar_reads=tar_reads)
    assert sorted(os.listdir(out)) == sorted(os.listdir(demo_data))
    for name in sorted(os.listdir(demo_data)):
        if name not in ("rejected.tsv", "stats.npz"):  # The npz zip holds write times: compared by its arrays.
            with open(os.path.join(out, name), "rb") as a, open(os.path.join(demo_data, name), "rb") as b:
                assert a.read() == b.read(), name
    ours, theirs = np.load(os.path.join(out, "stats.npz")), np.load(os.path.join(demo_data, "stats.npz"))
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key])
    with open(os.path.join(out, "rejected.tsv")) as f:
        (row,) = [line.rstrip("\n").split("\t") for line in f][1:]
    assert row[1].startswith(os.path.join(demo_tars, "ILSVRC2012_img_train.tar:train/")), row
    assert row[1].endswith("_truncated.JPEG") and "truncated" in row[2]


@pytest.mark.parametrize("tar_reads", ["in_order", "at_offsets"])
def test_an_unreadable_tar_stops_the_job_naming_it(tmp_path, tar_reads):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "ILSVRC2012_img_train.tar").write_bytes(b"\x1f\x8b" + b"gzipped, not a plain tar" * 100)
    with pytest.raises(Exception, match="ILSVRC2012_img_train.tar: not a readable uncompressed tar"):
        run_conversion(str(tmp_path / "in"), str(tmp_path / "out"), val_labels=None, tar_reads=tar_reads)


def kaggle_copy(demo_raw, top, rows=None):
    """demo_raw as Kaggle ships ImageNet: top/ILSVRC/Data/CLS-LOC/{train,val}, and at the top LOC_synset_mapping.txt
    and LOC_val_solution.csv (rows in no fixed order, a wnid and a box per object). `rows` edits the CSV's rows."""
    import random
    import shutil

    data = os.path.join(top, *sources.KAGGLE_DATA.split("/"))
    shutil.copytree(os.path.join(demo_raw, "train"), os.path.join(data, "train"))
    shutil.copytree(os.path.join(demo_raw, "val"), os.path.join(data, "val"))
    shutil.copy(os.path.join(demo_raw, "LOC_synset_mapping.txt"), top)
    labels = sources.read_val_labels(os.path.join(demo_raw, demo_module.VAL_LABELS))
    lines = [f"ILSVRC2012_val_{n:08d},{w} 12 30 200 180 {w} 5 6 70 90 " for n, w in labels.items()]
    random.Random(0).shuffle(lines)
    with open(os.path.join(top, sources.KAGGLE_VAL_LABELS), "w") as f:
        f.write("\n".join([sources.KAGGLE_CSV_HEADER, *(rows(lines) if rows else lines)]) + "\n")
    return data


def test_kaggles_copy_converts_with_the_devkits_labels(demo_raw, demo_data, tmp_path):
    data = kaggle_copy(demo_raw, str(tmp_path / "kaggle"))
    converted = run_conversion(data, str(tmp_path / "out"))  # The CSV and the names found at Kaggle's top.
    labelled = lambda folder, split: {  # noqa: E731
        r[example_spec.FILENAME]: (r[example_spec.LABEL], r[example_spec.SYNSET]) for r in _records(folder, split)
    }
    for split in ("train", "validation"):
        ours, devkit = labelled(converted, split), labelled(demo_data, split)
        assert ours == devkit and len(ours) > 0
    for name in ("labels.txt", "summary.json"):
        with open(os.path.join(converted, name)) as a, open(os.path.join(demo_data, name)) as b:
            assert a.read() == b.read(), name


@pytest.mark.parametrize(
    "rows, message",
    [
        (lambda lines: lines[1:], r"of its 19 rows, 0 name images that are not there.*1 of the folder's 20 images"),
        (
            lambda lines: [*lines, "ILSVRC2012_val_00000099,n90000001 1 2 3 4"],
            r"of its 21 rows, 1 name images that are not there \(first: ILSVRC2012_val_00000099\), and 0 of",
        ),
    ],
)
def test_a_kaggle_csv_that_does_not_fit_the_images_is_refused_with_the_counts(demo_raw, tmp_path, rows, message):
    data = kaggle_copy(demo_raw, str(tmp_path / "kaggle"), rows=rows)
    with pytest.raises(ValueError, match=message):
        sources.load_val_labels(data)


def test_the_command_refuses_a_kaggle_csv_missing_images_before_converting(demo_raw, tmp_path):
    data = kaggle_copy(demo_raw, str(tmp_path / "kaggle"), rows=lambda lines: lines[3:])
    out = tmp_path / "out"
    result = run("-m", "pipeline.build_tfrecords", f"--input_dir={data}", f"--output_dir={out}")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "LOC_val_solution.csv does not fit" in result.stderr and "3 of the folder's 20 images have no row" in (
        result.stderr
    )
    assert not out.exists()
