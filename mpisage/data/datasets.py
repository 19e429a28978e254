"""Readers for the image datasets in their standard on-disk formats (no torchvision).

- Fashion-MNIST: the four idx files (gzipped or not).
- CIFAR-10 / CIFAR-100: the "python version" pickled batches, read with a restricted unpickler
  that can only rebuild numpy arrays (a pickle can otherwise run arbitrary code).
"""
from __future__ import annotations

import gzip
import os
import pickle
import urllib.request
from dataclasses import dataclass

import numpy as np
import torch

DATASETS = ("fashion_mnist", "cifar10", "cifar100")


class DataError(RuntimeError):
    """A user-facing data problem: the message names the dataset, the paths tried and the fix."""


@dataclass
class ImageDataset:
    """A whole dataset held in memory as uint8 images and int64 labels."""

    name: str
    train_x: torch.Tensor  # uint8 [N, C, H, W], contiguous
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor  # uint8 [M, C, H, W]
    test_y: torch.Tensor  # int64 [M]
    num_classes: int
    mean: tuple[float, ...]  # per channel, for normalisation of x / 255
    std: tuple[float, ...]

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[2])


def load_dataset(name: str, root: str | None) -> ImageDataset:
    """Load dataset `name` (one of DATASETS), looking under `root` first (see the readers)."""
    if name == "fashion_mnist":
        return _load_fashion_mnist(root)
    if name == "cifar10":
        return _load_cifar(root, "cifar10")
    if name == "cifar100":
        return _load_cifar(root, "cifar100")
    raise ValueError(f"dataset.name={name!r} is unknown; choose one of {', '.join(DATASETS)}")


def _tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # Copy: arrays from np.frombuffer are read-only, which torch.from_numpy warns about.
    return (torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8).copy()),
            torch.from_numpy(np.asarray(y, dtype=np.int64).copy()))


def _user_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mpisage")


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (idx files)
# --------------------------------------------------------------------------------------------

FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DOWNLOAD_TIMEOUT_S = 10.0


def _fashion_candidates(root: str | None) -> list[str]:
    dirs = []
    if root:
        dirs += [root, os.path.join(root, "fashion-mnist"), os.path.join(root, "FashionMNIST", "raw")]
    dirs += [FASHION_DEBIAN_DIR, os.path.join(_user_cache_dir(), "fashion-mnist")]
    return dirs


def _find_idx(directory: str, base: str) -> str | None:
    for path in (os.path.join(directory, base + ".gz"), os.path.join(directory, base)):
        if os.path.isfile(path):
            return path
    return None


def _download_file(url: str, dest: str) -> None:
    """Fetch `url` into `dest` atomically (a partial download never appears under `dest`)."""
    tmp = f"{dest}.tmp.{os.getpid()}"
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp, open(tmp, "wb") as f:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _download_fashion(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for base in FASHION_FILES:
        dest = os.path.join(directory, base + ".gz")
        if not os.path.isfile(dest):
            _download_file(FASHION_URL + base + ".gz", dest)


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Read an unsigned-byte idx file (optionally gzipped) with `ndim` dimensions; validates it."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if path.endswith(".gz"):
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"fashion_mnist: cannot read {path}: {e}. Delete it and fetch it again.") from e
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes((0, 0, 0x08, ndim)):
        raise DataError(f"fashion_mnist: {path} is not an unsigned-byte idx file with {ndim} "
                        f"dimension(s) (bad magic number); delete it and fetch it again.")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"fashion_mnist: {path} is truncated or corrupt ({len(raw)} bytes, "
                        f"expected {expected} for shape {dims}); delete it and fetch it again.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_fashion_dir(directory: str) -> ImageDataset:
    paths = [_find_idx(directory, base) for base in FASHION_FILES]
    tr_x, tr_y = read_idx(paths[0], 3), read_idx(paths[1], 1)
    te_x, te_y = read_idx(paths[2], 3), read_idx(paths[3], 1)
    for x, y, px in ((tr_x, tr_y, paths[0]), (te_x, te_y, paths[2])):
        if len(x) != len(y):
            raise DataError(f"fashion_mnist: {px} has {len(x)} images but its labels file has "
                            f"{len(y)}; the files in {directory} do not belong together.")
        if len(y) and int(y.max()) >= 10:
            raise DataError(f"fashion_mnist: labels in {directory} exceed 9; the files are not Fashion-MNIST.")
    train_x, train_y = _tensors(tr_x[:, None], tr_y)
    test_x, test_y = _tensors(te_x[:, None], te_y)
    return ImageDataset("fashion_mnist", train_x, train_y, test_x, test_y, 10, (0.2860,), (0.3530,))


def _load_fashion_mnist(root: str | None) -> ImageDataset:
    candidates = _fashion_candidates(root)
    for d in candidates:
        if all(_find_idx(d, base) for base in FASHION_FILES):
            return _read_fashion_dir(d)
    cache = candidates[-1]
    try:
        _download_fashion(cache)
    except Exception as e:  # any network/filesystem failure ends in the same advice
        tried = "\n  ".join(candidates)
        raise DataError(
            "fashion_mnist: the idx files {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] were not "
            f"found in any of:\n  {tried}\nand downloading them from {FASHION_URL} into {cache} "
            f"failed ({type(e).__name__}: {e}).\nFix: `apt-get install dataset-fashion-mnist` "
            "(installs them in /usr/share/datasets/fashion-mnist), or put the four files in the "
            "directory given as dataset.root.") from e
    return _read_fashion_dir(cache)


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (pickled python batches)
# --------------------------------------------------------------------------------------------

def _numpy_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR batch may reference: what numpy needs to rebuild an ndarray."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    import _codecs

    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               # protocol-2 pickles written by python 3 encode bytes through _codecs.encode
               ("_codecs", "encode"): _codecs.encode}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except the numpy array constructors."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(f"refusing to unpickle {module}.{name}: a CIFAR batch only holds numpy "
                            "arrays, lists and dicts, so this file is corrupt or malicious.") from None


def load_restricted_pickle(path: str) -> object:
    """Unpickle `path` allowing only numpy arrays (bytes keys kept as bytes, as CIFAR expects)."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="bytes").load()
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    except Exception as e:  # truncated or garbled files raise many different types
        raise DataError(f"cannot unpickle {path} ({type(e).__name__}: {e}); delete it and "
                        "unpack the archive again.") from e


_CIFAR = {  # name -> (batch directory, label key, classes, archive url, archive title)
    "cifar10": ("cifar-10-batches-py", b"labels", 10,
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "CIFAR-10 python version"),
    "cifar100": ("cifar-100-python", b"fine_labels", 100,
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "CIFAR-100 python version"),
}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _cifar_files(directory: str, name: str) -> tuple[list[str], str] | None:
    """(train files, test file) in `directory`, or None when it is not a complete batch directory."""
    if not os.path.isdir(directory):
        return None
    if name == "cifar100":
        train, test = os.path.join(directory, "train"), os.path.join(directory, "test")
        return ([train], test) if os.path.isfile(train) and os.path.isfile(test) else None
    test = os.path.join(directory, "test_batch")
    batches = []
    for f in os.listdir(directory):
        suffix = f[len("data_batch_"):]
        if f.startswith("data_batch_") and suffix.isdigit():
            batches.append((int(suffix), os.path.join(directory, f)))
    if not batches or not os.path.isfile(test):
        return None
    return [p for _, p in sorted(batches)], test


def _read_cifar_batch(path: str, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = load_restricted_pickle(path)
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a dict, found {type(d).__name__}; not a CIFAR batch.")
    # CIFAR's own files have bytes keys; accept str keys from re-pickled copies too.
    data = d.get(b"data", d.get("data"))
    labels = d.get(label_key, d.get(label_key.decode()))
    if data is None or labels is None:
        raise DataError(f"{path}: missing key b'data' or {label_key!r}; not a CIFAR batch of this kind.")
    data, labels = np.asarray(data), np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{path}: expected uint8 data [N, 3072] and N labels, found {data.dtype} "
                        f"{list(data.shape)} and {len(labels)} labels.")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels outside [0, {num_classes}).")
    return data.reshape(-1, 3, 32, 32), labels  # rows are CHW-ordered


def _load_cifar(root: str | None, name: str) -> ImageDataset:
    dirname, label_key, num_classes, url, archive = _CIFAR[name]
    candidates = []
    for base in ([root] if root else []) + [_user_cache_dir()]:
        # `root` may be the batch directory itself or its parent.
        if os.path.basename(os.path.normpath(base)) == dirname:
            candidates.append(base)
        candidates.append(os.path.join(base, dirname))
    for d in candidates:
        files = _cifar_files(d, name)
        if files is None:
            continue
        train = [_read_cifar_batch(p, label_key, num_classes) for p in files[0]]
        te_x, te_y = _read_cifar_batch(files[1], label_key, num_classes)
        train_x, train_y = _tensors(np.concatenate([x for x, _ in train]),
                                    np.concatenate([y for _, y in train]))
        test_x, test_y = _tensors(te_x, te_y)
        return ImageDataset(name, train_x, train_y, test_x, test_y, num_classes,
                            _IMAGENET_MEAN, _IMAGENET_STD)
    tried = "\n  ".join(candidates)
    wanted = "data_batch_1..5 and test_batch" if name == "cifar10" else "train and test"
    raise DataError(
        f"{name}: no '{dirname}' directory with {wanted} found; tried:\n  {tried}\n"
        f"Fix: download the \"{archive}\" tarball ({url}) and unpack it under dataset.root "
        f"(`tar xzf {url.rsplit('/', 1)[-1]} -C <dataset.root>`), which creates {dirname}/.")
