"""Algorithms by config name. Each is a small file of hooks (see base.py)."""
from mpisage.algorithms.base import Algorithm, ClientLink, ClientState, ServerState
from mpisage.algorithms.fsl_sage import FslSage

REGISTRY: dict[str, type[Algorithm]] = {cls.name: cls for cls in (FslSage,)}


def make_algorithm(world) -> Algorithm:
    return REGISTRY[world.cfg.algorithm](world)


__all__ = ["Algorithm", "ClientLink", "ClientState", "ServerState", "REGISTRY", "make_algorithm"]
