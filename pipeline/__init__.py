"""Data: the Beam conversion job and the tf.data reader."""
