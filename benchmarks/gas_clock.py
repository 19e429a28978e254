"""Simulated seconds per global update and the participation skew of GAS's straggler schedule, next to the
authors' timing model (github eejiarong/GAS, GAS_main.py, read for its figures: per image 5,603,328 operations per
pass of the AlexNet client, 131,072 activation bits, 620,544 client-model bits; the active client with the
earliest clock acts next). Both use the straggler model of the GAS paper with the same speeds per seed.

    python benchmarks/gas_clock.py [--seeds 10] [--updates 50]

mpisage: `AsyncAlgorithm.simulated_schedule`'s clock (`simulate_schedule`) with the figures of mpisage's own
AlexNet split on Fashion-MNIST (28x28: fewer MACs and a 64x7x7 cut). The reference below is the authors' loop
written out afresh: each step scans the active clients for the smallest clock.
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from mpisage.algorithms.asynchronous import client_profiles, count_macs, simulate_schedule
from mpisage.models import build_split
from mpisage.runtime.state import state_nbytes


def authors_model(profiles, active: int, local_iters: int, batch: int, updates: int, rng: np.random.Generator):
    """(seconds per update, participations per client) of the authors' clock with their AlexNet figures."""
    workload, activation, model = 5_603_328, 131_072 * batch, 620_544
    k = len(profiles)
    order = list(rng.choice(k, active, replace=False))
    clock = {c: workload / profiles[c].flops + activation / profiles[c].uplink for c in order}
    done = dict.fromkeys(order, 0)
    counts, returned, latest, times = np.zeros(k, int), 0, 0.0, []
    while len(times) < updates:
        cid = min(order, key=lambda c: clock[c])
        done[cid] += 1
        if done[cid] < local_iters:
            clock[cid] += 2 * workload / profiles[cid].flops + activation / profiles[cid].uplink
            continue
        back = clock[cid] + (workload + 0.0) / profiles[cid].flops + model / profiles[cid].uplink
        latest, returned, counts[cid] = max(latest, back), returned + 1, counts[cid] + 1
        if returned % active == 0:
            times.append(latest)
        new = int(rng.choice([c for c in range(k) if c not in order]))
        order[order.index(cid)] = new
        clock[new], done[new] = back + workload / profiles[new].flops + activation / profiles[new].uplink, 0
    return times[-1] / updates, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--updates", type=int, default=50)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--active", type=int, default=10)
    ap.add_argument("--local-iters", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    a = ap.parse_args()
    split = build_split("alexnet", in_channels=1, image_size=28, num_classes=10, aux="default")
    macs = count_macs(split.client, torch.zeros(1, 1, 28, 28))
    with torch.no_grad():
        cut = split.client(torch.zeros(1, 1, 28, 28)).shape[1:]
    activation_bits = 32.0 * a.batch_size * math.prod(cut)
    model_bits = 8.0 * state_nbytes(split.client.state_dict())
    print(f"AlexNet / Fashion-MNIST, K={a.clients} C={a.active} E={a.local_iters} B={a.batch_size}, {a.updates} "
          f"updates, seeds 0..{a.seeds - 1}")
    print(f"mpisage figures: {macs:,.0f} MACs per sample per pass, cut {tuple(cut)}, {model_bits:,.0f} model bits")
    rows = {"mpisage": [], "mpisage*": [], "authors": []}
    for seed in range(a.seeds):
        profiles = client_profiles(a.clients, seed)
        s = simulate_schedule([macs / p.flops for p in profiles], [activation_bits / p.uplink for p in profiles],
                              [model_bits / p.uplink for p in profiles], a.active, a.active, a.local_iters,
                              a.updates, torch.Generator().manual_seed(seed))
        counts = s.participations(a.clients)
        rows["mpisage"].append((s.update_times[-1] / a.updates, counts.max() / max(counts.min(), 1)))
        # the same clock with the authors' figures (their 32x32 AlexNet constants, which they use for every dataset)
        s = simulate_schedule([5_603_328 / p.flops for p in profiles], [131_072 * a.batch_size / p.uplink
                                                                        for p in profiles],
                              [620_544 / p.uplink for p in profiles], a.active, a.active, a.local_iters,
                              a.updates, torch.Generator().manual_seed(seed))
        counts = s.participations(a.clients)
        rows["mpisage*"].append((s.update_times[-1] / a.updates, counts.max() / max(counts.min(), 1)))
        per_update, counts = authors_model(profiles, a.active, a.local_iters, a.batch_size, a.updates,
                                           np.random.default_rng(seed))
        rows["authors"].append((per_update, counts.max() / max(counts.min(), 1)))
    print(f"{'model':8s} {'s/update median':>16s} {'[min, max]':>16s} {'skew median':>12s} {'[min, max]':>12s}")
    for name, vals in rows.items():
        t, k = np.array(vals).T
        print(f"{name:8s} {np.median(t):16.3f} {f'[{t.min():.3f}, {t.max():.3f}]':>16s} {np.median(k):12.2f} "
              f"{f'[{k.min():.2f}, {k.max():.2f}]':>12s}")
    print("mpisage*: mpisage's clock with the authors' figures (draws differ: torch here, numpy there)")
    ratio = np.array([m[0] / r[0] for m, r in zip(rows["mpisage"], rows["authors"])])
    print(f"mpisage / authors, seconds per update, same speeds: median {np.median(ratio):.3f} "
          f"[{ratio.min():.3f}, {ratio.max():.3f}]")


if __name__ == "__main__":
    main()
