"""What training reads a converted folder with: data.py checks and loads it, input.py makes its tf.data datasets,
service.py runs and inspects a tf.data service. Needs TensorFlow only (no Beam)."""
