"""The runtime every role stands on: MPI transport and its message schemas, devices, model state, checkpoints,
metrics, the world each rank knows, the process environment."""
