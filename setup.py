"""resflax: why deep nets are hard to train and why residual connections fix it."""

import setuptools

setuptools.setup(
    name="resflax",
    version="0.1.0",
    description=(
        "Plain, ResNet v1 and pre-activation v2 networks in Flax, with exact "
        "gradient-flow diagnostics and mean-field theory."
    ),
    packages=setuptools.find_packages(include=["resflax", "resflax.*"]),
    package_data={"resflax": ["onednn_conv.cc"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6.0",
        "flax>=0.10.4",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "tensorflow-datasets>=4.9.7",
        "grain>=0.2.8",
        "array-record>=0.7.1",
        "absl-py>=2.1.0",
        "ml-collections>=1.0.0",
        "matplotlib>=3.8",
        "scikit-learn>=1.4",
        "tensorboardX>=2.6.2",
        "numpy>=1.26",
    ],
    extras_require={
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "hypothesis>=6.100", "scipy>=1.11",
                 "filelock>=3.12"],
        # The PyTorch peer of benchmarks/train_step.py (`make bench`); never needed otherwise.
        "bench": ["torch>=2.4"],
        # oneDNN's convolutions on CPU (`resflax.onednn`; needs g++ at first use). Its libdnnl
        # runs on the SYCL CPU runtime; the wheel brings that runtime (about 2 GB).
        "onednn": ["onednn>=2026.1.0"],
        # Only for preparing datasets that tfds downloads and encodes with TensorFlow
        # (cifar10, imagenet2012, ...). Reading prepared data never needs it.
        # tfds 4.9.x needs importlib_resources to locate builder code, but declares it only for
        # Python < 3.9.
        "prepare": ["tensorflow-cpu>=2.16", "importlib_resources>=6.0"],
    },
)
