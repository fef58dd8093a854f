import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from model import augment


def _batch(n=3, size=12, seed=0):
    return np.random.default_rng(seed).uniform(-100, 100, size=(n, size, size, 3)).astype(np.float32)


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4), st.booleans()), min_size=1, max_size=4))
@settings(deadline=None, max_examples=25)
def test_crop_and_flip_is_numpy_slicing(params):
    x = _batch(len(params))
    top, left, flip = (tf.constant([p[i] for p in params]) for i in range(3))
    got = augment.crop_and_flip(tf.constant(x), top, left, flip, 8).numpy()
    for b, (y0, x0, f) in enumerate(params):
        expected = x[b, y0 : y0 + 8, x0 : x0 + 8]
        np.testing.assert_array_equal(got[b], expected[:, ::-1] if f else expected)


def test_crop_and_flip_inside_tf_data():
    x = _batch(2)
    ds = tf.data.Dataset.from_tensors(x).map(
        lambda b: augment.crop_and_flip(b, tf.constant([1, 2]), tf.constant([3, 0]), tf.constant([True, False]), 8)
    )
    got = next(iter(ds)).numpy()
    np.testing.assert_array_equal(got[0], x[0, 1:9, 3:11][:, ::-1])
    np.testing.assert_array_equal(got[1], x[1, 2:10, 0:8])


def test_random_crops_are_crops_or_mirrors_and_vary_per_image():
    x = _batch(64, size=12)
    got = augment.random_crop_and_flip(tf.constant(x), 8).numpy()
    seen = set()
    for b in range(len(x)):
        matches = [
            (y0, x0, f)
            for y0 in range(5)
            for x0 in range(5)
            for f in (False, True)
            if np.array_equal(got[b], x[b, y0 : y0 + 8, x0 : x0 + 8][:, ::-1] if f else x[b, y0 : y0 + 8, x0 : x0 + 8])
        ]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 20 and {f for _, _, f in seen} == {False, True}


def test_ten_crops_are_corners_centre_and_mirrors():
    x = _batch(2, size=10)
    crops = [c.numpy() for c in augment.ten_crops(tf.constant(x), 6)]
    assert len(crops) == 10
    for crop, (y0, x0) in zip(crops[:5], [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)], strict=False):
        np.testing.assert_array_equal(crop, x[:, y0 : y0 + 6, x0 : x0 + 6])
    for crop, mirror in zip(crops[:5], crops[5:], strict=False):
        np.testing.assert_array_equal(mirror, crop[:, :, ::-1])


def test_lighting_offsets_follow_the_pca():
    values = np.array([15000.0, 1400.0, 400.0], np.float32)
    vectors = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0].astype(np.float32)
    tf.random.set_seed(0)
    offsets = augment.lighting_offsets(20000, values, vectors, 0.1).numpy()
    # §4.1: offset = V (alpha * l), alpha ~ N(0, 0.1), l = sqrt(eigenvalue): its covariance is V diag(0.01 l^2) V^T.
    expected = vectors @ np.diag(0.01 * values) @ vectors.T
    np.testing.assert_allclose(np.cov(offsets, rowvar=False), expected, atol=0.05 * 0.01 * values[0])
    alphas = offsets @ vectors / np.sqrt(values)  # Back to the per-component draws: normal, not uniform.
    assert np.abs(alphas.std(axis=0) - 0.1).max() < 0.005
    assert np.abs(alphas).max() > 0.35  # A uniform draw with this std would never pass 0.18.


def _preprocess(image_size=16, crop_size=12, lighting_std=0.1):
    layer = augment.Preprocess(image_size, crop_size, lighting_std)
    rng = np.random.default_rng(1)
    layer.set_statistics(rng.uniform(0, 255, (image_size, image_size, 3)), [100.0, 10.0, 1.0], np.eye(3))
    return layer


def test_inference_is_the_mean_subtracted_centre_crop():
    layer = _preprocess()
    images = np.random.default_rng(2).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    got = layer(images, training=False).numpy()
    expected = (images.astype(np.float32) - layer.mean_image.numpy())[:, 2:14, 2:14]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_training_adds_one_colour_offset_per_image_to_a_crop():
    layer = _preprocess()
    images = np.full((4, 16, 16, 3), 128, np.uint8)
    layer.set_statistics(np.zeros((16, 16, 3)), [100.0, 10.0, 1.0], np.eye(3))
    got = layer(images, training=True).numpy() - 128.0
    assert got.shape == (4, 12, 12, 3)
    per_image = got.reshape(4, -1, 3)
    np.testing.assert_allclose(per_image, np.broadcast_to(per_image[:, :1], per_image.shape), atol=1e-4)
    assert np.abs(per_image[:, 0]).max() > 0  # The lighting moved the colour.


@pytest.mark.parametrize("training", [False, True])
def test_preprocess_config_round_trip(training):
    layer = _preprocess(lighting_std=0.0)
    clone = augment.Preprocess.from_config(layer.get_config())
    assert (clone.image_size, clone.crop_size, clone.lighting_std) == (16, 12, 0.0)
    assert clone(np.zeros((1, 16, 16, 3), np.uint8), training=training).shape == (1, 12, 12, 3)
