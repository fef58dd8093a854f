"""The Beam conversion job's parts: raw ImageNet (folders or tars, local or gs://) -> 256x256 JPEG TFRecord shards,
the mean image and the RGB PCA. Training never imports this package. Beam itself comes in with the modules that
build the job; images.py (one image's conversion, Pillow only) is also read by the commands that serve a trained
network, for the sizes the converter accepted."""
