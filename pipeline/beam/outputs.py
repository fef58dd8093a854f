"""The output folder: shards written to a staging folder of the run's own, then moved into place by one final
step, after the previous output is gone; the small files last, summary.json (the mark of a whole output) at the
very end. Every step may run again after a failure anywhere (runners retry bundles): a shard rewrites the same
bytes, and the final step moves what is still staged and keeps what an earlier attempt already moved."""

import io
import json
import os
import pathlib
import shutil
import tempfile
import uuid

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipeline import example_spec
from pipeline.beam import sources

SPLITS = ("train", "validation")
SHARD_GLOBS = ("train-*-of-*", "validation-*-of-*")
SUMMARY = "summary.json"
TFDS_NAME = "imagenet_alexnet"  # What tensorflow-datasets calls the converted folder.
TFDS_TEMPLATE = "{SPLIT}-{SHARD_X_OF_Y}"  # shard_name's pattern in TFDS's words.


def shard_name(split, index, num_shards):
    return f"{split}-{index:05d}-of-{num_shards:05d}"


def shard_names(num_shards):
    return [shard_name(split, i, n) for split, n in num_shards.items() for i in range(n)]


def new_staging_dir(output_dir):
    return FileSystems.join(output_dir, f".staging-{uuid.uuid4().hex}")


def write_bytes(path, data):
    """Writes path whole or not at all: to a temporary name, then renamed (a kill mid-write on a local disk would
    leave half a file where the next reader looks). Again, with the same bytes, when a step runs twice."""
    with FileSystems.create(path + ".tmp") as f:
        f.write(data)
    FileSystems.rename([path + ".tmp"], [path])


def copy_local_to(local_path, destination):
    with open(local_path, "rb") as src, FileSystems.create(destination) as dst:
        shutil.copyfileobj(src, dst, 16 << 20)


def replace_output(output_dir, staging_dir, num_shards, written):
    """Moves the staged shards into output_dir in place of the previous output's files; the shards no image
    hashed to (not in `written`) are written empty, so -of-N holds. Idempotent: a written shard no longer staged
    was moved by an earlier attempt of this step (staged files are only ever removed by moving)."""
    _delete([FileSystems.join(output_dir, SUMMARY)])  # From now on the folder is marked incomplete.
    names = set(shard_names(num_shards))
    old = [p for g in SHARD_GLOBS for p in sources.match(FileSystems.join(output_dir, g))]
    _delete([p for p in old if p.rsplit("/", 1)[-1] not in names])  # Another run's shard counts.
    for name in sorted(names):
        staged, final = FileSystems.join(staging_dir, name), FileSystems.join(output_dir, name)
        if name not in written:
            write_bytes(final, b"")
        elif FileSystems.exists(staged):
            _delete([final])
            FileSystems.rename([staged], [final])
        elif not FileSystems.exists(final):
            raise FileNotFoundError(f"{name} is neither staged in {staging_dir} nor in {output_dir}")
    if FileSystems.exists(staging_dir):
        FileSystems.delete([staging_dir])


def split_bytes(output_dir, split):
    """The bytes of a split's shards in output_dir."""
    pattern = FileSystems.join(output_dir, f"{split}-*-of-*")
    return sum(m.size_in_bytes for m in FileSystems.match([pattern])[0].metadata_list)


def _delete(paths):
    present = [p for p in paths if FileSystems.exists(p)]
    if present:
        FileSystems.delete(present)


def stats_files(pixel_stats):
    """(stats.npz bytes, stats.json text) for the combiner's output."""
    buffer = io.BytesIO()
    np.savez(buffer, **pixel_stats)
    small = {k: v.tolist() for k, v in pixel_stats.items() if k != "mean_image"}
    small["mean_image_channel_means"] = pixel_stats["mean_image"].mean(axis=(0, 1)).tolist()
    return buffer.getvalue(), json.dumps(small, indent=2)


def labels_file(wnids, class_names):
    """labels.txt: line i is label i's wnid, then a tab and its name where the source named it."""
    return "".join(f"{w}\t{class_names[w]}\n" if w in class_names else f"{w}\n" for w in wnids)


def rejected_file(rejected):
    lines = "".join(f"{s}\t{p}\t{r}\n" for s, p, r in sorted(rejected))
    return "split\tpath\treason\n" + lines


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


def tfds_files(wnids, class_names, summary):
    """{name: bytes} of the metadata tensorflow-datasets reads a folder of records by (dataset_info.json,
    features.json, ...), split sizes from the shard sizes. TFDS writes them to a local folder, from which they are
    copied through Beam's file systems like every other output (TFDS's own gs:// client is not Beam's)."""
    import tensorflow_datasets as tfds

    with tempfile.TemporaryDirectory() as folder:
        template = tfds.core.ShardedFileTemplate(
            data_dir=tfds.core.Path(folder),
            template=TFDS_TEMPLATE,
            dataset_name=TFDS_NAME,
            filetype_suffix="tfrecord",
        )
        shards = shard_names({split: summary[split]["shards"] for split in SPLITS})
        for name in shards:  # TFDS looks for the shards' names; empty stand-ins are enough.
            open(os.path.join(folder, name), "wb").close()
        splits = [
            tfds.core.SplitInfo(
                name=split,
                shard_lengths=summary[split]["shard_sizes"],
                num_bytes=summary[split]["bytes"],
                filename_template=template,
            )
            for split in SPLITS
        ]
        tfds.folder_dataset.write_metadata(
            data_dir=folder,
            features=example_spec.tfds_features(wnids),
            split_infos=splits,
            filename_template=template,
            check_data=False,  # The stand-ins hold no records; tests read the real folder back.
            description="ILSVRC-2012 as 256x256 JPEGs (§2), converted by pipeline.build_tfrecords.",
            metadata=tfds.core.MetadataDict(class_names={w: class_names.get(w, "") for w in wnids}),
        )
        return {name: pathlib.Path(folder, name).read_bytes() for name in sorted(set(os.listdir(folder)) - set(shards))}


def write_small_files(output_dir, *, summary, pixel_stats, labels, rejected, tfds_metadata):
    npz, small = stats_files(pixel_stats)
    write_bytes(FileSystems.join(output_dir, "stats.npz"), npz)
    write_bytes(FileSystems.join(output_dir, "stats.json"), small.encode())
    write_bytes(FileSystems.join(output_dir, "labels.txt"), labels.encode())
    write_bytes(FileSystems.join(output_dir, "rejected.tsv"), rejected_file(rejected).encode())
    for name, data in tfds_metadata.items():
        write_bytes(FileSystems.join(output_dir, name), data)
    write_bytes(FileSystems.join(output_dir, SUMMARY), json.dumps(summary, indent=2).encode())  # Last.
