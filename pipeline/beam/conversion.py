"""The conversion job's settings as one object, as training has recipe.Config: build_tfrecords' flags default
from it, and the job's transforms take it whole."""

import dataclasses

from pipeline.beam import images, progress

TAR_READS = ("auto", "in_order", "at_offsets")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the output depends on, and how the job reads and reports. The defaults are the paper's 256x256
    images (§2) in ImageNet-sized shards (~1,250 training images each)."""

    input_dir: str = ""
    output_dir: str = ""
    train_shards: int = 1024
    validation_shards: int = 128
    seed: int = 0  # Of the hash that assigns images to shards and orders them there.
    jpeg_quality: int = images.JPEG_QUALITY
    min_side: int = images.MIN_SIDE
    max_pixels: int = images.MAX_PIXELS
    # in_order: tars read front to back, converted as they come (object stores); at_offsets: listed, then each
    # image read by its shard's writer (local disks); auto: in order from an object store, else at offsets.
    tar_reads: str = "auto"
    progress_seconds: float = progress.PROGRESS_SECONDS
    # Read by the launcher and sent to the workers as data (they may not see the files it sees): the wnid of each
    # image of a flat val/ folder, in image-number order, and the classes' names.
    val_labels: dict | None = None  # {image number: wnid}
    class_names: dict = dataclasses.field(default_factory=dict)

    @property
    def num_shards(self):
        return {"train": self.train_shards, "validation": self.validation_shards}

    @property
    def convert_kwargs(self):
        """What images.convert_or_reject takes."""
        return dict(quality=self.jpeg_quality, min_side=self.min_side, max_pixels=self.max_pixels)
