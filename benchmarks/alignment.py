"""How well does alignment make the auxiliary model's input gradient match the server's, and at what cost?

    python benchmarks/alignment.py [--samples 1000] [--steps 100]

For each aux variant of the default CNN: a random split, `samples` smashed samples in the buffer, FSL-SAGE's
alignment (Adam, lr 1e-3, sum-MSE of input gradients, double back-propagation) for `steps` steps on one thread.
Prints the alignment loss at the end relative to the start, the per-sample cosine similarity between estimated
and true gradients after alignment, and the seconds taken."""
import argparse
import time
import types

import torch
import torch.nn.functional as F

from mpisage.algorithms.fsl_sage import FslSage, one_client_server
from mpisage.models import build_split


def probe(aux_variant: str, samples: int, steps: int) -> tuple[float, float, float]:
    torch.manual_seed(0)
    split = build_split("cnn", in_channels=1, image_size=28, num_classes=10, aux=aux_variant)
    algo = FslSage.__new__(FslSage)
    algo.cfg = types.SimpleNamespace(align_buffer_size=samples, align_steps=steps, align_threads=1)
    s = one_client_server(split.server, split.aux, torch.optim.Adam(split.aux.parameters(), lr=1e-3))
    with torch.no_grad():
        z = split.client(torch.randn(samples, 1, 28, 28))
    y = torch.randint(0, 10, (samples,))
    algo._buffer(s, 0, z, y)
    start = time.perf_counter()
    algo.align(s, 0)
    seconds = time.perf_counter() - start
    first, last = s.align_loss[0]
    grads = []
    for model in (split.server, split.aux):
        zl = z.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(F.cross_entropy(model(zl), y), zl)[0].flatten(1))
    return last / first, F.cosine_similarity(grads[0], grads[1]).mean().item(), seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"{'aux':8s} {'loss end/start':>14s} {'cosine':>7s} {'seconds':>8s}   ({args.samples} samples, {args.steps} steps)")
    for variant in ("linear", "default", "full"):
        ratio, cos, seconds = probe(variant, args.samples, args.steps)
        print(f"{variant:8s} {ratio:14.3f} {cos:7.3f} {seconds:8.1f}", flush=True)


if __name__ == "__main__":
    main()
