r"""Writes the embedded demo dataset (pipeline/demo_data.py) in raw ImageNet's layout.

python -m pipeline.make_demo_data --output_dir=demo/raw [--train_per_class=300] [--val_per_class=50] [--seed=0]
                                 [--as_tars]

--as_tars writes ImageNet's downloaded form instead (ILSVRC2012_img_train.tar of per-class tars,
ILSVRC2012_img_val.tar, validation_labels.txt), which pipeline.build_tfrecords reads without extracting.
"""

import tempfile

from absl import app, flags

from pipeline import demo_data

_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write the raw dataset.", required=True)
_TRAIN_PER_CLASS = flags.DEFINE_integer("train_per_class", 300, "Training images per class.", lower_bound=1)
_VAL_PER_CLASS = flags.DEFINE_integer("val_per_class", 50, "Validation images per class.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed: the same seed gives the same files.")
_AS_TARS = flags.DEFINE_bool("as_tars", False, "Write the tars ImageNet is downloaded as, not extracted folders.")


def main(argv):
    del argv
    sizes = dict(train_per_class=_TRAIN_PER_CLASS.value, val_per_class=_VAL_PER_CLASS.value, seed=_SEED.value)
    if _AS_TARS.value:
        with tempfile.TemporaryDirectory() as extracted:
            counts = demo_data.write_demo_dataset(extracted, **sizes)
            demo_data.write_as_tars(extracted, _OUTPUT_DIR.value)
    else:
        counts = demo_data.write_demo_dataset(_OUTPUT_DIR.value, **sizes)
    print(f"Demo dataset in {_OUTPUT_DIR.value}: {counts}")


if __name__ == "__main__":
    app.run(main)
