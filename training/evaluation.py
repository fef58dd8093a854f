"""Top-1 and top-5 error (§6) of a Classifier on a whole split, on the centre crop or §4.1's ten patches,
batched over the replicas of any strategy; with the per-class errors and the most confused pairs."""

import numpy as np
import tensorflow as tf

from model import classifier
from pipeline.reader import input as data_input
from training import checks, devices

MOST_CONFUSED = 20


def top_k_misses(labels, probs, k):
    """1.0 where the label is not among the k highest scores, else 0.0."""
    return 1.0 - tf.cast(tf.math.in_top_k(labels, probs, k), tf.float32)


class Interrupted(Exception):
    """Some worker was told to stop during an evaluation; every worker stopped at the same batch."""


def _eval_step(model, crops, num_classes):
    def replica_step(images, labels, valid, stop):
        probs = classifier.probabilities(model, images, crops)
        weight = tf.cast(valid, tf.float32)
        top1, top5 = (top_k_misses(labels, probs, k) * weight for k in (1, 5))
        loss = -tf.math.log(tf.maximum(tf.gather(probs, labels, batch_dims=1), 1e-30)) * weight
        per_class = tf.stack([tf.math.unsorted_segment_sum(v, labels, num_classes) for v in (weight, top1, top5)])
        predicted = tf.argmax(probs, axis=1, output_type=tf.int32)
        confusion = tf.math.confusion_matrix(labels, predicted, num_classes, weights=weight, dtype=tf.float32)
        return {"loss": tf.reduce_sum(loss), "per_class": per_class, "confusion": confusion, "stop": tf.identity(stop)}

    return replica_step


def evaluate(
    model, strategy, files, sizes, *, batch_size, image_size, crops, labels, split="validation", stop=lambda: 0
):
    """Errors over every image of the shards: a dict with top1_error, top5_error, loss, images, crops,
    per_class ({wnid: {name, images, top1_error, top5_error}}) and most_confused ([{true, predicted, count}]).

    batch_size is global; `labels` is [(wnid, name)] in label order. stop() (1: this worker was told to stop),
    asked before every batch and summed over the workers, ends the evaluation early with Interrupted."""
    local = devices.local_replicas(strategy)
    dataset = strategy.distribute_datasets_from_function(
        lambda ctx: data_input.eval_dataset(
            files,
            sizes,
            batch_size=ctx.get_per_replica_batch_size(batch_size),
            replicas=local,
            image_size=image_size,
            pipeline=ctx.input_pipeline_id,
            pipelines=ctx.num_input_pipelines,
        )
    )
    replica_step = _eval_step(model, crops, len(labels))

    @tf.function
    def step(batch, stop):
        outputs = strategy.run(replica_step, args=(*batch, stop))  # Reduced one by one: strategies differ on nests.
        return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in outputs.items()}

    totals = None
    try:
        for batch in dataset:
            result = {k: v.numpy() for k, v in step(batch, tf.constant(float(stop()))).items()}
            if result.pop("stop") > 0:  # Summed over every worker: each stops at this batch.
                raise Interrupted()
            totals = result if totals is None else {k: totals[k] + v for k, v in result.items()}
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        if isinstance(e, tf.errors.InvalidArgumentError) and "JPEG" not in e.message:
            raise
        raise checks.data_error(files, split, e, "during the evaluation", image_size=image_size) from None
    seen = int(totals["per_class"][0].sum())
    if seen != int(np.sum(sizes)):  # A short shard is padded like the last batch, or one replica's input ended.
        raise checks.data_error(files, split, None, f"after {seen} of {int(np.sum(sizes))} images")
    return summarize(totals, labels, crops)


def summarize(totals, labels, crops):
    images, top1, top5 = totals["per_class"]
    count = int(images.sum())
    per_class = {
        wnid: {
            "name": name,
            "images": int(images[i]),
            "top1_error": float(top1[i] / images[i]) if images[i] else None,
            "top5_error": float(top5[i] / images[i]) if images[i] else None,
        }
        for i, (wnid, name) in enumerate(labels)
    }
    confusion = totals["confusion"].copy()
    np.fill_diagonal(confusion, 0)
    pairs = np.argsort(confusion, axis=None)[::-1][:MOST_CONFUSED]
    most_confused = [
        {"true": labels[t][0], "predicted": labels[p][0], "count": int(confusion[t, p])}
        for t, p in zip(*np.unravel_index(pairs, confusion.shape), strict=True)
        if confusion[t, p] > 0
    ]
    return {
        "top1_error": float(top1.sum() / count),
        "top5_error": float(top5.sum() / count),
        "loss": float(totals["loss"] / count),
        "images": count,
        "crops": crops,
        "per_class": per_class,
        "most_confused": most_confused,
    }
