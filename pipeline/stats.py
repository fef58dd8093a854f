"""The paper's data statistics as one mergeable Beam combiner over the training images.

§2: the mean image (per pixel, 256x256x3). §4.1: PCA of the 3x3 covariance of RGB values over every training pixel.
The accumulator is float64 [sum image, sum x x^T, sum x, pixel count, image count], as tf.Transform's combiners do,
so partial results from any number of workers merge exactly.
"""

import apache_beam as beam
import numpy as np


def pca(covariance):
    """Eigenvalues descending and eigenvectors as columns; each column's largest entry made positive."""
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    signs = np.sign(eigenvectors[np.abs(eigenvectors).argmax(axis=0), range(3)])
    return eigenvalues, eigenvectors * signs


class PixelStatsFn(beam.CombineFn):
    """Combines uint8 HxWx3 images into the mean image and the RGB covariance with its PCA."""

    def create_accumulator(self):
        return None  # Shape-free until the first image, so any image size works.

    def add_input(self, accumulator, image):
        if accumulator is None:
            accumulator = [np.zeros(image.shape), np.zeros((3, 3)), np.zeros(3), 0, 0]
        x = image.reshape(-1, 3).astype(np.float64)
        accumulator[0] += image  # In place: no per-image copy of the 256x256x3 float64 sum.
        accumulator[1] += x.T @ x
        accumulator[2] += x.sum(axis=0)
        accumulator[3] += x.shape[0]
        accumulator[4] += 1
        return accumulator

    def merge_accumulators(self, accumulators):
        parts = [a for a in accumulators if a is not None]
        if not parts:
            return None
        return [sum(part[i] for part in parts) for i in range(5)]

    def extract_output(self, accumulator):
        if accumulator is None:
            raise ValueError("no training image was converted: the statistics need at least one")
        image_sum, xxt, x_sum, pixels, images = accumulator
        rgb_mean = x_sum / pixels
        covariance = xxt / pixels - np.outer(rgb_mean, rgb_mean)
        eigenvalues, eigenvectors = pca(covariance)
        return {
            "mean_image": image_sum / images,
            "rgb_mean": rgb_mean,
            "covariance": covariance,
            "eigenvalues": eigenvalues,
            "eigenvectors": eigenvectors,
            "image_count": np.int64(images),
        }
