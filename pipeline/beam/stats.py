"""The paper's data statistics as one mergeable Beam combiner over the training images.

§2: the mean image (per pixel, 256x256x3). §4.1: PCA of the 3x3 covariance of RGB values over every training pixel.
The accumulator holds exact integer sums [sum image, sum x x^T, image count] (the sum image in uint32 for its first
16.8 million images, then int64; x x^T in int64: room for 2.1 billion images of 256x256), so partial results from any
number of workers merge exactly and in any order; the float64 mean, covariance and eigen decomposition are taken
once, at the end. The RGB mean needs no sum of its own: it is the mean image's mean over positions, as every
image has the same size.
"""

import apache_beam as beam
import numpy as np

UINT32_IMAGES = (2**32 - 1) // 255  # Images a uint32 sum image holds (16.8 million); int64 beyond.


def pca(covariance):
    """Eigenvalues descending and eigenvectors as columns; each column's largest entry made positive."""
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    signs = np.sign(eigenvectors[np.abs(eigenvectors).argmax(axis=0), range(3)])
    return eigenvalues, eigenvectors * signs


def rgb_products(image):
    """Exact sum over the pixels of x x^T (3x3 int64) for a uint8 HxWx3 image.

    uint8 products fit uint16; their sum over one channel plane fits uint32 up to 66,052 pixels (a 256x256 image
    has 65,536) and is taken in uint64 beyond. Integer sums per channel pair rather than a float64 matmul of the
    (H*W)x3 pixels, whose two small dimensions BLAS handles poorly (docs/choices.md, "Conversion").
    """
    planes = np.ascontiguousarray(image.reshape(-1, 3).T, dtype=np.uint16)
    total = np.uint32 if planes.shape[1] * 255 * 255 < 2**32 else np.uint64
    out = np.empty((3, 3), np.int64)
    for i in range(3):
        for j in range(i, 3):
            out[i, j] = out[j, i] = np.multiply(planes[i], planes[j]).sum(dtype=total)
    return out


class PixelStatsFn(beam.CombineFn):
    """Combines uint8 HxWx3 images (all of one size) into the mean image and the RGB covariance with its PCA."""

    def create_accumulator(self):
        return None  # Shape-free until the first image, so any image size works.

    def add_input(self, accumulator, image):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
        if accumulator is None:
            accumulator = [np.zeros(image.shape, np.uint32), np.zeros((3, 3), np.int64), 0]
        elif accumulator[0].shape != image.shape:
            raise ValueError(f"image of shape {image.shape} among images of shape {accumulator[0].shape}")
        if accumulator[2] == UINT32_IMAGES:  # The sum image has room for no more in uint32.
            accumulator[0] = accumulator[0].astype(np.int64)
        np.add(accumulator[0], image, out=accumulator[0])  # In place; uint32 adds at twice int64's speed.
        accumulator[1] += rgb_products(image)
        accumulator[2] += 1
        return accumulator

    def merge_accumulators(self, accumulators):
        parts = [a for a in accumulators if a is not None]
        if not parts:
            return None
        if len({part[0].shape for part in parts}) > 1:
            raise ValueError(f"statistics of images of different sizes: {sorted({p[0].shape for p in parts})}")
        return [sum(part[0].astype(np.int64) for part in parts)] + [sum(part[i] for part in parts) for i in (1, 2)]

    def extract_output(self, accumulator):
        if accumulator is None:
            raise ValueError("no training image was converted: the statistics need at least one")
        image_sum, xxt, images = accumulator
        mean_image = image_sum / images
        pixels = images * image_sum.shape[0] * image_sum.shape[1]
        rgb_mean = image_sum.sum(axis=(0, 1)) / pixels
        covariance = xxt / pixels - np.outer(rgb_mean, rgb_mean)
        eigenvalues, eigenvectors = pca(covariance)
        return {
            "mean_image": mean_image,
            "rgb_mean": rgb_mean,
            "covariance": covariance,
            "eigenvalues": eigenvalues,
            "eigenvectors": eigenvectors,
            "image_count": np.int64(images),
        }


class MergeStatsFn(PixelStatsFn):
    """The same statistics from partial accumulators (one per shard writer) instead of images."""

    def add_input(self, accumulator, partial):
        return self.merge_accumulators([accumulator, partial])
