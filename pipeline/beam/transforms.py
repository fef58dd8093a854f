"""The conversion job's transforms, top-down: ConvertImageNet, then its parts, then the DoFns.

Reading: in extracted folders each image is a file of its own, read whole by the worker that writes its shard.
The downloaded tars on an object store are read front to back, once, each class tar (and the validation tar) by
one worker that converts its images as they come: object stores serve random reads badly (Beam's GCS reader
fetches 16 MiB at a time, so an image read at a random offset costs 16 MiB), and a tar's members are contiguous.
On a local or mounted disk random reads are cheap, so the tars are only listed and each image is read at its
offset by its shard's writer, as a folder's file is: the shuffle then carries references, not JPEGs (the
DirectRunner holds its shuffle in memory). Either way each input byte is read about once, and the same images
give the same records (docs/choices.md, "Conversion").

Determinism: each image's shard and its place there come from a seeded hash of its path in the extracted layout,
so the output depends only on the input and the seed, never on worker timing or on tar vs folder input.
Retries: a shard's writer writes the same bytes to the same staged name each time, the statistics are a Beam
combine, and the final step (pipeline/beam/outputs.py) can run again after failing anywhere.
"""

import contextlib
import hashlib
import os
import tempfile
import time
from typing import NamedTuple

import apache_beam as beam
import tensorflow as tf
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from pipeline import example_spec
from pipeline.beam import images, outputs, progress, sources, stats

READ_ATTEMPTS = 3  # Transient I/O errors are retried; then the bundle fails (and the runner retries it).


class Item(NamedTuple):
    """An image on its way to a shard: where it is, its wnid (None: unlabelled), and, when it was converted where
    it was read (tars), its JPEG or the reason it was rejected."""

    ref: sources.ImageRef
    wnid: str | None
    jpeg: bytes | None = None
    reason: str | None = None


class ConvertImageNet(beam.PTransform):
    """The whole job: raw ImageNet in config.input_dir -> shards, statistics and summaries in config.output_dir
    (config: a conversion.Config)."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def expand(self, p):
        staging_dir = outputs.new_staging_dir(self.config.output_dir)
        read = {split: p | f"Read{split.title()}" >> ReadImages(split, self.config) for split in outputs.SPLITS}
        wnids = read["train"] | "TrainingClasses" >> TrainingClasses()
        written = {
            split: read[split] | f"Write{split.title()}" >> WriteShards(split, staging_dir, wnids, self.config)
            for split in outputs.SPLITS
        }
        seen = [
            read[split]
            | f"Count{split.title()}" >> beam.combiners.Count.Globally()
            | f"Name{split.title()}Count" >> beam.Map(lambda n, split=split: (split, n))
            for split in outputs.SPLITS
        ]
        pixel_stats = (
            written["train"].stats | "PixelStats" >> beam.CombineGlobally(stats.MergeStatsFn()).without_defaults()
        )
        results = {
            "shards": [written[s].shards for s in outputs.SPLITS] | "AllShards" >> beam.Flatten(),
            "rejected": [written[s].rejected for s in outputs.SPLITS] | "AllRejected" >> beam.Flatten(),
            "seen": seen | "AllSeen" >> beam.Flatten(),
            "wnids": wnids,
            "pixel_stats": pixel_stats,
        }
        return results | "Finalize" >> Finalize(staging_dir, self.config)


class ReadImages(beam.PTransform):
    """Items for every file of a split, from the extracted folder or the downloaded tar, read as config.tar_reads
    says: converted as read front to back (in_order), or listed to be read later at their offsets (at_offsets)."""

    def __init__(self, split, config):
        super().__init__()
        self.split, self.config = split, config

    def expand(self, pbegin):
        folder = "train" if self.split == "train" else "val"
        kind, tar = sources.layout(self.config.input_dir, folder)
        if kind == "tar":
            if reads_in_order(self.config.tar_reads, tar):
                read = "ReadAndConvert" >> beam.ParDo(_ConvertTarFn(self.split, self.config))
            else:
                read = "List" >> beam.ParDo(_ListTarFn(self.split, self.config.val_labels))
            if folder == "val":
                return pbegin | "Tar" >> beam.Create([sources.ImageRef("val", tar, 0, -1)]) | read
            return (  # A tar of class tars: each class tar read by one worker.
                pbegin
                | "Tar" >> beam.Create([tar])
                | "ClassTars" >> beam.FlatMap(_class_tars)
                | "SpreadClassTars" >> beam.Reshuffle()
                | read
            )
        patterns = sources.folder_patterns(self.config.input_dir, folder) if kind else []  # Absent: an empty split.
        return (
            pbegin
            | "Patterns" >> beam.Create(patterns)
            | "Match" >> fileio.MatchAll(empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW)
            | "Items" >> beam.Map(_file_item, self.config.input_dir, self.config.val_labels)
        )


class TrainingClasses(beam.PTransform):
    """The sorted wnids of the training images: label i is the i-th (a single-element PCollection)."""

    def expand(self, items):
        return (
            items
            | "Wnids" >> beam.Map(lambda item: item.wnid)
            | "Known" >> beam.Filter(bool)
            | "Distinct" >> beam.Distinct()
            | "Collect" >> beam.combiners.ToList()
            | "Sort" >> beam.Map(sorted)
        )


class WriteShards(beam.PTransform):
    """Items -> shards in staging_dir; returns Written: shards (split, name, images), rejected (split, where,
    reason) and, for training, stats (a partial statistics accumulator per shard). Only the small (key, item) pairs of
    the folders, and the tars' converted JPEGs, go through the shuffle."""

    def __init__(self, split, staging_dir, wnids, config):
        super().__init__()
        self.split, self.wnids, self.config = split, wnids, config
        self.fn = _WriteShardFn(split, staging_dir, config)

    def expand(self, items):
        written = (
            items
            | "Key" >> beam.Map(keyed, self.config.seed, self.config.num_shards[self.split])
            | "GroupByShard" >> beam.GroupByKey()
            | "ConvertAndWrite" >> beam.ParDo(self.fn, wnids=beam.pvalue.AsSingleton(self.wnids))
        )
        # One output of (kind, value) pairs, split by kind: the DaskRunner merges a ParDo's tagged outputs.
        return Written(*(written | f"{kind.title()}" >> beam.FlatMap(_of_kind, kind) for kind in Written._fields))


class Written(NamedTuple):
    shards: beam.PCollection
    rejected: beam.PCollection
    stats: beam.PCollection


def _of_kind(output, kind):
    if output[0] == kind:
        yield output[1]


class Finalize(beam.PTransform):
    """Once every shard is staged: the previous output replaced by this run's, then the small files, summary.json
    last. Takes a dict of PCollections: shards, rejected, seen, wnids, pixel_stats."""

    def __init__(self, staging_dir, config):
        super().__init__()
        self.fn = _FinalizeFn(staging_dir, config)

    def expand(self, inputs):
        return (
            inputs["shards"].pipeline
            | "Once" >> beam.Create([None])
            | "ReplaceOutput"
            >> beam.ParDo(
                self.fn,
                shards=beam.pvalue.AsList(inputs["shards"]),
                seen=beam.pvalue.AsList(inputs["seen"]),
                rejected=beam.pvalue.AsList(inputs["rejected"]),
                wnids=beam.pvalue.AsSingleton(inputs["wnids"]),
                pixel_stats=beam.pvalue.AsSingleton(inputs["pixel_stats"]),
            )
        )


def sort_key(relative_path, seed):
    """A seeded 64-bit hash: the training list's shuffle (and shard assignment) in a form every worker agrees on."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{relative_path}".encode()).digest()[:8], "big")


def keyed(item, seed, num_shards):
    key = sort_key(item.ref.relative, seed)
    return key % num_shards, (key, item)


def _file_item(match, root, val_labels):
    ref = sources.ImageRef(sources.relative_to(match.path, root), match.path)
    return Item(ref, sources.label_of(ref.relative, val_labels))


def reads_in_order(tar_reads, tar):
    if tar_reads == "auto":
        return FileSystems.get_scheme(tar) not in (None, "file")  # gs://, s3://, ...: an object store.
    return tar_reads == "in_order"


def _class_tars(tar):
    """The class tars <wnid>.tar inside the training tar (reading only headers)."""
    with sources.open_file(tar, chunk=sources.HEADER_CHUNK) as f, _naming(tar):
        for name, offset, size in sources.tar_members(f):
            yield sources.ImageRef(f"train/{name}", tar, offset, size)


@contextlib.contextmanager
def _naming(what):
    """A tar that cannot be listed stops the job (its images cannot be listed as rejected): say which one."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{what}: {e}; download it again, or extract it and point --input_dir at the folders") from e


def read_with_retries(read, what):
    """read(), retried on I/O errors (object stores have transient ones); the last error names `what`."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return read()
        except OSError as e:
            if attempt + 1 == READ_ATTEMPTS:
                raise OSError(f"{what}: {e} ({READ_ATTEMPTS} attempts)") from e
            time.sleep(0.5 * 2**attempt)


def unlabelled_reason(split, wnid):
    if wnid is None and split == "train":
        return "not inside a class folder train/<wnid>/ (or a class tar <wnid>.tar)"
    if wnid is None:
        return "no label: not in a class folder val/<wnid>/ and not numbered in the validation labels file"
    return f"class {wnid} has no training images (no train/{wnid}/)"


class _ConvertTarFn(beam.DoFn):
    """Reads a tar front to back and converts its images as they come: ImageRef of a tar (the validation tar, or
    a class tar inside the training tar) -> an Item per regular file, named by its place in the extracted layout."""

    def __init__(self, split, config):
        self.split, self.val_labels, self.convert_kwargs = split, config.val_labels, config.convert_kwargs
        self.progress_seconds = config.progress_seconds

    def setup(self):
        self.progress = progress.Progress(self.split, self.progress_seconds)

    def process(self, tar):
        if self.split == "train" and not tar.relative.endswith(".tar"):  # Not a class tar: rejected as unlabelled.
            yield Item(tar, None)
            return
        start, size = _window(tar)
        chunk = sources.even_chunk(size if size is not None else sources.size_of(tar.source) - start)
        with self.progress.timed(), sources.open_file(tar.source, chunk) as f, _naming(tar.describe()):
            for name, offset, data in sources.tar_contents(f, start, size):
                ref = sources.ImageRef(_member_path(self.split, tar, name), tar.source, offset, len(data))
                jpeg, reason = images.convert_or_reject(data, **self.convert_kwargs)
                self.progress.count(rejected=reason is not None)
                yield Item(ref, sources.label_of(ref.relative, self.val_labels), jpeg, reason)


class _ListTarFn(beam.DoFn):
    """Lists a tar's images, reading only its headers: ImageRef of a tar -> an Item per regular file, at its
    offset, for its shard's writer to read and convert."""

    def __init__(self, split, val_labels):
        self.split, self.val_labels = split, val_labels

    def process(self, tar):
        if self.split == "train" and not tar.relative.endswith(".tar"):
            yield Item(tar, None)
            return
        with sources.open_file(tar.source, sources.HEADER_CHUNK) as f, _naming(tar.describe()):
            for name, offset, size in sources.tar_members(f, *_window(tar)):
                ref = sources.ImageRef(_member_path(self.split, tar, name), tar.source, offset, size)
                yield Item(ref, sources.label_of(ref.relative, self.val_labels))


def _window(tar):
    """(start, size) of a tar inside its file: a class tar inside the training tar, or a whole file."""
    return max(tar.offset, 0), tar.size if tar.size >= 0 else None


def _member_path(split, tar, name):
    """A tar member's path in the extracted layout: train/<wnid>/<file> (wnid from the class tar's name) or val/..."""
    if split == "train":
        return f"train/{os.path.splitext(os.path.basename(tar.relative))[0]}/{os.path.basename(name)}"
    return f"val/{name}"


class _WriteShardFn(beam.DoFn):
    """Writes one shard, its images in key order: (shard, [(key, Item)]) -> ('shards', (split, shard name,
    images written)), ('rejected', (split, where, reason)) per rejection and, for training shards, ('stats', the
    statistics of the images as stored: decoded from the JPEGs written, what the reader delivers). Images not
    converted yet (folders) are read and converted here, one at a time."""

    def __init__(self, split, staging_dir, config):
        self.split, self.staging_dir, self.num_shards = split, staging_dir, config.num_shards[split]
        self.convert_kwargs, self.progress_seconds = config.convert_kwargs, config.progress_seconds

    def setup(self):
        self.progress = progress.Progress(self.split, self.progress_seconds)
        self.stats_fn = stats.PixelStatsFn()

    def process(self, element, wnids):
        shard, items = element
        name = outputs.shard_name(self.split, shard, self.num_shards)
        labels = {wnid: label for label, wnid in enumerate(wnids)}
        accumulator, written = None, 0
        with self.progress.timed(), tempfile.NamedTemporaryFile(suffix=".tfrecord") as tmp:
            with tf.io.TFRecordWriter(tmp.name) as writer:
                for _, item in sorted(items, key=lambda pair: pair[0]):
                    jpeg, reason = self._convert(item, labels)
                    self.progress.count(rejected=reason is not None)
                    if reason is not None:
                        yield "rejected", (self.split, item.ref.describe(), reason)
                        continue
                    pixels = tf.io.decode_jpeg(jpeg, channels=3).numpy()  # As the reader decodes it.
                    writer.write(_example(jpeg, pixels, item, labels))
                    written += 1
                    if self.split == "train":
                        accumulator = self.stats_fn.add_input(accumulator, pixels)
            outputs.copy_local_to(tmp.name, FileSystems.join(self.staging_dir, name))
        if accumulator is not None:
            yield "stats", accumulator
        yield "shards", (self.split, name, written)

    def _convert(self, item, labels):
        if item.wnid is None or item.wnid not in labels:
            return None, item.reason or unlabelled_reason(self.split, item.wnid)
        if item.jpeg is not None or item.reason is not None:
            return item.jpeg, item.reason
        data = read_with_retries(lambda: sources.read_image(item.ref), item.ref.describe())
        return images.convert_or_reject(data, **self.convert_kwargs)


def _example(jpeg, pixels, item, labels):
    return example_spec.make_example(
        jpeg=jpeg,
        height=pixels.shape[0],
        width=pixels.shape[1],
        label=labels[item.wnid],
        synset=item.wnid,
        filename=os.path.basename(item.ref.relative),
    )


class _FinalizeFn(beam.DoFn):
    def __init__(self, staging_dir, config):
        self.output_dir, self.staging_dir, self.num_shards = config.output_dir, staging_dir, config.num_shards
        self.class_names = config.class_names

    def process(self, unused, shards, seen, rejected, wnids, pixel_stats):
        if not wnids:
            raise ValueError("no class folders train/<wnid>/ (or class tars) with images in the input")
        summary = outputs.summarize(dict(seen), shards, rejected, self.num_shards)
        summary["classes"] = len(wnids)
        outputs.replace_output(self.output_dir, self.staging_dir, self.num_shards, {name for _, name, _ in shards})
        for split in outputs.SPLITS:
            summary[split]["bytes"] = outputs.split_bytes(self.output_dir, split)
        outputs.write_small_files(
            self.output_dir,
            summary=summary,
            pixel_stats=pixel_stats,
            labels=outputs.labels_file(wnids, self.class_names),
            rejected=rejected,
            tfds_metadata=outputs.tfds_files(wnids, self.class_names, summary),
        )
        yield summary
