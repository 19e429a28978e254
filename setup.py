from setuptools import find_packages, setup

setup(
    name="mpisage",
    version="0.1.0",
    description="Federated split learning over MPI: FSL-SAGE and its baselines",
    packages=find_packages(include=["mpisage", "mpisage.*"]),
    python_requires=">=3.10",
    # torch is pinned by scripts/setup.sh (a CPU build on machines without a GPU); it is not listed here so that
    # pip never replaces an installed build with a multi-GB CUDA one.
    install_requires=["numpy", "h5py>=3.8", "mpi4py>=4.0", "omegaconf>=2.3", "matplotlib"],
    extras_require={"test": ["pytest", "pytest-mpi", "pytest-timeout"]},
    entry_points={"console_scripts": ["mpisage-plot=mpisage.plot:main"]},
)
