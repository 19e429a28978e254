"""Algorithms by config name. Each is a small file of hooks (base.py: synchronous; asynchronous.py: asynchronous)."""
from mpisage.algorithms.asynchronous import AsyncAlgorithm
from mpisage.algorithms.base import Algorithm, ClientState, ServerState
from mpisage.algorithms.ca2fl import Ca2fl
from mpisage.algorithms.fed_avg import FedAvg
from mpisage.algorithms.fed_buff import FedBuff
from mpisage.algorithms.fsl_sage import FslSage
from mpisage.algorithms.gas import Gas
from mpisage.algorithms.local_loss import CseFsl, LocalLoss
from mpisage.algorithms.sglr import Sglr
from mpisage.algorithms.split_learning import SplitFedV1, SplitFedV2, VanillaSL

REGISTRY: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (FslSage, CseFsl, LocalLoss, FedAvg, SplitFedV1, SplitFedV2, VanillaSL, Sglr, Gas, FedBuff,
                              Ca2fl)}


def make_algorithm(world) -> Algorithm:
    return REGISTRY[world.cfg.algorithm](world)


__all__ = ["Algorithm", "AsyncAlgorithm", "ClientState", "ServerState", "REGISTRY", "make_algorithm"]
