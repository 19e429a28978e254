"""Seconds for one FSL-SAGE alignment of all clients: the per-client loop against the batched (vmap) version.

    nice -n 10 python benchmarks/batched_alignment.py [--clients 10] [--buffers 64,448] [--threads 1,2]
                                                      [--repeats 3] [--steps 1] [--align-steps 100]
                                                      [--device cpu|cuda]

ResNet-18 split (the FSL-SAGE paper's), default aux (layer3 + avgpool + fc, BatchNorm in train mode), Fashion-MNIST at
32x32x3: smashed samples [128, 4, 4], random tensors (timing does not depend on the values). Every alignment step
does the same work (the whole buffer, every step), so each repeat times `steps` steps of all clients and the figure
per alignment is that time x `fsl.align_steps` (100 in the paper), plus the targets (one server forward + backward per
client's buffer, the same code for both methods, timed once per buffer and thread setting). Repeats
alternate loop and batched so that load from other processes hits both alike; one untimed repeat per
buffer comes first. Prints medians and batched/loop of wall seconds, and of process CPU seconds per step (all
threads; on a shared machine the CPU figure at 1 thread is the steadier measure of the work)."""
import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from mpisage.algorithms.alignment import align_clients, align_one, true_gradients
from mpisage.models import build_split


def _clients(split, clients: int, buffer: int, device: torch.device):
    auxes = [copy.deepcopy(split.aux) for _ in range(clients)]
    opts = [torch.optim.Adam(a.parameters(), lr=1e-3, weight_decay=0.0) for a in auxes]
    zs = [torch.randn(buffer, 128, 4, 4, device=device) for _ in range(clients)]
    ys = [torch.randint(0, 10, (buffer,), device=device) for _ in range(clients)]
    return auxes, opts, zs, ys


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--buffers", default="64,448")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=1, help="timed alignment steps per repeat")
    p.add_argument("--align-steps", type=int, default=100, help="steps of one alignment (the paper: 100)")
    p.add_argument("--device", default="cpu", help="where the S-server aligns: cpu | cuda (threads then only "
                   "matter for the Python side)")
    args = p.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    split = build_split("resnet18", in_channels=3, image_size=32, num_classes=10)
    split.aux.to(device)
    split.server.to(device)
    # GPU work is asynchronous: a time is read only once the device has finished what was queued
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    loss = F.cross_entropy
    print(f"ResNet-18 default aux on {device}, {args.clients} clients, {args.steps} timed step(s) per repeat, "
          f"{args.repeats} repeats; seconds per alignment = targets + {args.align_steps} x seconds per step")
    print(f"{'buffer':>6s} {'threads':>7s} {'loop s/step':>11s} {'batched s/step':>14s} {'targets s':>9s} "
          f"{'loop s/align':>12s} {'batched s/align':>15s} {'batched/loop':>12s}   {'loop CPU s':>10s} "
          f"{'batch CPU s':>10s} {'CPU ratio':>8s}", flush=True)
    for buffer in (int(b) for b in args.buffers.split(",")):
        loop_state, batch_state = _clients(split, args.clients, buffer, device), None
        batch_state = (*copy.deepcopy(loop_state[:2]), *loop_state[2:])
        for t, threads in enumerate(int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            start = time.perf_counter()
            targets = [true_gradients(split.server, z, y, loss) for z, y in zip(*loop_state[2:])]
            sync()
            targets_s = time.perf_counter() - start
            times = {"loop": [], "batched": []}
            cpu = {"loop": [], "batched": []}
            warm = 1 if t == 0 else 0     # per buffer, one untimed repeat first (allocations, Adam state)
            for r in range(args.repeats + warm):
                for method in ("loop", "batched"):
                    auxes, opts, zs, ys = loop_state if method == "loop" else batch_state
                    start, cpu_start = time.perf_counter(), time.process_time()
                    if method == "loop":
                        for i in range(args.clients):
                            align_one(auxes[i], opts[i], zs[i], ys[i], targets[i], args.steps, loss)
                    else:
                        align_clients(auxes, opts, zs, ys, targets, args.steps, loss)
                    sync()
                    if r >= warm:
                        times[method].append((time.perf_counter() - start) / args.steps)
                        cpu[method].append((time.process_time() - cpu_start) / args.steps)
            lo, ba = statistics.median(times["loop"]), statistics.median(times["batched"])
            lo_cpu, ba_cpu = statistics.median(cpu["loop"]), statistics.median(cpu["batched"])
            print(f"{buffer:6d} {threads:7d} {lo:11.3f} {ba:14.3f} {targets_s:9.2f} "
                  f"{targets_s + args.align_steps * lo:12.1f} {targets_s + args.align_steps * ba:15.1f} "
                  f"{ba / lo:12.2f}   {lo_cpu:10.3f} {ba_cpu:10.3f} {ba_cpu / lo_cpu:8.2f}", flush=True)


if __name__ == "__main__":
    main()
