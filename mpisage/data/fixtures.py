"""Tiny datasets written in the real on-disk formats, for tests.

Images are weakly learnable: each class has its own mean brightness, plus Gaussian noise.
"""
from __future__ import annotations

import gzip
import os
import pickle

import numpy as np

from .datasets import CINIC_CLASSES


def _labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Round-robin labels (every class present once n >= num_classes), shuffled."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _images(labels: np.ndarray, num_classes: int, shape: tuple[int, ...],
            rng: np.random.Generator) -> np.ndarray:
    """uint8 [n, *shape]: brightness 40..215 rising with the class, noise sd 25."""
    level = 40.0 + 175.0 * labels / max(num_classes - 1, 1)
    x = level.reshape(-1, *([1] * len(shape))) + rng.normal(0.0, 25.0, (len(labels), *shape))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _dump(path: str, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10_fixture(root: str, n_train: int, n_test: int, *, n_batches: int = 2,
                          seed: int = 0) -> str:
    """Write root/cifar-10-batches-py/{data_batch_1..n_batches, test_batch, batches.meta}.

    The train samples are split over the batches as evenly as possible (sizes differ by at most
    one). Returns the batches directory.
    """
    rng = np.random.default_rng(seed)
    out = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(out, exist_ok=True)
    y = _labels(n_train, 10, rng)
    x = _images(y, 10, (3072,), rng)
    for i, idx in enumerate(np.array_split(np.arange(n_train), n_batches), start=1):
        _dump(os.path.join(out, f"data_batch_{i}"),
              {b"batch_label": f"training batch {i} of {n_batches}".encode(),
               b"labels": [int(v) for v in y[idx]], b"data": x[idx]})
    y = _labels(n_test, 10, rng)
    _dump(os.path.join(out, "test_batch"), {b"batch_label": b"testing batch 1 of 1",
                                            b"labels": [int(v) for v in y],
                                            b"data": _images(y, 10, (3072,), rng)})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
             b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump(os.path.join(out, "batches.meta"), {b"num_cases_per_batch": -(-n_train // n_batches),
                                              b"label_names": names, b"num_vis": 3072})
    return out


def write_cifar100_fixture(root: str, n_train: int, n_test: int, *, seed: int = 0) -> str:
    """Write root/cifar-100-python/{train, test, meta} (fine and coarse labels). Returns the directory."""
    rng = np.random.default_rng(seed)
    out = os.path.join(root, "cifar-100-python")
    os.makedirs(out, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        y = _labels(n, 100, rng)
        _dump(os.path.join(out, split), {b"filenames": [b"img_%d.png" % i for i in range(n)],
                                         b"batch_label": split.encode(),
                                         b"fine_labels": [int(v) for v in y],
                                         b"coarse_labels": [int(v) // 5 for v in y],
                                         b"data": _images(y, 100, (3072,), rng)})
    _dump(os.path.join(out, "meta"), {b"fine_label_names": [b"class_%d" % i for i in range(100)],
                                      b"coarse_label_names": [b"super_%d" % i for i in range(20)]})
    return out


def _idx_bytes(a: np.ndarray) -> bytes:
    """An unsigned-byte idx file: magic 0x0000 08 <ndim>, big-endian int32 dims, then the data."""
    header = bytes((0, 0, 0x08, a.ndim)) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    return header + np.ascontiguousarray(a, dtype=np.uint8).tobytes()


def write_fashion_mnist_fixture(root: str, n_train: int, n_test: int, *, seed: int = 0) -> str:
    """Write the four gzipped idx files of a tiny Fashion-MNIST into root. Returns root."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = _labels(n, 10, rng)
        x = _images(y, 10, (28, 28), rng)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y.astype(np.uint8))):
            with gzip.open(os.path.join(root, f"{split}-{kind}-ubyte.gz"), "wb") as f:
                f.write(_idx_bytes(arr))
    return root


def write_cinic10_fixture(root: str, n_train: int, n_test: int, *, n_valid: int = 3, seed: int = 0) -> str:
    """Write root/CINIC-10/{train,valid,test}/<class>/*.png, as the CINIC-10 archive unpacks.

    Every fifth image is stored as a greyscale PNG, to exercise the reader's conversion to RGB.
    Returns root/CINIC-10.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = os.path.join(root, "CINIC-10")
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        for cls in CINIC_CLASSES:
            os.makedirs(os.path.join(out, split, cls), exist_ok=True)
        y = _labels(n, 10, rng)
        x = _images(y, 10, (32, 32, 3), rng)
        for i in range(n):
            image = Image.fromarray(x[i], "RGB")
            if i % 5 == 4:
                image = image.convert("L")
            image.save(os.path.join(out, split, CINIC_CLASSES[y[i]], f"{split}-{i:06d}.png"))
    return out
