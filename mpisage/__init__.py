"""mpisage: federated split learning over MPI (FSL-SAGE and its baselines)."""

__version__ = "0.1.0"
