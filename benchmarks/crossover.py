"""FSL-SAGE against SplitFed in bytes per round as a function of the samples per client n: the closed form and the
predicted crossover n*, from the model sizes the code itself counts (mpisage.models.state_bytes and the smashed
activation's shape; the byte tests in tests/test_mpi_baselines.py and tests/test_mpi_fsl_sage.py pin the same rules).

  python benchmarks/crossover.py                       the claims' setting (ResNet-18 on Fashion-MNIST at 32x32x3)
  python benchmarks/crossover.py --n 160 600 2000 --rounds 11 --align-interval 5

Per round and client, in the paper figure (labels and headers are not counted):
  SplitFed v1 / v2:  2 n a + 2 S_c                          (every sample's activation up and its gradient down)
  FSL-SAGE:          u(n) a + 2 S_c + S_aux  [alignment rounds only: A of the R rounds]
  CSE-FSL:           u(n) a + 2 S_c + 2 S_aux
  FedAvg:            2 (S_c + S_s)
with a the activation bytes per sample, u(n) the samples in the uploaded batches (batches k = 0, Q, 2Q, ... of the
ceil(n / B) local batches, the last one ragged), S_c, S_s, S_aux the client, server and aux model bytes. Averaged
over R rounds with alignments at rounds 0, l, 2l, ... (A = floor((R - 1) / l) + 1 of them), FSL-SAGE's bytes per
round fall below SplitFed's where 2 n a > u(n) a + S_aux A / R, that is near n* = S_aux A / (R a (2 - 1/Q)).
"""
import argparse
import math


def sizes(model: str, channels: int, image_size: int, num_classes: int = 10) -> dict:
    import torch

    from mpisage.models import activation_shape, build_split, state_bytes
    torch.manual_seed(0)
    split = build_split(model, in_channels=channels, image_size=image_size, num_classes=num_classes)
    return {"client": state_bytes(split.client), "server": state_bytes(split.server), "aux": state_bytes(split.aux),
            "activation": 4 * math.prod(activation_shape(split, channels, image_size))}


def uploaded_samples(n: int, batch: int, q: int) -> int:
    """Samples in the batches a client uploads in a round: every q-th of its ceil(n / batch) batches, from the first."""
    return sum(min(batch, n - k * batch) for k in range(0, math.ceil(n / batch), q))


def per_round(n: int, s: dict, batch: int, q: int, rounds: int, align_interval: int) -> dict:
    """Mean paper bytes per round and client of each method over `rounds` rounds."""
    alignments = (rounds - 1) // align_interval + 1
    u, a = uploaded_samples(n, batch, q), s["activation"]
    return {"splitfed": 2 * n * a + 2 * s["client"],
            "fsl_sage": u * a + 2 * s["client"] + s["aux"] * alignments / rounds,
            "cse_fsl": u * a + 2 * s["client"] + 2 * s["aux"],
            "fed_avg": 2 * (s["client"] + s["server"])}


def crossover(s: dict, batch: int, q: int, rounds: int, align_interval: int) -> int:
    """The smallest n at which FSL-SAGE's mean bytes per round are below SplitFed's."""
    n = 1
    while per_round(n, s, batch, q, rounds, align_interval)["fsl_sage"] >= per_round(
            n, s, batch, q, rounds, align_interval)["splitfed"]:
        n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--q", type=int, default=5, help="fsl.server_update_interval")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--align-interval", type=int, default=5)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--n", type=int, nargs="*", default=[60, 160, 600, 2000, 5000])
    args = p.parse_args()
    s = sizes(args.model, args.channels, args.image_size)
    setting = (args.batch, args.q, args.rounds, args.align_interval)
    print(f"{args.model} at {args.channels}x{args.image_size}x{args.image_size}: client {s['client']:,} B, server "
          f"{s['server']:,} B, aux {s['aux']:,} B, activation {s['activation']:,} B per sample; B = {args.batch}, "
          f"Q = {args.q}, R = {args.rounds}, l = {args.align_interval}, {args.clients} clients")
    n_star = crossover(s, *setting)
    print(f"crossover: FSL-SAGE moves fewer bytes per round than SplitFed from n* = {n_star} samples per client")
    print("| n | SplitFed MB/round | FSL-SAGE MB/round | CSE-FSL MB/round | FedAvg MB/round | FSL-SAGE / SplitFed |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.n:
        r = {k: v * args.clients / 1e6 for k, v in per_round(n, s, *setting).items()}
        print(f"| {n} | {r['splitfed']:.1f} | {r['fsl_sage']:.1f} | {r['cse_fsl']:.1f} | {r['fed_avg']:.1f} | "
              f"{r['fsl_sage'] / r['splitfed']:.2f} |")


if __name__ == "__main__":
    main()
