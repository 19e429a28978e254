"""CA2FL's F-server cache against the number of clients: every client returns one update of the whole AlexNet split
(14.8 MiB of state), one global update each; prints the store's size, the growth of this process's resident memory
and the seconds per global update.

    python benchmarks/ca2fl_cache.py --clients 200 --backend memory
    python benchmarks/ca2fl_cache.py --clients 1000 --backend disk --directory /scratch    (14.4 GiB on disk)

No MPI: the F-server's step alone (`Ca2fl.global_update`), with the client store of client_store.backend.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import types

import torch
import torch.nn as nn

from mpisage.algorithms.ca2fl import Ca2fl
from mpisage.config import AsynchronousConfig, ClientStoreConfig, Config
from mpisage.models import build_split
from mpisage.runtime.environment import resident_bytes
from mpisage.runtime.metrics import GIB, MIB
from mpisage.runtime.state import pack_state
from mpisage.runtime.transport import Kind


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--backend", choices=("memory", "disk"), default="memory")
    ap.add_argument("--directory", default=None, help="disk backend: where the store's file goes (default: TMPDIR)")
    args = ap.parse_args()
    split = build_split("alexnet", in_channels=1, image_size=28, num_classes=10)
    whole = nn.Sequential(split.client, split.server)       # one part holding the whole model
    algo = Ca2fl.__new__(Ca2fl)                              # the F-server step needs only the config and K
    algo.cfg = Config(asynchronous=AsynchronousConfig(model_weighting="equal"),
                      client_store=ClientStoreConfig(backend=args.backend,
                                                     directory=args.directory or tempfile.gettempdir()))
    algo.world = types.SimpleNamespace(num_clients=args.clients, device="cpu", num_samples=lambda cid: 1)
    algo.global_lr, algo._cache, algo.cache_sum = 1.0, None, {}
    x = pack_state(whole.state_dict())
    before, began = resident_bytes(), time.perf_counter()
    for cid in range(args.clients):
        with torch.no_grad():
            for p in whole.parameters():
                p.add_(1e-3)
        x = algo.global_update(Kind.CLIENT_MODEL, x, [pack_state(whole.state_dict())], [x], [cid], whole)
    print(f"{args.backend}: {args.clients} clients, model {x.numel() / MIB:.1f} MiB, store "
          f"{algo.cache.nbytes() / GIB:.2f} GiB, resident growth {(resident_bytes() - before) / GIB:.2f} GiB, "
          f"{(time.perf_counter() - began) / args.clients * 1000:.0f} ms per update")


if __name__ == "__main__":
    main()
