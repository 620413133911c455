import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

# `lm_eval --model depthjax` needs depthjax registered before lm_eval looks the name up:
# this .pth file imports the tiny depthjax_lm_eval hook at start-up (see that module). It
# goes into site-packages with the package, in normal and in editable installs.
PTH = "depthjax-lm-eval.pth"


class BuildPy(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, str(Path(self.build_lib) / PTH))


class EditableWheel(editable_wheel):
    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        out = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        shutil.copyfile(PTH, Path(unpacked_wheel) / PTH)
        return out


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
    py_modules=["depthjax_lm_eval"],
    cmdclass={"build_py": BuildPy, "editable_wheel": EditableWheel},
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
        "gguf>=0.19,<0.20",  # GGUF files for llama.cpp (depthjax.gguf)
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
        # lm-evaluation-harness without its hf extra: no torch (depthjax.eval.harness)
        "eval": ["lm-eval>=0.4.13,<0.5"],
    },
    entry_points={"console_scripts": ["depthjax=depthjax.cli:main"]},
)
