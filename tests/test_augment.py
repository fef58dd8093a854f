import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from model import augment
from tests.helpers import TWO_DEVICES, eager_compiled_and_in_data

SEED = tf.constant([7, 11])


def _batch(n=3, size=12, seed=0):
    return np.random.default_rng(seed).uniform(-100, 100, size=(n, size, size, 3)).astype(np.float32)


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4), st.booleans()), min_size=1, max_size=4))
@settings(deadline=None, max_examples=25)
def test_crop_and_flip_is_numpy_slicing(params):
    x = _batch(len(params))
    top, left, flip = (tf.constant([p[i] for p in params]) for i in range(3))
    got = eager_compiled_and_in_data(lambda *a: augment.crop_and_flip(*a, 8), tf.constant(x), top, left, flip)
    for b, (y0, x0, f) in enumerate(params):
        expected = x[b, y0 : y0 + 8, x0 : x0 + 8]
        np.testing.assert_array_equal(got[b], expected[:, ::-1] if f else expected)


def test_random_crops_cover_every_offset_and_flip_half_the_images():
    """§4.1 at the paper's sizes: 256 -> 224 leaves offsets 0..32 in both axes; each image mirrored with p=1/2."""
    rows, cols = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    coordinates = np.broadcast_to(np.stack([rows, cols, rows], -1), (256, 256, 256, 3)).astype(np.int32)
    crops = eager_compiled_and_in_data(lambda x, s: augment.random_crop_and_flip(x, 224, s), coordinates, SEED)
    tops, flips = crops[:, 0, 0, 0], crops[:, 0, 0, 1] > crops[:, 0, -1, 1]
    lefts = np.where(flips, crops[:, 0, -1, 1], crops[:, 0, 0, 1])
    for crop, top, left, flip in zip(crops, tops, lefts, flips, strict=True):  # Each one a (mirrored) patch.
        patch = coordinates[0, top : top + 224, left : left + 224]
        np.testing.assert_array_equal(crop, patch[:, ::-1] if flip else patch)
    assert tops.min() == lefts.min() == 0 and tops.max() == lefts.max() == 32
    assert len(set(tops)) > 25 and len(set(lefts)) > 25  # All 33 are possible; 256 draws see most.
    assert 0.4 < flips.mean() < 0.6  # Binomial(256, 1/2): outside this range with probability < 0.2%.


def test_random_crops_repeat_with_the_seed_and_differ_without():
    x = tf.constant(_batch(16, size=12))
    first = augment.random_crop_and_flip(x, 8, SEED).numpy()
    np.testing.assert_array_equal(augment.random_crop_and_flip(x, 8, SEED).numpy(), first)
    assert not np.array_equal(augment.random_crop_and_flip(x, 8, tf.constant([7, 12])).numpy(), first)
    assert not np.array_equal(augment.random_crop_and_flip(x, 8, None).numpy(), first)


def test_ten_crops_are_corners_centre_and_mirrors():
    x = _batch(2, size=10)
    crops = eager_compiled_and_in_data(lambda images: augment.ten_crops(images, 6), tf.constant(x))
    assert len(crops) == 10
    for crop, (y0, x0) in zip(crops[:5], [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)], strict=True):
        np.testing.assert_array_equal(crop, x[:, y0 : y0 + 6, x0 : x0 + 6])
    for crop, mirror in zip(crops[:5], crops[5:], strict=True):
        np.testing.assert_array_equal(mirror, crop[:, :, ::-1])


def test_lighting_offsets_lie_in_the_span_of_the_eigenvectors_with_the_intended_variance():
    values = np.array([15000.0, 1400.0, 400.0], np.float32)
    vectors = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0].astype(np.float32)
    offsets = eager_compiled_and_in_data(
        lambda v, p, s: augment.lighting_offsets(20000, v, p, 0.1, s), values, vectors, SEED
    )
    # §4.1: offset = V (alpha * l), alpha ~ N(0, 0.1), l = sqrt(eigenvalue): its covariance is V diag(0.01 l^2) V^T.
    expected = vectors @ np.diag(0.01 * values) @ vectors.T
    np.testing.assert_allclose(np.cov(offsets, rowvar=False), expected, atol=0.05 * 0.01 * values[0])
    alphas = offsets @ vectors / np.sqrt(values)  # Back to the per-component draws: normal, not uniform.
    np.testing.assert_allclose(offsets, (alphas * np.sqrt(values)) @ vectors.T, atol=1e-3)  # In the span.
    assert np.abs(alphas.std(axis=0) - 0.1).max() < 0.005
    assert np.abs(alphas).max() > 0.35  # A uniform draw with this std would never pass 0.18.
    low_rank = augment.lighting_offsets(1000, np.float32([100, 0, 0]), vectors, 0.1, SEED).numpy()
    np.testing.assert_allclose(np.cross(low_rank, vectors[:, 0]), 0.0, atol=1e-4)  # Only along component 1.


def _preprocess(image_size=16, crop_size=12, lighting_std=0.1):
    layer = augment.Preprocess(image_size, crop_size, lighting_std)
    rng = np.random.default_rng(1)
    layer.set_statistics(rng.uniform(0, 255, (image_size, image_size, 3)), [100.0, 10.0, 1.0], np.eye(3))
    return layer


def test_inference_is_the_mean_subtracted_centre_crop():
    layer = _preprocess()
    images = np.random.default_rng(2).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    got = eager_compiled_and_in_data(lambda x: layer(x, training=False), tf.constant(images))
    expected = (images.astype(np.float32) - layer.mean_image.numpy())[:, 2:14, 2:14]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_training_adds_one_colour_offset_per_image_to_a_crop():
    layer = _preprocess()
    images = np.full((4, 16, 16, 3), 128, np.uint8)
    layer.set_statistics(np.zeros((16, 16, 3)), [100.0, 10.0, 1.0], np.eye(3))
    got = eager_compiled_and_in_data(lambda x, s: layer(x, training=True, seed=s), tf.constant(images), SEED) - 128
    assert got.shape == (4, 12, 12, 3)
    per_image = got.reshape(4, -1, 3)
    np.testing.assert_allclose(per_image, np.broadcast_to(per_image[:, :1], per_image.shape), atol=1e-4)
    assert np.abs(per_image[:, 0]).max() > 0  # The lighting moved the colour.


def test_replicas_augment_on_their_own_devices_from_uint8():
    """Under MirroredStrategy each replica's crops, flips and lighting run on its device, on the uint8 batch that
    crossed to it."""
    strategy = tf.distribute.MirroredStrategy(list(TWO_DEVICES))
    with strategy.scope():
        layer = _preprocess()

    def replica(images, seed):
        return layer(images, training=True, seed=seed)

    step = tf.function(lambda images, seed: strategy.run(replica, args=(images, seed)))
    graph = step.get_concrete_function(tf.TensorSpec((4, 16, 16, 3), tf.uint8), tf.TensorSpec([2], tf.int32)).graph
    ops = [op for op in graph.get_operations() if op.type in ("GatherV2", "StatelessRandomUniformIntV2", "Cast")]
    devices = {op.device.split("/device:")[-1] for op in ops}
    assert devices == {"CPU:0", "CPU:1"}  # Both replicas, each op on its replica's device.
    for device in devices:  # Each replica turns its own uint8 images to float32.
        casts = [
            op for op in ops if op.type == "Cast" and op.device.endswith(device) and op.inputs[0].dtype == tf.uint8
        ]
        assert [(op.inputs[0].dtype, op.outputs[0].dtype) for op in casts] == [(tf.uint8, tf.float32)], device


@pytest.mark.parametrize("training", [False, True])
def test_preprocess_config_round_trip(training):
    layer = _preprocess(lighting_std=0.0)
    clone = augment.Preprocess.from_config(layer.get_config())
    assert (clone.image_size, clone.crop_size, clone.lighting_std) == (16, 12, 0.0)
    assert clone(np.zeros((1, 16, 16, 3), np.uint8), training=training).shape == (1, 12, 12, 3)
