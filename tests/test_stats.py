import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from pipeline.beam import stats


def _images(n=5, size=8, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, size, size, 1))
    # Correlated channels, like photographs: the PCA has a dominant component.
    return np.clip(
        np.concatenate([base, base * 0.8 + 20, rng.integers(0, 256, (n, size, size, 1))], -1), 0, 255
    ).astype(np.uint8)


def _numpy_reference(images):
    pixels = images.reshape(-1, 3).astype(np.float64)
    covariance = np.cov(pixels, rowvar=False, bias=True)
    return images.astype(np.float64).mean(axis=0), covariance


def _check(result, images):
    mean_image, covariance = _numpy_reference(images)
    np.testing.assert_allclose(result["mean_image"], mean_image, rtol=1e-12)
    np.testing.assert_allclose(result["covariance"], covariance, rtol=1e-9)
    values, vectors = result["eigenvalues"], result["eigenvectors"]
    np.testing.assert_allclose(np.sort(values)[::-1], values)
    np.testing.assert_allclose(values, np.linalg.eigvalsh(covariance)[::-1], rtol=1e-9)
    np.testing.assert_allclose(covariance @ vectors, vectors * values, atol=1e-6)  # Columns are eigenvectors.
    assert result["image_count"] == len(images)


def test_combiner_matches_numpy():
    fn, images = stats.PixelStatsFn(), _images()
    acc = fn.create_accumulator()
    for image in images:
        acc = fn.add_input(acc, image)
    _check(fn.extract_output(acc), images)


def test_split_and_merged_accumulators_equal_one_pass():
    fn, images = stats.PixelStatsFn(), _images(n=7)
    parts = []
    for chunk in (images[:2], images[2:3], images[3:]):
        acc = fn.create_accumulator()
        for image in chunk:
            acc = fn.add_input(acc, image)
        parts.append(acc)
    merged = fn.merge_accumulators([parts[0], fn.create_accumulator(), fn.merge_accumulators(parts[1:])])
    _check(fn.extract_output(merged), images)


def test_combiner_in_a_pipeline():
    images = _images(n=6)

    def check(outputs):
        assert len(outputs) == 1
        _check(outputs[0], images)

    with TestPipeline() as p:
        result = p | beam.Create(list(images)) | beam.CombineGlobally(stats.PixelStatsFn())
        assert_that(result, check)


def test_pca_sorts_descending_with_positive_columns():
    values, vectors = stats.pca(np.diag([1.0, 3.0, 2.0]))
    np.testing.assert_allclose(values, [3.0, 2.0, 1.0])
    np.testing.assert_allclose(vectors, [[0, 0, 1], [1, 0, 0], [0, 1, 0]], atol=1e-12)


def test_sum_image_moves_to_int64_before_uint32_would_overflow(monkeypatch):
    monkeypatch.setattr(stats, "UINT32_IMAGES", 2)
    fn, images = stats.PixelStatsFn(), np.full((4, 2, 2, 3), 255, np.uint8)
    acc = None
    for image in images:
        acc = fn.add_input(acc, image)
    assert acc[0].dtype == np.int64
    np.testing.assert_array_equal(fn.extract_output(acc)["mean_image"], 255.0)


def test_large_images_sum_their_products_without_overflow():
    image = np.full((300, 300, 3), 255, np.uint8)  # 90,000 pixels: over uint32 for the sum of products.
    np.testing.assert_array_equal(stats.rgb_products(image), np.full((3, 3), 90_000 * 255 * 255))


def test_merging_shard_accumulators_equals_one_pass():
    images = _images(n=6)
    fn = stats.PixelStatsFn()
    partials = []
    for chunk in (images[:1], images[1:4], images[4:]):
        acc = None
        for image in chunk:
            acc = fn.add_input(acc, image)
        partials.append(acc)

    def check(outputs):
        assert len(outputs) == 1
        _check(outputs[0], images)

    with TestPipeline() as p:
        assert_that(p | beam.Create(partials) | beam.CombineGlobally(stats.MergeStatsFn()), check)


def test_images_of_other_sizes_are_refused():
    fn = stats.PixelStatsFn()
    acc = fn.add_input(None, np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        fn.add_input(acc, np.zeros((4, 5, 3), np.uint8))
