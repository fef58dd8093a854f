import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from pipeline.reader import input as data_input
from tests.helpers import eager_compiled_and_in_data


def _split(data_dir, split="train"):
    files = data_input.shard_files(data_dir, split)
    return files, data_input.shard_sizes(files, data_input.load_summary(data_dir), split)


def _names(dataset):
    """A fingerprint per image: what the reader delivered, in order."""
    return [hash(image.tobytes()) for images, *_ in dataset for image in images.numpy()]


def test_decode_gives_uint8_images_and_int_labels_eagerly_and_in_tf_data(demo_data):
    record = next(iter(tf.data.TFRecordDataset(data_input.shard_files(demo_data, "train")[0])))
    image, label = eager_compiled_and_in_data(lambda r: data_input.decode(r, 128), record)
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8 and label.dtype == np.int32
    full, _ = data_input.decode(record)
    pooled = full.numpy().astype(float).reshape(128, 2, 128, 2, 3).mean(axis=(1, 3))
    assert np.abs(image - pooled).mean() < 3.0  # DCT scaling at decode ~ 2x2 averaging.


def test_an_epoch_is_every_image_once_in_an_order_drawn_from_seed_and_epoch(demo_data):
    files, sizes = _split(demo_data)
    epoch = _names(data_input.train_dataset(files, sizes, seed=0, epoch=0, batch_size=8, image_size=64))
    assert len(epoch) == len(set(epoch)) == sizes.sum() // 8 * 8  # Whole batches: 63 images -> 7 batches.
    assert _names(data_input.train_dataset(files, sizes, seed=0, epoch=0, batch_size=8, image_size=64)) == epoch
    other = _names(data_input.train_dataset(files, sizes, seed=0, epoch=1, batch_size=8, image_size=64))
    seed = _names(data_input.train_dataset(files, sizes, seed=1, epoch=0, batch_size=8, image_size=64))
    assert other != epoch and seed != epoch and len(set(other)) == len(epoch)


def test_a_resumed_epoch_continues_the_same_order(demo_data):
    files, sizes = _split(demo_data)
    epoch = _names(data_input.train_dataset(files, sizes, seed=0, epoch=2, batch_size=4, image_size=64, replicas=2))
    rest = data_input.train_dataset(
        files, sizes, seed=0, epoch=2, batch_size=4, image_size=64, replicas=2, skip_steps=3
    )
    assert _names(rest) == epoch[3 * 8 :]


def test_a_resume_never_opens_the_groups_it_skips(demo_data, tmp_path, monkeypatch):
    monkeypatch.setattr(data_input, "GROUP_SHARDS", 1)  # One shard a group: skipping a group skips a file.
    files, sizes = _split(demo_data)
    groups, _ = data_input.epoch_plan(sizes, seed=0, epoch=0, step_size=8)
    epoch = _names(data_input.train_dataset(files, sizes, seed=0, epoch=0, batch_size=8, image_size=64))
    skipped = int(sizes[groups[0][0]]) // 8 + 1  # Past the first group's images.
    copies = [str(shutil.copy(f, tmp_path / os.path.basename(f))) for f in files]
    with open(copies[groups[0][0]], "wb") as f:  # Unreadable: opening it would fail.
        f.write(b"not a tfrecord")
    rest = data_input.train_dataset(copies, sizes, seed=0, epoch=0, batch_size=8, image_size=64, skip_steps=skipped)
    assert _names(rest) == epoch[skipped * 8 :]


def test_each_worker_reads_its_own_shards_for_the_same_number_of_steps(demo_data):
    files, sizes = _split(demo_data)
    kwargs = dict(seed=0, epoch=0, batch_size=4, image_size=64, pipelines=2)
    first = _names(data_input.train_dataset(files, sizes, pipeline=0, **kwargs))
    second = _names(data_input.train_dataset(files, sizes, pipeline=1, **kwargs))
    assert len(first) == len(second) > 0 and not set(first) & set(second)
    groups = [data_input.epoch_plan(sizes, seed=0, epoch=0, step_size=4, pipeline=p, pipelines=2)[0] for p in (0, 1)]
    assert sorted(i for g in groups for group in g for i in group) == list(range(len(files)))


def test_evaluation_sees_every_image_once_in_whole_padded_batches(demo_data):
    files, sizes = _split(demo_data, "validation")
    batches = list(data_input.eval_dataset(files, sizes, batch_size=3, replicas=2, image_size=64))
    assert len(batches) % 2 == 0 and all(b[0].shape == (3, 64, 64, 3) for b in batches)
    valid = np.concatenate([b[2].numpy() for b in batches])
    assert valid.sum() == sizes.sum() == 20 and not valid[int(valid.sum()) :].any()
    seen = [(hash(x.tobytes()), y) for b in batches for x, y, v in zip(*(t.numpy() for t in b), strict=True) if v]
    records = tf.data.TFRecordDataset(files).map(lambda r: data_input.decode(r, 64))
    assert sorted(seen) == sorted((hash(x.numpy().tobytes()), int(y)) for x, y in records)
    halves = [
        list(data_input.eval_dataset(files, sizes, batch_size=4, image_size=64, pipeline=p, pipelines=2))
        for p in (0, 1)
    ]
    assert len(halves[0]) == len(halves[1])  # The same steps on every worker (a step is a collective).
    assert sum(int(b[2].numpy().sum()) for half in halves for b in half) == 20


def test_missing_or_incomplete_shards_are_clear_errors(demo_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="pipeline.build_tfrecords"):
        data_input.shard_files(str(tmp_path), "train")
    for name in os.listdir(demo_data):
        if name.startswith("train-0000") and not name.startswith("train-00001"):
            shutil.copy(os.path.join(demo_data, name), tmp_path / name)
    with pytest.raises(ValueError, match="incomplete"):
        data_input.shard_files(str(tmp_path), "train")


def test_shard_sizes_are_the_summarys_and_agree_with_the_records(demo_data):
    files, sizes = _split(demo_data)
    counted = [sum(1 for _ in tf.data.TFRecordDataset(f)) for f in files]
    np.testing.assert_array_equal(sizes, counted)


def test_statistics_load_as_the_pipeline_wrote_them(demo_data):
    stats = data_input.load_stats(demo_data)
    assert stats["mean_image"].shape == (256, 256, 3)
    assert stats["eigenvalues"].shape == (3,) and stats["eigenvectors"].shape == (3, 3)
    assert data_input.resize_mean_image(stats["mean_image"], 128).shape == (128, 128, 3)
