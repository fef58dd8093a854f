import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from pipeline import demo_data as demo_module
from pipeline import example_spec, images, sources
from pipeline import input as data_input
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
