from setuptools import find_packages, setup

setup(
    name="depthjax",
    version="0.1.0",
    description="Depth as data: a JAX framework for studying and editing transformer depth",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    # kernels/ sits at the top level of the repository but installs as depthjax.kernels.
    packages=find_packages(include=["depthjax", "depthjax.*"]) + ["depthjax.kernels"],
    package_dir={"depthjax.kernels": "kernels"},
    install_requires=[
        "jax>=0.11.2,<0.13",
        "flax>=0.10",
        "numpy",
        "pyyaml",
        "safetensors",
        "optax",
        "orbax-checkpoint",
        "grain",
        "tensorflow-datasets",
        "array-record",
        "tokenizers",
        "matplotlib",
        "rich",  # progress bars (depthjax.progress)
        "chex",
        "tensorboardX",  # TensorBoard event files without TensorFlow
        "importlib_resources",  # imported by tensorflow-datasets builders, not declared by it
    ],
    extras_require={
        # tensorboard: its event reader checks our event files (it needs no TensorFlow).
        "test": [
            "pytest>=8",
            "pytest-xdist",
            "nbclient",
            "nbformat",
            "ipykernel",
            "tensorboard",
            "ruff>=0.17,<0.18",
        ],
    },
    entry_points={"console_scripts": ["depthjax=depthjax.cli:main"]},
)
