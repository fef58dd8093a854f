"""The data: the Beam conversion job (build_tfrecords.py over conversion.py's settings, transforms.py, sources.py,
images.py, stats.py, outputs.py), the one Example spec (example_spec.py), the tf.data reader (input.py), the tf.data
service's processes (data_service.py) and the embedded demo dataset (demo_data.py)."""
