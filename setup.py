"""dsjax: DeepSeek-V3/R1 in JAX. Install with ``pip install -e .[test,hf]`` (see README.md)."""

import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "dsjax" / "__init__.py").read_text()).group(1)

# Pinned to what the project's GPU machines run (JAX 0.11.2 needs Python >= 3.12).
# Pallas ships inside jax; the PyPI package named "pallas" is unrelated and must never be added.
INSTALL_REQUIRES = [
    "jax==0.11.2",
    "jaxlib==0.11.2",
    "flax==0.12.10",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.4",
    "grain==0.2.18",
    "absl-py>=2.1",
    "numpy>=1.26",
    "ml_dtypes>=0.5",
    "tokenizers>=0.19",
    "tensorboardX>=2.6",
    "tqdm>=4.66",
]

EXTRAS = {
    "hf": ["safetensors>=0.4", "tokenizers>=0.19"],
    "test": ["pytest>=8", "pytest-xdist>=3.5", "safetensors>=0.4", "nbclient>=0.10", "nbformat>=5.10",
             "ipykernel>=6.29", "matplotlib>=3.8", "sympy>=1.12"],
    "rl": ["sympy>=1.12"],  # symbolic stage of the math accuracy reward (skipped without it)
    "plot": ["matplotlib>=3.8"],
    "notebook": ["jupyterlab", "treescope>=0.1.9", "ipykernel>=6.29"],
    # CUDA 13 build of the same jax (the GPU image's); brings the Mosaic GPU / Triton Pallas backends.
    "cuda": ["jax[cuda13]==0.11.2"],
}
EXTRAS["dev"] = sorted(set(EXTRAS["hf"] + EXTRAS["test"]))

setup(
    name="dsjax",
    version=VERSION,
    description="DeepSeek-V3/R1 in JAX: MLA, DeepSeekMoE, MTP, FP8 kernels, training and GRPO",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["dsjax", "dsjax.*", "pallas_kernels", "pallas_kernels.*", "experiments",
                                    "experiments.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    license="Apache-2.0",
    classifiers=["Programming Language :: Python :: 3.12", "Programming Language :: Python :: 3.13"],
)
