"""The data, in two parts joined only by the one Example spec (example_spec.py):

- beam/: the Apache Beam conversion job that `python -m pipeline.build_tfrecords` runs (conversion.py's settings,
  sources.py, images.py, transforms.py, stats.py, outputs.py, progress.py);
- reader/: what training reads the converted folder with: the folder checked and loaded (data.py), the tf.data
  datasets (input.py), and the tf.data service's servers (service.py) that `python -m pipeline.data_service` starts.

The embedded demo set (demo_data.py, `python -m pipeline.make_demo_data`) is raw input for the conversion."""
