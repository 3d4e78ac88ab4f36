"""moe_jax: Mixture-of-Experts layers with null experts and XMoE threshold routing for JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="moe_jax",
    version="0.1.0",
    description=(
        "Mixture-of-Experts for JAX/Flax NNX: null experts (data sparsity), XMoE threshold "
        "routing, expert parallelism and a Pallas grouped matmul."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["moe_jax", "moe_jax.*", "kernels_pallas", "kernels_pallas.*"]),
    package_data={"kernels_pallas": ["gpu_specs/*.txtpb"]},
    install_requires=[
        "jax>=0.10.2,<0.13",
        "jaxlib>=0.10.2,<0.13",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "array_record>=0.8",  # data kind "arrayrecord" (grain's random-access format)
        "ml-collections>=1.1.0,<2",
        "absl-py>=2.1",
        "numpy>=1.26",
        "safetensors>=0.8",  # checkpoints; from 0.8 numpy arrays are written without copies
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "pillow>=10",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",  # two workers, one file each (pyproject addopts)
            "hypothesis>=6.100",
            "ruff>=0.6",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6",
            # Hugging Face checkpoint tests: tiny models built and run by transformers (CPU).
            "torch==2.13.0",
            "transformers>=5.0,<6",
            "tokenizers>=0.21",
            # The tokamax backend's tests (Python >= 3.12 only; skipped, with the reason, on 3.11).
            "tokamax>=0.0.17; python_version>='3.12'",
        ],
        # Reading Hugging Face tokenizers (tokenizer.json); checkpoints need only safetensors.
        "hf": ["tokenizers>=0.21"],
        # Compile-only TPU and NVIDIA targets on any machine (python -m moe_jax.aot, the compile
        # tests): libtpu and the CUDA PJRT plugin, pinned to the jax version they match.
        "aot": ["jax[cuda12,tpu]"],
        "gpu": ["jax[cuda12]"],
        "cuda13": ["jax[cuda13]"],
        "tpu": ["jax[tpu]"],
        # Backend "tokamax" (tokamax.ragged_dot, moe_jax/experts/tokamax.py). tokamax needs
        # Python >= 3.12 and jax >= 0.11.1: on Python 3.11 the extra installs nothing.
        "tokamax": ["tokamax>=0.0.17; python_version>='3.12'"],
        "notebook": ["jupyter", "ipykernel>=6"],
        # The TensorBoard viewer for the scalars runs write to <workdir>/tb (tensorboardX).
        "tensorboard": ["tensorboard>=2.16"],
        # The documentation site (mkdocs.yml; `mkdocs serve`), API reference from docstrings.
        "docs": ["mkdocs>=1.6,<2", "mkdocstrings[python]>=1.0,<2", "mkdocstrings-python>=2.0,<3"],
    },
)
