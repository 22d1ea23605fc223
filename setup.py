from setuptools import find_packages, setup

setup(
    name="unipic-jax",
    version="0.1.0",
    description="JAX/Flax port of Skywork UniPic-1: text-to-image, editing and image-to-text",
    packages=find_packages(include=["unipic_jax", "unipic_jax.*", "convert", "convert.*", "configs", "configs.*"]),
    # XLA's descriptions of GPU cards, for `unipic-jax compile --topology h100` (unipic_jax/aot.py).
    package_data={"unipic_jax": ["gpu_targets/*.txtpb", "gpu_targets/README.md"]},
    python_requires=">=3.10",
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "qwix==0.1.8",  # weight-only int8/int4 quantization (unipic_jax/quant.py)
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "chex==0.1.92",
        "ml-collections==1.1.0",
        "ml_dtypes",
        "numpy",
        "safetensors==0.8.0",
        "transformers==5.23.0",
        "grain==0.2.18",
        "tensorflow-datasets==4.9.10",
        # tensorflow-datasets imports it on every Python, but declares it only for Python < 3.9.
        "importlib-resources==7.1.0",
        "tensorboardX==2.6.5",
        "tqdm",
        "pillow",
    ],
    extras_require={
        # Reading the official release (.bin / .ckpt torch pickles) and `unipic-jax export`.
        "convert": ["torch==2.13.0"],
        "test": ["pytest", "pytest-xdist", "torch==2.13.0",
                 # the web demo's browser tests (Debian's chromium and chromium-driver, see .ci/run)
                 "gradio==6.31.0", "selenium==4.51.0"],
        # `unipic-jax demo`, the web demo.
        "demo": ["gradio==6.31.0"],
        # TPU runs and `unipic-jax compile` for TPU topologies on any host (libtpu 0.0.42.1).
        "tpu": ["jax[tpu]==0.10.2"],
        # `unipic-jax compile` for GPU presets (h100, gpu24, ...) on any host, no GPU or driver needed:
        # the CUDA PJRT plugin's compiler, and cuDNN for the attention kernel it lowers to.
        "gpu-aot": ["jax-cuda12-plugin==0.10.2", "nvidia-cudnn-cu12==9.28.0.42"],
    },
    entry_points={"console_scripts": ["unipic-jax=unipic_jax.cli:main"]},
)
