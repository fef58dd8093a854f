import tensorflow as tf

from pipeline import example_spec


def _example():
    jpeg = tf.io.encode_jpeg(tf.fill([256, 256, 3], tf.constant(7, tf.uint8))).numpy()
    return jpeg, example_spec.make_example(
        jpeg=jpeg, height=256, width=256, label=3, synset="n01440764", filename="n01440764_1.JPEG"
    )


def _check(parsed, jpeg):
    assert parsed[example_spec.ENCODED].numpy() == jpeg
    assert parsed[example_spec.LABEL].numpy() == 3
    assert parsed[example_spec.SYNSET].numpy() == b"n01440764"
    assert parsed[example_spec.FILENAME].numpy() == b"n01440764_1.JPEG"
    assert parsed[example_spec.FORMAT].numpy() == b"JPEG"
    assert (parsed[example_spec.HEIGHT].numpy(), parsed[example_spec.WIDTH].numpy()) == (256, 256)


def test_round_trip_eagerly():
    jpeg, serialized = _example()
    _check(example_spec.parse_example(serialized), jpeg)


def test_round_trip_inside_tf_data():
    jpeg, serialized = _example()
    ds = tf.data.Dataset.from_tensors(serialized).map(example_spec.parse_example)
    _check(next(iter(ds)), jpeg)
