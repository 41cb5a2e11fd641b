from setuptools import find_packages, setup

setup(
    name="ldm-scratch",
    version="0.1.0",
    description="Stable Diffusion from scratch: readable PyTorch models that load the original checkpoints, "
                "samplers, Triton kernels, training and evaluation.",
    packages=find_packages(include=["ldm", "ldm.*", "samplers", "samplers.*", "kernels", "kernels.*",
                                    "train", "train.*", "sample", "sample.*", "metrics", "metrics.*",
                                    "shapes", "shapes.*"]),
    package_data={"ldm": ["data/*"], "metrics": ["human/page.html"], "sample.webui": ["static/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "einops",
        "numpy",
        "ftfy",
        "regex",
        "tqdm",
        "safetensors",
        "pillow",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        # Oracles and tools for the test suite only; library code never imports them. The oracles listed in
        # tests/oracles-no-deps.txt are installed separately with --no-deps (see README): their dependency sets pull
        # torchvision and CUDA.
        "test": [
            "pytest",
            "hypothesis",
            "diffusers",
            # 5.25 requires Hugging Face's `kernels` distribution, whose import name is this project's kernels
            # package: transformers then imports ours in its place and fails at import.
            "transformers<5.25",
            "scipy",
            "scikit-image",
            "torchsde",
            "torchdiffeq",
            "jsonmerge",
            "pyarrow",
            "torchmetrics",
            "httpx",
            "webuiapi",
            # Executing the example notebooks (tests/test_examples.py).
            "nbclient",
            "nbformat",
            "ipykernel",
            "schemathesis",
            # diffusers' LoRA loading (load_lora_weights) runs on peft: the LCM-LoRA parity test.
            "peft",
        ],
        # The web UI and A1111-compatible HTTP API (python -m sample.webui).
        "webui": ["fastapi", "uvicorn"],
        # LAION parquet metadata (python -m train.data filter).
        "laion": ["pyarrow"],
    },
)
