"""The Beam conversion job's parts: raw ImageNet (folders or tars, local or gs://) -> 256x256 JPEG TFRecord shards,
the mean image and the RGB PCA. Imports Apache Beam; training never imports this package."""
