import os
import shutil

import numpy as np
import pytest

from pipeline import input as data_input


def test_batches_are_uint8_images_and_int_labels(demo_data):
    images, labels = next(iter(data_input.dataset(demo_data, "train", batch_size=4, training=True)))
    assert images.shape == (4, 256, 256, 3) and images.dtype.name == "uint8"
    assert labels.dtype.name == "int32" and ((labels.numpy() >= 0) & (labels.numpy() < 10)).all()


def test_half_size_decoding_matches_downscaling(demo_data):
    full = next(iter(data_input.dataset(demo_data, "validation", batch_size=2, training=False)))[0].numpy()
    half = next(iter(data_input.dataset(demo_data, "validation", batch_size=2, training=False, image_size=128)))[0]
    assert half.shape == (2, 128, 128, 3)
    pooled = full.astype(float).reshape(2, 128, 2, 128, 2, 3).mean(axis=(2, 4))
    assert np.abs(half.numpy() - pooled).mean() < 3.0


def test_validation_is_one_ordered_pass(demo_data):
    summary = data_input.load_summary(demo_data)
    ds = data_input.dataset(demo_data, "validation", batch_size=3, training=False)
    labels = np.concatenate([y.numpy() for _, y in ds])
    again = np.concatenate([y.numpy() for _, y in ds])
    assert len(labels) == summary["validation"]["written"]
    np.testing.assert_array_equal(labels, again)


def test_missing_or_incomplete_shards_are_clear_errors(demo_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="pipeline.build_tfrecords"):
        data_input.shard_files(str(tmp_path), "train")
    for name in os.listdir(demo_data):
        if name.startswith("train-0000") and not name.startswith("train-00001"):
            shutil.copy(os.path.join(demo_data, name), tmp_path / name)
    with pytest.raises(ValueError, match="incomplete"):
        data_input.shard_files(str(tmp_path), "train")


def test_statistics_load_as_the_pipeline_wrote_them(demo_data):
    stats = data_input.load_stats(demo_data)
    assert stats["mean_image"].shape == (256, 256, 3)
    assert stats["eigenvalues"].shape == (3,) and stats["eigenvectors"].shape == (3, 3)
    assert data_input.resize_mean_image(stats["mean_image"], 128).shape == (128, 128, 3)
