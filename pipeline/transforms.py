"""The conversion job's composite transforms: list, convert, shard, and finalize the output folder.

Determinism: each file's place is a seeded hash of its path relative to the input folder, so the shard it lands in
and its position there depend only on the input and the seed, never on worker timing. Outputs are staged and moved
into place by one final step, which first removes the previous run's files, so shards are never a mix of two runs.
"""

import hashlib
import io
import json
import logging
import os
import tempfile
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


def shard_name(split, index, num_shards):
    return f"{split}-{index:05d}-of-{num_shards:05d}"


def sort_key(relative_path, seed):
    """A seeded 64-bit hash: the training list's shuffle (and shard assignment) in a form every worker agrees on."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{relative_path}".encode()).digest()[:8], "big")


class ListImages(beam.PTransform):
    """Paths of every file of a split, with the wnid they are labelled by (None if none can be found)."""

    def __init__(self, split, input_dir, val_labels_file=None):
        super().__init__()
        self.split, self.input_dir, self.val_labels_file = split, input_dir, val_labels_file

    def expand(self, pbegin):
        folder = "train" if self.split == "train" else "val"
        patterns = [FileSystems.join(self.input_dir, folder, "*", "*"), FileSystems.join(self.input_dir, folder, "*")]
        return (
            pbegin
            | "Patterns" >> beam.Create(patterns)
            | "Match" >> fileio.MatchAll(empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW)
            | "Label" >> beam.ParDo(_LabelFn(folder, self.val_labels_file))
            | "Spread" >> beam.Reshuffle()
        )


class _LabelFn(beam.DoFn):
    def __init__(self, folder, val_labels_file):
        self.folder, self.val_labels_file = folder, val_labels_file

    def setup(self):
        self.val_labels = sources.read_val_labels(self.val_labels_file) if self.val_labels_file else None

    def process(self, metadata):
        path = metadata.path
        if sources.wnid_of(path) != self.folder:
            yield path, sources.wnid_of(path)
        elif self.folder == "val":
            yield path, sources.val_wnid(path, self.val_labels)
        else:
            yield path, None


class _ConvertFn(beam.DoFn):
    """Reads and converts one image; main output (shard, (key, example)), plus 'rejected' and 'pixels'."""

    def __init__(self, split, input_dir, num_shards, seed, convert_kwargs):
        self.split, self.input_dir, self.num_shards, self.seed = split, input_dir, num_shards, seed
        self.convert_kwargs = convert_kwargs

    def setup(self):
        self.done, self.rejected, self.start, self.last_log = 0, 0, time.time(), time.time()

    def process(self, element, wnids):
        path, wnid = element
        try:
            if wnid is None or wnid not in wnids:
                raise images.Rejected(_unlabelled_reason(self.split, wnid))
            with FileSystems.open(path) as f:
                data = f.read()
            jpeg, pixels = images.convert(data, **self.convert_kwargs)
        except (images.Rejected, OSError) as e:
            self._count(rejected=True)
            beam.metrics.Metrics.counter(self.split, "rejected").inc()
            yield beam.pvalue.TaggedOutput("rejected", (self.split, path, str(e)))
            return
        self._count(rejected=False)
        beam.metrics.Metrics.counter(self.split, "written").inc()
        if self.split == "train":
            yield beam.pvalue.TaggedOutput("pixels", pixels)
        relative = os.path.relpath(path, self.input_dir) if "://" not in path else path[len(self.input_dir) :]
        key = sort_key(relative, self.seed)
        example = example_spec.make_example(
            jpeg=jpeg,
            height=pixels.shape[0],
            width=pixels.shape[1],
            label=wnids.index(wnid),
            synset=wnid,
            filename=os.path.basename(path),
        )
        yield key % self.num_shards, (key, example)

    def _count(self, rejected):
        self.done += 1
        self.rejected += rejected
        now = time.time()
        if now - self.last_log >= PROGRESS_SECONDS:
            self.last_log = now
            rate = self.done / (now - self.start)
            logging.warning(
                "%s: %d images on worker %d (%d rejected), %.1f images/s",
                self.split,
                self.done,
                os.getpid(),
                self.rejected,
                rate,
            )


def _unlabelled_reason(split, wnid):
    if wnid is None and split == "train":
        return "not inside a class folder train/<wnid>/"
    if wnid is None:
        return "no label: not in a class folder val/<wnid>/ and not numbered in the validation labels file"
    return f"class {wnid} has no training folder train/{wnid}/"


class ConvertImages(beam.PTransform):
    """(path, wnid) -> tagged outputs: records keyed by shard, 'rejected' (split, path, reason), 'pixels' (train)."""

    def __init__(self, split, *, input_dir, wnids, num_shards, seed, convert_kwargs):
        super().__init__()
        self.fn = _ConvertFn(split, input_dir, num_shards, seed, convert_kwargs)
        self.wnids = wnids

    def expand(self, files):
        return files | beam.ParDo(self.fn, wnids=beam.pvalue.AsSingleton(self.wnids)).with_outputs(
            "rejected", "pixels", main="records"
        )


class _WriteShardFn(beam.DoFn):
    def __init__(self, split, staging_dir, num_shards):
        self.split, self.staging_dir, self.num_shards = split, staging_dir, num_shards

    def process(self, element):
        shard, records = element
        records = sorted(records)
        name = shard_name(self.split, shard, self.num_shards)
        with tempfile.NamedTemporaryFile(suffix=".tfrecord") as tmp:
            with tf.io.TFRecordWriter(tmp.name) as writer:
                for _, example in records:
                    writer.write(example)
            _copy_local_to(tmp.name, FileSystems.join(self.staging_dir, name))
        yield self.split, name, len(records)


def _copy_local_to(local_path, destination):
    with open(local_path, "rb") as src, FileSystems.create(destination) as dst:
        while chunk := src.read(16 << 20):
            dst.write(chunk)


class WriteShards(beam.PTransform):
    """Groups records by shard and writes each shard, ordered by key, into the staging folder."""

    def __init__(self, split, staging_dir, num_shards):
        super().__init__()
        self.fn = _WriteShardFn(split, staging_dir, num_shards)

    def expand(self, records):
        return records | "GroupByShard" >> beam.GroupByKey() | "Write" >> beam.ParDo(self.fn)


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
    summary = {}
    for split in SPLITS:
        written = sum(count for s, _, count in shards if s == split)
        rejects = sum(1 for s, _, _ in rejected if s == split)
        summary[split] = {
            "seen": seen.get(split, 0),
            "written": written,
            "rejected": rejects,
            "shards": num_shards[split],
        }
        if summary[split]["seen"] != written + rejects:
            raise RuntimeError(f"{split}: {seen.get(split, 0)} files seen but {written} written + {rejects} rejected")
    return summary


class _FinalizeFn(beam.DoFn):
    def __init__(self, output_dir, staging_dir, num_shards):
        self.output_dir, self.staging_dir, self.num_shards = output_dir, staging_dir, num_shards

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
        _write_bytes(FileSystems.join(self.output_dir, "labels.txt"), "".join(f"{w}\n" for w in wnids).encode())
        lines = "".join(f"{s}\t{p}\t{r}\n" for s, p, r in sorted(rejected))
        _write_bytes(FileSystems.join(self.output_dir, REJECTED), ("split\tpath\treason\n" + lines).encode())
        _write_bytes(FileSystems.join(self.output_dir, "summary.json"), json.dumps(summary, indent=2).encode())
        yield summary


class Finalize(beam.PTransform):
    """Once every shard is staged: replace the previous output with this run's, and write the small files."""

    def __init__(self, output_dir, staging_dir, num_shards, *, shards, seen, rejected, wnids, pixel_stats):
        super().__init__()
        self.fn = _FinalizeFn(output_dir, staging_dir, num_shards)
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

    def __init__(self, *, input_dir, output_dir, num_shards, seed, val_labels_file, convert_kwargs):
        super().__init__()
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
        seen, shards, rejected, pixels = [], [], [], None
        for split in SPLITS:
            name = split.title()
            count = files[split] | f"Count{name}" >> beam.combiners.Count.Globally()
            seen.append(count | f"Key{name}" >> beam.Map(lambda n, split=split: (split, n)))
            converted = files[split] | f"Convert{name}" >> ConvertImages(
                split,
                input_dir=self.input_dir,
                wnids=wnids,
                num_shards=self.num_shards[split],
                seed=self.seed,
                convert_kwargs=self.convert_kwargs,
            )
            shards.append(converted.records | f"Write{name}" >> WriteShards(split, staging_dir, self.num_shards[split]))
            rejected.append(converted.rejected)
            pixels = converted.pixels if split == "train" else pixels
        pixel_stats = pixels | "PixelStats" >> beam.CombineGlobally(stats.PixelStatsFn()).without_defaults()
        return p | "Finalize" >> Finalize(
            self.output_dir,
            staging_dir,
            self.num_shards,
            shards=shards | "AllShards" >> beam.Flatten(),
            seen=seen | "AllSeen" >> beam.Flatten(),
            rejected=rejected | "AllRejected" >> beam.Flatten(),
            wnids=wnids,
            pixel_stats=pixel_stats,
        )
