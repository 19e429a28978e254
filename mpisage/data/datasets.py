"""Readers for the image datasets in their standard on-disk formats (no torchvision).

- Fashion-MNIST: the four idx files (gzipped or not).
- CIFAR-10 / CIFAR-100: the "python version" pickled batches, read with a restricted unpickler
  that can only rebuild numpy arrays (a pickle can otherwise run arbitrary code).
- CINIC-10: folders of PNG files, decoded once into a cache of .npy arrays (read without pickle).

`load_dataset` can also resize the images and repeat grey images to 3 channels, once, at load.
"""
from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import logging
import os
import pickle
import sys
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .files import DataError, DataNotFound, user_cache_dir, write_atomically

logger = logging.getLogger("mpisage")     # rank 0 prints info lines, the other ranks only warnings

DATASETS = ("fashion_mnist", "cifar10", "cifar100", "cinic10", "e2e")


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


def load_dataset(name: str, root: str | None, *, image_size: int | None = None,
                 channels: int | None = None, seq_len: int = 128) -> ImageDataset:
    """Load dataset `name` (one of DATASETS), looking under `root` first (see the readers).

    image_size: resize every image to image_size x image_size (bilinear, antialiased when shrinking),
    once, here; the images stay uint8. channels=3 repeats grey images to 3 channels, with the grey
    mean/std repeated (normalising a repeated channel is normalising the grey one). None keeps the
    images as stored.
    """
    if name == "e2e":       # GPT-2 tokens (needs the llm extra); seq_len tokens per sample
        from .e2e import load_e2e
        return load_e2e(root, seq_len)
    readers = {"fashion_mnist": _load_fashion_mnist,
               "cifar10": lambda r: _load_cifar(r, "cifar10"),
               "cifar100": lambda r: _load_cifar(r, "cifar100"),
               "cinic10": _load_cinic10}
    if name not in readers:
        raise ValueError(f"dataset.name={name!r} is unknown; choose one of {', '.join(DATASETS)}")
    return convert_dataset(readers[name](root), image_size, channels)


def convert_dataset(ds: ImageDataset, image_size: int | None, channels: int | None) -> ImageDataset:
    """Resizes and repeats channels as `load_dataset` describes. A job calls it after each rank has kept only the
    rows its role needs, so no rank converts images it then drops."""
    if channels not in (None, 1, 3):
        raise ValueError(f"dataset.channels={channels!r} is not allowed: 1, 3 or null (as stored)")
    if image_size is not None and image_size < 1:
        raise ValueError(f"dataset.image_size={image_size!r} must be >= 1, or null (as stored)")
    if ds.train_x.dim() != 4:       # token sequences (e2e): no images to convert
        return ds
    if channels == 1 and ds.in_channels != 1:
        raise DataError(f"dataset.channels=1: {ds.name} images have {ds.in_channels} channels and turning "
                        "colour into grey is not supported; set dataset.channels=3 or null (as stored).")
    if image_size is not None and image_size != ds.image_size:
        ds.train_x, ds.test_x = _resize(ds.train_x, image_size), _resize(ds.test_x, image_size)
    if channels == 3 and ds.in_channels == 1:
        ds.train_x, ds.test_x = ds.train_x.repeat(1, 3, 1, 1), ds.test_x.repeat(1, 3, 1, 1)
        ds.mean, ds.std = ds.mean * 3, ds.std * 3
    return ds


def _resize(x: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 [N,C,H,W] -> uint8 [N,C,size,size], bilinear; antialiased like PIL when shrinking."""
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, x.shape[0], chunk):  # in chunks: a float copy of a whole dataset is large
        part = F.interpolate(x[start:start + chunk].float(), size=(size, size), mode="bilinear",
                             align_corners=False, antialias=True)
        out[start:start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # Copy: arrays from np.frombuffer are read-only, which torch.from_numpy warns about.
    return (torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8).copy()),
            torch.from_numpy(np.asarray(y, dtype=np.int64).copy()))


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
    dirs += [FASHION_DEBIAN_DIR, os.path.join(user_cache_dir(), "fashion-mnist")]
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
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a corrupt stream a zlib.error
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
    if root and not os.path.isdir(root):
        logger.info(f"[mpisage] dataset.root={root} does not exist; looking in the standard places")
    for d in candidates:
        if all(_find_idx(d, base) for base in FASHION_FILES):
            logger.info(f"[mpisage] fashion_mnist: reading the idx files in {d}")
            return _read_fashion_dir(d)
    cache = candidates[-1]
    try:
        _download_fashion(cache)
    except Exception as e:  # any network/filesystem failure ends in the same advice
        tried = "\n  ".join(candidates)
        raise DataNotFound(
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
    for base in ([root] if root else []) + [user_cache_dir()]:
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
    raise DataNotFound(
        f"{name}: no '{dirname}' directory with {wanted} found; tried:\n  {tried}\n"
        f"Fix: download the \"{archive}\" tarball ({url}) and unpack it under dataset.root "
        f"(`tar xzf {url.rsplit('/', 1)[-1]} -C <dataset.root>`), which creates {dirname}/; or, on a "
        f"machine with internet access, run `python -m mpisage.data.fetch {name} <dataset.root>`.")


# --------------------------------------------------------------------------------------------
# CINIC-10 (folders of PNG files, decoded once into a cache of .npy arrays)
# --------------------------------------------------------------------------------------------

CINIC_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CINIC_URL = "https://datashare.ed.ac.uk/bitstream/handle/10283/3192/CINIC-10.tar.gz"
CINIC_DIRNAME = "CINIC-10"  # the archive has no top-level folder: it is unpacked into one of this name
_CINIC_DIRNAMES = (CINIC_DIRNAME, "cinic-10", "cinic10", "CINIC10")
_CINIC_SPLITS = ("train", "test")
_CINIC_MEAN = (0.47889522, 0.47227842, 0.43047404)
_CINIC_STD = (0.24205776, 0.23828046, 0.25874835)
CINIC_CACHE_DIRNAME = "mpisage-cache"
_CINIC_CACHE_VERSION = 1


def _load_cinic10(root: str | None) -> ImageDataset:
    """CINIC-10 from `<dir>/{train,test}/<class>/*.png`, the 10 classes in CIFAR-10's order.

    The training set is the `train` split alone (90,000 images; there is no config key to add
    `valid` to it) and the test set is `test`. <dir> is dataset.root itself or its CINIC-10
    sub-folder, else ~/.cache/mpisage/CINIC-10.
    """
    in_root = [root] + [os.path.join(root, n) for n in _CINIC_DIRNAMES] if root else []
    candidates = list(dict.fromkeys(in_root + [os.path.join(user_cache_dir(), CINIC_DIRNAME)]))
    for d in candidates:
        if all(os.path.isdir(os.path.join(d, split)) for split in _CINIC_SPLITS):
            arrays = _cinic_arrays(d)
            # torch.from_numpy without a copy: the cached arrays are memory-mapped, so the ranks of
            # a node share one copy of the pages until a rank keeps only its clients' rows.
            return ImageDataset("cinic10", *(torch.from_numpy(arrays[k]) for k in
                                             ("train_x", "train_y", "test_x", "test_y")),
                                10, _CINIC_MEAN, _CINIC_STD)
    tried = "\n  ".join(candidates)
    raise DataNotFound(
        f"cinic10: no CINIC-10 folder (train/ and test/ with one sub-folder per class) found; tried:\n"
        f"  {tried}\nFix: download {CINIC_URL} and unpack it under dataset.root:\n"
        f"  mkdir -p <dataset.root>/{CINIC_DIRNAME} && tar xzf CINIC-10.tar.gz -C <dataset.root>/{CINIC_DIRNAME}\n"
        f"or, on a machine with internet access, run `python -m mpisage.data.fetch cinic10 <dataset.root>`.")


def _list_cinic(directory: str) -> dict[str, tuple[list[str], np.ndarray]]:
    """Per split: the PNG paths relative to `directory`, by class then file name, and their labels."""
    listing = {}
    for split in _CINIC_SPLITS:
        paths, labels = [], []
        for label, cls in enumerate(CINIC_CLASSES):
            class_dir = os.path.join(directory, split, cls)
            if not os.path.isdir(class_dir):
                raise DataError(f"cinic10: {class_dir} is missing; every split of CINIC-10 has one folder "
                                f"per class ({', '.join(CINIC_CLASSES)}). Unpack {CINIC_URL} again.")
            names = sorted(n for n in os.listdir(class_dir) if n.lower().endswith(".png"))
            paths += [f"{split}/{cls}/{n}" for n in names]
            labels += [label] * len(names)
        if not paths:
            raise DataError(f"cinic10: {os.path.join(directory, split)} holds no .png images; "
                            f"unpack {CINIC_URL} again.")
        listing[split] = (paths, np.asarray(labels, dtype=np.int64))
    return listing


def _cinic_arrays(directory: str) -> dict[str, np.ndarray]:
    """{train,test}_{x,y} of the CINIC-10 folder `directory`, from the cache when it matches the files.

    The cache lives next to the data, or in the user cache dir when the data's folder is read-only.
    Of several processes starting together one decodes while the others wait on a lock, then read.
    """
    listing = _list_cinic(directory)
    fingerprint = hashlib.sha256("\n".join(p for s in _CINIC_SPLITS for p in listing[s][0]).encode()).hexdigest()
    real = os.path.realpath(directory)
    caches = [os.path.join(directory, CINIC_CACHE_DIRNAME),
              os.path.join(user_cache_dir(), "cinic10-cache", hashlib.sha256(real.encode()).hexdigest()[:16])]
    for cache in caches:
        arrays, _ = _read_cinic_cache(cache, fingerprint, listing)
        if arrays is not None:
            return arrays
    count = sum(len(listing[s][0]) for s in _CINIC_SPLITS)
    for cache in caches:
        if not _writable_dir(cache):
            continue
        with _exclusive_lock(os.path.join(cache, "lock")):
            arrays, why = _read_cinic_cache(cache, fingerprint, listing)  # built meanwhile by another process?
            if arrays is not None:
                return arrays
            _note(f"cinic10: decoding {count} PNG files into the cache {cache} ({why}); later runs read the cache")
            arrays = _decode_cinic(directory, listing)
            _write_cinic_cache(cache, fingerprint, arrays)
            return arrays
    _note(f"cinic10: cannot write a cache in {caches[0]} or {caches[1]}; decoding {count} PNG files "
          "at every start (make one of them writable)")
    return _decode_cinic(directory, listing)


def _read_cinic_cache(cache: str, fingerprint: str, listing) -> tuple[dict[str, np.ndarray] | None, str]:
    """(arrays, "") when `cache` is a complete cache of exactly the listed files, else (None, why not)."""
    manifest_path = os.path.join(cache, "manifest.json")
    if not os.path.isfile(manifest_path):
        return None, "no cache yet"
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict) or manifest.get("version") != _CINIC_CACHE_VERSION:
            return None, "cache written by another version of mpisage"
        if manifest.get("fingerprint") != fingerprint:
            return None, "stale cache: the PNG files have changed"
        arrays = {}
        for split in _CINIC_SPLITS:
            labels = listing[split][1]
            # Copy-on-write mapping: shared pages, yet writable, as torch.from_numpy wants.
            x = np.load(os.path.join(cache, f"{split}_x.npy"), mmap_mode="c", allow_pickle=False)
            y = np.load(os.path.join(cache, f"{split}_y.npy"), allow_pickle=False)
            if x.dtype != np.uint8 or x.shape != (len(labels), 3, 32, 32):
                return None, f"corrupt cache: {split}_x.npy is {x.dtype} {list(x.shape)}"
            if y.dtype != np.int64 or not np.array_equal(y, labels):
                return None, f"corrupt cache: {split}_y.npy does not match the class folders"
            arrays[f"{split}_x"], arrays[f"{split}_y"] = x, y
        return arrays, ""
    except (OSError, ValueError, EOFError) as e:  # truncated or garbled files; JSONDecodeError is a ValueError
        return None, f"corrupt cache: {type(e).__name__}: {e}"


def _decode_cinic(directory: str, listing) -> dict[str, np.ndarray]:
    try:
        from PIL import Image
    except ImportError as e:
        raise DataError("cinic10: decoding CINIC-10's PNG files needs Pillow; install it with "
                        "`pip install pillow` (it comes with matplotlib).") from e
    arrays = {}
    for split in _CINIC_SPLITS:
        paths, labels = listing[split]
        x = np.empty((len(paths), 32, 32, 3), dtype=np.uint8)
        for i, rel in enumerate(paths):
            x[i] = _read_png(os.path.join(directory, rel), Image)
        arrays[f"{split}_x"] = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        arrays[f"{split}_y"] = labels
    return arrays


def _read_png(path: str, Image) -> np.ndarray:
    """uint8 [32, 32, 3]; grey or palette images are converted to RGB."""
    try:
        with Image.open(path) as im:
            size = im.size
            rgb = np.asarray(im.convert("RGB"))
    except Exception as e:  # Pillow raises several types for truncated or foreign files
        raise DataError(f"cinic10: cannot decode {path} ({type(e).__name__}: {e}); unpack {CINIC_URL} "
                        "again.") from e
    if size != (32, 32):
        raise DataError(f"cinic10: {path} is {size[0]}x{size[1]} pixels, CINIC-10 images are 32x32; "
                        "dataset.root points at another dataset.")
    return rgb


def _write_cinic_cache(cache: str, fingerprint: str, arrays: dict[str, np.ndarray]) -> None:
    manifest = os.path.join(cache, "manifest.json")
    if os.path.exists(manifest):  # a rewrite interrupted half-way must not pass for a valid cache
        os.remove(manifest)
    for name, a in arrays.items():
        write_atomically(os.path.join(cache, f"{name}.npy"), lambda f, a=a: np.save(f, a, allow_pickle=False))
    counts = {s: len(arrays[f"{s}_y"]) for s in _CINIC_SPLITS}
    text = json.dumps({"version": _CINIC_CACHE_VERSION, "fingerprint": fingerprint, "counts": counts})
    write_atomically(manifest, lambda f: f.write(text.encode()))


def _writable_dir(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _exclusive_lock(path: str):
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: everyone decodes, and the renames keep it correct
            pass
        yield


def _note(line: str) -> None:
    sys.stderr.write(f"[mpisage] {line}\n")
    sys.stderr.flush()
