"""The AlexNet reference: Beam conversion (extra 'beam'), tf.data input, Keras model and training."""

import setuptools

setuptools.setup(
    name="alexnet-reference",
    version="0.1.0",
    description="Krizhevsky, Sutskever & Hinton (NIPS 2012) AlexNet on ImageNet with TensorFlow, Keras and Beam.",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=["pipeline", "pipeline.beam", "pipeline.reader", "model", "training", "tools"],
    py_modules=["train"],
    install_requires=[
        "tensorflow==2.21.*",
        "tensorboard==2.21.*",
        "keras>=3.10",
        "absl-py>=2.1",
        "numpy>=1.26",
        "pillow>=10",
        # The converter describes its output for tensorflow-datasets (on the job's workers too, which install only
        # these), and reads the ILSVRC-2012 validation labels TFDS ships; TFDS users load the shards with it.
        "tensorflow-datasets==4.9.10",
    ],
    extras_require={
        # Beam only for the conversion job and its workers: training never imports it. Beam's gcp extra reads and
        # writes gs:// and runs on Dataflow; build packages --setup_file for Dataflow's workers (Beam falls back
        # to `setup.py sdist` without it).
        "beam": ["apache-beam[gcp]==2.77.*", "build"],
        # GPU hosts: TensorFlow's CUDA libraries (cuDNN, cuBLAS, NCCL, ...) from PyPI, so that no system CUDA is
        # needed; without them TensorFlow sees no GPU (train.py then refuses --strategy=mirrored: README).
        "gpu": ["tensorflow[and-cuda]==2.21.*"],
        # dask: the slow test that runs the conversion on a dask.distributed cluster (Beam's DaskRunner);
        # gcp-storage-emulator: a GCS API on loopback for the gs:// tests.
        "test": ["pytest>=8", "hypothesis>=6", "ruff>=0.6", "dask[distributed]>=2024.4.2", "gcp-storage-emulator"],
    },
)
