r"""Writes the embedded demo dataset (pipeline/demo_data.py) in raw ImageNet's layout.

python -m pipeline.make_demo_data --output_dir=demo/raw [--train_per_class=300] [--val_per_class=50] [--seed=0]
"""

from absl import app, flags

from pipeline import demo_data

_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write the raw dataset.", required=True)
_TRAIN_PER_CLASS = flags.DEFINE_integer("train_per_class", 300, "Training images per class.", lower_bound=1)
_VAL_PER_CLASS = flags.DEFINE_integer("val_per_class", 50, "Validation images per class.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed: the same seed gives the same files.")


def main(argv):
    del argv
    counts = demo_data.write_demo_dataset(
        _OUTPUT_DIR.value, train_per_class=_TRAIN_PER_CLASS.value, val_per_class=_VAL_PER_CLASS.value, seed=_SEED.value
    )
    print(f"Demo dataset in {_OUTPUT_DIR.value}: {counts}")


if __name__ == "__main__":
    app.run(main)
