"""`python -m mpisage.data.fetch NAME [ROOT]`: makes sure a dataset is readable (downloading it where mpisage
can), and says where it was found."""
import sys

from mpisage.data.datasets import DataError, load_dataset


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m mpisage.data.fetch fashion_mnist|cifar10|cifar100 [ROOT]", file=sys.stderr)
        return 2
    try:
        ds = load_dataset(argv[0], argv[1] if len(argv) > 1 else None)
    except DataError as e:
        print(f"[mpisage] {e}", file=sys.stderr)
        return 1
    print(f"[setup] {ds.name}: {len(ds.train_y)} train / {len(ds.test_y)} test images, "
          f"{ds.in_channels}x{ds.image_size}x{ds.image_size}, {ds.num_classes} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
