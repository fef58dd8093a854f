"""The conversion job's composite transforms: list, assign to shards, convert and write, finalize the output folder.

Determinism: each image's place is a seeded hash of its path in the extracted layout, so the shard it lands in
and its position there depend only on the input and the seed, never on worker timing or on tar vs folder input.
Only these small (key, name) pairs are shuffled; each shard's images are then read, converted and written by one
worker, one image at a time, so neither the encoded images nor their pixels ever cross a shuffle and a worker's
memory does not grow with the dataset. Outputs are staged and moved
into place by one final step, which first removes the previous run's files, so shards are never a mix of two runs.
"""

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
import threading
import time
import uuid

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from pipeline import example_spec, images, sources, stats

SPLITS = ("train", "validation")
OUTPUT_GLOBS = ("summary.json", "train-*-of-*", "validation-*-of-*", "stats.npz", "stats.json", "labels.txt")
REJECTED = "rejected.tsv"
PROGRESS_SECONDS = 10
SPAN = "conversion_span"
CPU = "conversion_cpu"


def shard_name(split, index, num_shards):
    return f"{split}-{index:05d}-of-{num_shards:05d}"


def sort_key(relative_path, seed):
    """A seeded 64-bit hash: the training list's shuffle (and shard assignment) in a form every worker agrees on."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{relative_path}".encode()).digest()[:8], "big")


class ListImages(beam.PTransform):
    """(ImageRef, wnid or None) for every file of a split, from the extracted folder or the downloaded tar."""

    def __init__(self, split, input_dir, val_labels_file=None):
        super().__init__()
        self.split, self.input_dir, self.val_labels_file = split, input_dir, val_labels_file

    def expand(self, pbegin):
        folder = "train" if self.split == "train" else "val"
        kind, tar = sources.layout(self.input_dir, folder)
        label = _LabelFn(self.val_labels_file)
        if kind == "tar" and folder == "train":  # A tar of class tars: list the class tars in parallel.
            refs = (
                pbegin
                | "Tar" >> beam.Create([tar])
                | "ClassTars" >> beam.FlatMap(_tar_refs, "train")
                | "SpreadClassTars" >> beam.Reshuffle()
                | "Members" >> beam.FlatMap(_class_tar_refs)
            )
        elif kind == "tar":
            refs = pbegin | "Tar" >> beam.Create([tar]) | "Members" >> beam.FlatMap(_tar_refs, "val")
        else:  # A folder, or nothing (an empty split).
            patterns = sources.folder_patterns(self.input_dir, folder) if kind else []
            refs = (
                pbegin
                | "Patterns" >> beam.Create(patterns)
                | "Match" >> fileio.MatchAll(empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW)
                | "Refs"
                >> beam.Map(lambda m, root: sources.ImageRef(sources.relative_to(m.path, root), m.path), self.input_dir)
            )
        return refs | "Label" >> beam.ParDo(label)


def _tar_refs(tar, folder):
    with sources.open_file(tar) as f, _naming(tar):
        for name, offset, size in sources.tar_members(f):
            yield sources.ImageRef(f"{folder}/{name}", tar, offset, size)


@contextlib.contextmanager
def _naming(what):
    """A tar that cannot be listed stops the job (its images cannot be listed as rejected): say which one."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{what}: {e}; download it again, or extract it and point --input_dir at the folders") from e


def _class_tar_refs(class_tar):
    """The images of one <wnid>.tar inside the training tar, as train/<wnid>/<file>."""
    wnid, ext = os.path.splitext(os.path.basename(class_tar.relative))
    if ext != ".tar":  # Not a class tar: passed on, and rejected as not inside a class.
        yield class_tar
        return
    with sources.open_file(class_tar.source) as f, _naming(class_tar.describe()):
        for name, offset, size in sources.tar_members(f, class_tar.offset, class_tar.size):
            yield sources.ImageRef(f"train/{wnid}/{os.path.basename(name)}", class_tar.source, offset, size)


class _LabelFn(beam.DoFn):
    def __init__(self, val_labels_file):
        self.val_labels_file = val_labels_file

    def setup(self):
        self.val_labels = sources.read_val_labels(self.val_labels_file) if self.val_labels_file else None

    def process(self, ref):
        yield ref, sources.label_of(ref.relative, self.val_labels)


class _ConvertShardFn(beam.DoFn):
    """Converts and writes one shard: (shard, [(key, (ref, wnid))]) -> (split, shard name, images written), plus
    tagged outputs 'rejected' (split, where, reason) and, for training shards, 'stats' (a PixelStatsFn accumulator).

    Images are read, converted and written one at a time in key order, so a worker holds one image and the shard's
    list of names, whatever the shard's size; the encoded images never go through a shuffle."""

    def __init__(self, split, staging_dir, num_shards, convert_kwargs):
        self.split, self.staging_dir, self.num_shards = split, staging_dir, num_shards
        self.convert_kwargs = convert_kwargs

    def setup(self):
        self.done, self.rejected, self.start, self.last_log = 0, 0, time.time(), time.time()
        self.opened = {}
        self.stats_fn = stats.PixelStatsFn()
        self.counters = {r: beam.metrics.Metrics.counter(self.split, "rejected" if r else "written") for r in (0, 1)}

    def teardown(self):
        for f in self.opened.values():
            f.close()

    def process(self, element, wnids):
        started, cpu_started = time.time(), time.thread_time()
        shard, items = element
        name = shard_name(self.split, shard, self.num_shards)
        accumulator, written = None, 0
        labels = {wnid: label for label, wnid in enumerate(wnids)}
        with tempfile.NamedTemporaryFile(suffix=".tfrecord") as tmp:
            with tf.io.TFRecordWriter(tmp.name) as writer:
                for _, (ref, wnid) in sorted(items):
                    try:
                        example, pixels = self._convert(ref, wnid, labels)
                    except (images.Rejected, OSError) as e:
                        self._count(rejected=True)
                        yield beam.pvalue.TaggedOutput("rejected", (self.split, ref.describe(), str(e)))
                        continue
                    writer.write(example)
                    written += 1
                    self._count(rejected=False)
                    if self.split == "train":
                        accumulator = self.stats_fn.add_input(accumulator, pixels)
            _copy_local_to(tmp.name, FileSystems.join(self.staging_dir, name))
        if accumulator is not None:
            yield beam.pvalue.TaggedOutput("stats", accumulator)
        # The conversion's span, from the first shard started to the last written, read by `conversion_span`.
        beam.metrics.Metrics.distribution(SPAN, f"{self.split}_start_ms").update(int(started * 1000))
        beam.metrics.Metrics.distribution(SPAN, f"{self.split}_end_ms").update(int(time.time() * 1000))
        # CPU time of this thread on the shard: the conversion's cost whatever else shares the cores.
        beam.metrics.Metrics.counter(CPU, "ms").inc(int((time.thread_time() - cpu_started) * 1000))
        yield self.split, name, written

    def _convert(self, ref, wnid, labels):
        if wnid is None or wnid not in labels:
            raise images.Rejected(_unlabelled_reason(self.split, wnid))
        jpeg, pixels = images.convert(sources.read_image(ref, self.opened), **self.convert_kwargs)
        example = example_spec.make_example(
            jpeg=jpeg,
            height=pixels.shape[0],
            width=pixels.shape[1],
            label=labels[wnid],
            synset=wnid,
            filename=os.path.basename(ref.relative),
        )
        return example, pixels

    def _count(self, rejected):
        self.done += 1
        self.rejected += rejected
        self.counters[rejected].inc()
        now = time.time()
        if now - self.last_log >= PROGRESS_SECONDS:
            self.last_log = now
            rate = self.done / (now - self.start)
            logging.warning(
                "%s: %d images on worker %d/%s (%d rejected), %.1f images/s",
                self.split,
                self.done,
                os.getpid(),
                threading.current_thread().name,
                self.rejected,
                rate,
            )


def conversion_span(metrics):
    """Seconds spent converting, from a finished job's metrics: per split, from its first shard's start to its last
    shard's end; splits converted one after the other (DirectRunner) add up, overlapping ones (Dataflow) count once.
    None when no shard was converted."""
    bounds = {}
    for result in metrics.query(beam.metrics.MetricsFilter().with_namespace(SPAN))["distributions"]:
        value = result.committed or result.attempted
        split, edge = result.key.metric.name.rsplit("_", 2)[0], result.key.metric.name.split("_")[-2]
        bounds.setdefault(split, {})[edge] = value.min if edge == "start" else value.max
    intervals = sorted((b["start"], b["end"]) for b in bounds.values() if len(b) == 2)
    if not intervals:
        return None
    total, (start, end) = 0, intervals[0]
    for next_start, next_end in intervals[1:]:
        if next_start > end:
            total, start = total + end - start, next_start
        end = max(end, next_end)
    return (total + end - start) / 1000


def conversion_cpu_seconds(metrics):
    """CPU seconds the shard writers spent, summed over workers, from a finished job's metrics (None if none)."""
    results = metrics.query(beam.metrics.MetricsFilter().with_namespace(CPU))["counters"]
    return sum((r.committed or r.attempted) for r in results) / 1000 if results else None


def _unlabelled_reason(split, wnid):
    if wnid is None and split == "train":
        return "not inside a class folder train/<wnid>/ (or a class tar <wnid>.tar)"
    if wnid is None:
        return "no label: not in a class folder val/<wnid>/ and not numbered in the validation labels file"
    return f"class {wnid} has no training images (no train/{wnid}/)"


class ConvertShards(beam.PTransform):
    """(ImageRef, wnid) -> shards in staging_dir; outputs 'shards' (split, name, count), 'rejected', 'stats'.

    Each image's shard and its place there come from a seeded hash of its name in the extracted layout: only
    these small (key, ref) pairs are grouped, and each shard is then converted and written by one worker."""

    def __init__(self, split, *, staging_dir, wnids, num_shards, seed, convert_kwargs):
        super().__init__()
        self.split, self.num_shards, self.seed, self.wnids = split, num_shards, seed, wnids
        self.fn = _ConvertShardFn(split, staging_dir, num_shards, convert_kwargs)

    def expand(self, files):
        def keyed(element, seed, num_shards):
            key = sort_key(element[0].relative, seed)
            return key % num_shards, (key, element)

        return (
            files
            | "Key" >> beam.Map(keyed, self.seed, self.num_shards)
            | "GroupByShard" >> beam.GroupByKey()
            | "ConvertAndWrite"
            >> beam.ParDo(self.fn, wnids=beam.pvalue.AsSingleton(self.wnids)).with_outputs(
                "rejected", "stats", main="shards"
            )
        )


def _copy_local_to(local_path, destination):
    with open(local_path, "rb") as src, FileSystems.create(destination) as dst:
        while chunk := src.read(16 << 20):
            dst.write(chunk)


def _write_bytes(path, data):
    with FileSystems.create(path) as f:
        f.write(data)


def _delete_matching(folder, globs):
    for pattern in globs:
        paths = sources.match(FileSystems.join(folder, pattern))
        if paths:
            FileSystems.delete(paths)


def stats_files(pixel_stats):
    """(stats.npz bytes, stats.json text) for the combiner's output."""
    buffer = io.BytesIO()
    np.savez(buffer, **pixel_stats)
    small = {k: v.tolist() for k, v in pixel_stats.items() if k != "mean_image"}
    small["mean_image_channel_means"] = pixel_stats["mean_image"].mean(axis=(0, 1)).tolist()
    return buffer.getvalue(), json.dumps(small, indent=2)


def summarize(seen, shards, rejected, num_shards):
    """summary.json's content; raises if any image is unaccounted for."""
    summary = {"image_size": example_spec.IMAGE_SIZE}
    for split in SPLITS:
        written = sum(count for s, _, count in shards if s == split)
        rejects = sum(1 for s, _, _ in rejected if s == split)
        sizes = {name: count for s, name, count in shards if s == split}
        summary[split] = {
            "seen": seen.get(split, 0),
            "written": written,
            "rejected": rejects,
            "shards": num_shards[split],
            # Images per shard, in shard order: the reader plans each epoch (and a resumed one) from these.
            "shard_sizes": [sizes.get(shard_name(split, i, num_shards[split]), 0) for i in range(num_shards[split])],
        }
        if summary[split]["seen"] != written + rejects:
            raise RuntimeError(f"{split}: {seen.get(split, 0)} files seen but {written} written + {rejects} rejected")
    return summary


def labels_file(wnids, class_names):
    """labels.txt: line i is label i's wnid, then a tab and its name where the source named it."""
    return "".join(f"{w}\t{class_names[w]}\n" if w in class_names else f"{w}\n" for w in wnids)


class _FinalizeFn(beam.DoFn):
    def __init__(self, output_dir, staging_dir, num_shards, class_names):
        self.output_dir, self.staging_dir, self.num_shards = output_dir, staging_dir, num_shards
        self.class_names = class_names

    def process(self, unused, shards, seen, rejected, wnids, pixel_stats):
        if not wnids:
            raise ValueError(f"no class folders with images under {self.output_dir!r}'s input train/<wnid>/")
        summary = summarize(dict(seen), shards, rejected, self.num_shards)
        summary["classes"] = len(wnids)
        # Old outputs go first (summary.json, the completion marker, before anything), then the new ones move in.
        _delete_matching(self.output_dir, OUTPUT_GLOBS + (REJECTED,))
        written = {name for _, name, _ in shards}
        for split, n in self.num_shards.items():
            for name in (shard_name(split, i, n) for i in range(n)):
                staged = FileSystems.join(self.staging_dir, name)
                if name not in written:  # A shard no image hashed to: still written, empty, so -of-N holds.
                    _write_bytes(staged, b"")
                FileSystems.rename([staged], [FileSystems.join(self.output_dir, name)])
        FileSystems.delete([self.staging_dir])
        npz, small = stats_files(pixel_stats)
        _write_bytes(FileSystems.join(self.output_dir, "stats.npz"), npz)
        _write_bytes(FileSystems.join(self.output_dir, "stats.json"), small.encode())
        _write_bytes(FileSystems.join(self.output_dir, "labels.txt"), labels_file(wnids, self.class_names).encode())
        lines = "".join(f"{s}\t{p}\t{r}\n" for s, p, r in sorted(rejected))
        _write_bytes(FileSystems.join(self.output_dir, REJECTED), ("split\tpath\treason\n" + lines).encode())
        _write_bytes(FileSystems.join(self.output_dir, "summary.json"), json.dumps(summary, indent=2).encode())
        yield summary


class Finalize(beam.PTransform):
    """Once every shard is staged: replace the previous output with this run's, and write the small files."""

    def __init__(self, output_dir, staging_dir, num_shards, class_names, *, shards, seen, rejected, wnids, pixel_stats):
        super().__init__()
        self.fn = _FinalizeFn(output_dir, staging_dir, num_shards, class_names)
        self.inputs = dict(shards=shards, seen=seen, rejected=rejected, wnids=wnids, pixel_stats=pixel_stats)

    def expand(self, pbegin):
        i = self.inputs
        return (
            pbegin
            | beam.Create([None])
            | beam.ParDo(
                self.fn,
                shards=beam.pvalue.AsList(i["shards"]),
                seen=beam.pvalue.AsList(i["seen"]),
                rejected=beam.pvalue.AsList(i["rejected"]),
                wnids=beam.pvalue.AsSingleton(i["wnids"]),
                pixel_stats=beam.pvalue.AsSingleton(i["pixel_stats"]),
            )
        )


class ConvertImageNet(beam.PTransform):
    """The whole job: raw ImageNet layout in input_dir -> shards, statistics and summaries in output_dir."""

    def __init__(self, *, input_dir, output_dir, num_shards, seed, val_labels_file, convert_kwargs, class_names=None):
        super().__init__()
        self.class_names = class_names or {}
        self.input_dir, self.output_dir, self.num_shards, self.seed = input_dir, output_dir, num_shards, seed
        self.val_labels_file, self.convert_kwargs = val_labels_file, convert_kwargs

    def expand(self, p):
        staging_dir = FileSystems.join(self.output_dir, f".staging-{uuid.uuid4().hex}")
        files = {
            split: p | f"List{split.title()}" >> ListImages(split, self.input_dir, self.val_labels_file)
            for split in SPLITS
        }
        wnids = (
            files["train"]
            | "Wnids" >> beam.Values()
            | "KnownWnids" >> beam.Filter(bool)
            | "Distinct" >> beam.Distinct()
            | "Collect" >> beam.combiners.ToList()
            | "Sort" >> beam.Map(sorted)
        )
        seen, shards, rejected, partial_stats = [], [], [], None
        for split in SPLITS:
            name = split.title()
            count = files[split] | f"Count{name}" >> beam.combiners.Count.Globally()
            seen.append(count | f"Key{name}" >> beam.Map(lambda n, split=split: (split, n)))
            converted = files[split] | f"Convert{name}" >> ConvertShards(
                split,
                staging_dir=staging_dir,
                wnids=wnids,
                num_shards=self.num_shards[split],
                seed=self.seed,
                convert_kwargs=self.convert_kwargs,
            )
            shards.append(converted.shards)
            rejected.append(converted.rejected)
            partial_stats = converted.stats if split == "train" else partial_stats
        pixel_stats = partial_stats | "PixelStats" >> beam.CombineGlobally(stats.MergeStatsFn()).without_defaults()
        return p | "Finalize" >> Finalize(
            self.output_dir,
            staging_dir,
            self.num_shards,
            self.class_names,
            shards=shards | "AllShards" >> beam.Flatten(),
            seen=seen | "AllSeen" >> beam.Flatten(),
            rejected=rejected | "AllRejected" >> beam.Flatten(),
            wnids=wnids,
            pixel_stats=pixel_stats,
        )
