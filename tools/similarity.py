"""§6.1 and Figure 4: the training images whose fc7 activations are nearest to a query's (Euclidean distance).

The search streams over the training shards, batch by batch on the device, keeping only the current best k per
query: ImageNet's fc7 features (1.28M x 4096 floats, 21 GB) are never held at once.
"""

import tensorflow as tf

from pipeline.reader import input as data_input
from tools import serving
from training import summaries


def features(model, images):
    """fc7 activations (float32, 4096 per image) of uint8 or float images at the model's decode size."""
    return tf.cast(model.net.features(model.preprocess(images, training=False)), tf.float32)


def images_from_files(paths, image_size):
    """Encoded image files -> uint8 (n, image_size, image_size, 3), preprocessed as the converter and reader do,
    within the served limits (a ValueError names a file beyond them)."""
    decoded = []
    for path in paths:
        with tf.io.gfile.GFile(path, "rb") as f:
            data = f.read()
        try:
            image = serving.decode_and_crop(data)
        except tf.errors.InvalidArgumentError as e:
            raise ValueError(f"{path}: {serving.refusal(e)}") from None
        decoded.append(tf.image.resize(image, [image_size] * 2, method="area"))
    return tf.cast(tf.round(tf.stack(decoded)), tf.uint8)


def _update(best, query_features, images, labels, feats):
    """The best k (distance, image, label) per query after a batch; distances squared, k kept sorted. The batch's
    images are gathered once per pick, never copied per query."""
    distances, best_images, best_labels = best
    count, k = tf.shape(distances)[0], tf.shape(distances)[1]
    new = tf.reduce_sum(tf.square(query_features[:, None, :] - feats[None, :, :]), axis=-1)  # [queries, batch]
    all_distances = tf.concat([distances, new], axis=1)
    _, order = tf.math.top_k(-all_distances, k=k)  # Into [the query's k kept, then the batch].
    # One pool of candidates: every query's kept k (row q's at q * k), then the batch.
    pick = tf.where(order < k, tf.range(count)[:, None] * k + order, count * k + order - k)
    pool_images = tf.concat([tf.reshape(best_images, [-1, *images.shape[1:]]), images], axis=0)
    pool_labels = tf.concat([tf.reshape(best_labels, [-1]), labels], axis=0)
    return tf.gather(all_distances, order, batch_dims=1), tf.gather(pool_images, pick), tf.gather(pool_labels, pick)


def nearest(model, query_images, files, sizes, *, k=6, batch_size=128):
    """For each query image, the k training images nearest in fc7 space: (squared distances [q, k], uint8 images
    [q, k, S, S, 3], labels [q, k]), nearest first. One pass over the shards, in batches."""
    size = model.preprocess.image_size
    query_features = features(model, query_images)
    count = query_images.shape[0]
    best = (
        tf.fill([count, k], float("inf")),
        tf.zeros([count, k, size, size, 3], tf.uint8),
        tf.fill([count, k], -1),
    )
    step = tf.function(
        lambda best, images, labels: _update(best, query_features, images, labels, features(model, images))
    )
    for images, labels, valid in data_input.eval_dataset(files, sizes, batch_size=batch_size, image_size=size):
        if not bool(tf.reduce_all(valid)):  # The last batch's padding is not a training image.
            keep = tf.where(valid)[:, 0]
            images, labels = tf.gather(images, keep), tf.gather(labels, keep)
        best = step(best, images, labels)
    return best


def figure_4(query_images, neighbour_images):
    """One image: a row per query, the query then its neighbours (as the paper's Figure 4 lays them out)."""
    rows = tf.concat([query_images[:, None], neighbour_images], axis=1)  # [q, 1 + k, S, S, 3]
    count, per_row = rows.shape[0], rows.shape[1]
    tiles = tf.reshape(tf.cast(rows, tf.float32) / 255.0, [count * per_row, *rows.shape[2:]])
    return summaries.grid(tiles, columns=per_row, gap=4)
