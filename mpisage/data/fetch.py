"""`python -m mpisage.data.fetch NAME [ROOT]`: makes sure a dataset is readable and says where it was found.

A missing CIFAR-10, CIFAR-100 or CINIC-10 is downloaded from its official address and unpacked under ROOT
(default ~/.cache/mpisage, where mpisage also looks); Fashion-MNIST downloads itself. For CINIC-10 this also
builds the decoded cache, so that jobs start without decoding PNG files. Needs internet access only when the
dataset is missing.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile

from mpisage.data import datasets
from mpisage.data.files import user_cache_dir
from mpisage.data.datasets import CINIC_DIRNAME, CINIC_URL, DATASETS, DataError, DataNotFound, load_dataset

# name -> (archive url, its md5 where one is published, the folder under ROOT that holds the dataset)
ARCHIVES = {
    "cifar10": (datasets._CIFAR["cifar10"][3], "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py"),
    "cifar100": (datasets._CIFAR["cifar100"][3], "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python"),
    # CINIC-10 publishes no checksum; the reader checks every image when it builds its cache.
    "cinic10": (CINIC_URL, None, CINIC_DIRNAME),
}


def download_and_unpack(name: str, root: str) -> str:
    """Download NAME's archive into ROOT, check it, unpack it into ROOT/<folder>; returns that folder."""
    url, md5, folder = ARCHIVES[name]
    dest = os.path.join(root, folder)
    if os.path.exists(dest):
        raise DataError(f"{name}: {dest} exists but is not a complete copy of the dataset; remove it and "
                        "run this again.")
    os.makedirs(root, exist_ok=True)
    archive = os.path.join(root, url.rsplit("/", 1)[-1])
    if not os.path.isfile(archive):
        print(f"[setup] downloading {url} into {root}", flush=True)
        datasets._download_file(url, archive)
    if md5 is not None and _md5(archive) != md5:
        os.remove(archive)
        raise DataError(f"{name}: {archive} has the wrong md5 (expected {md5}): a broken or changed download. "
                        "It was removed; run this again.")
    print(f"[setup] unpacking {archive} into {dest}", flush=True)
    # Unpacked into a temporary folder first, so that an interrupted run leaves no half dataset behind.
    staging = tempfile.mkdtemp(prefix=".unpack-", dir=root)
    try:
        _safe_extract(archive, staging)
        # CIFAR's archives hold their folder; CINIC-10's holds train/ valid/ test/ at the top.
        inner = os.path.join(staging, folder)
        os.rename(inner if os.path.isdir(inner) else staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    os.remove(archive)
    return dest


def _md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _safe_extract(archive: str, dest: str) -> None:
    """Unpack regular files and folders only, all inside `dest` (a tar can name ../ or absolute paths)."""
    try:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
                return
            members = tar.getmembers()  # Pythons without extraction filters: check by hand
            for m in members:
                if not (m.isfile() or m.isdir()) or os.path.isabs(m.name) or ".." in m.name.split("/"):
                    raise DataError(f"{archive}: refusing to unpack {m.name!r} (not a plain file inside "
                                    "the archive's folder); the download is not the dataset.")
            tar.extractall(dest, members=members)
    except tarfile.TarError as e:
        raise DataError(f"{archive}: cannot unpack it safely ({type(e).__name__}: {e}): it is damaged or not "
                        "the dataset's archive; remove it and run this again.") from e


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in DATASETS:
        print(f"usage: python -m mpisage.data.fetch {'|'.join(DATASETS)} [ROOT]", file=sys.stderr)
        return 2
    name, root = argv[0], (argv[1] if len(argv) > 1 else None)
    try:
        try:
            ds = load_dataset(name, root)
        except DataNotFound:
            if name not in ARCHIVES:
                raise
            download_and_unpack(name, root or user_cache_dir())
            ds = load_dataset(name, root)
    except (DataError, OSError) as e:  # OSError: the download or the disk
        print(f"[mpisage] {name}: {type(e).__name__}: {e}" if isinstance(e, OSError) else f"[mpisage] {e}",
              file=sys.stderr)
        return 1
    print(f"[setup] {ds.name}: {len(ds.train_y)} train / {len(ds.test_y)} test images, "
          f"{ds.in_channels}x{ds.image_size}x{ds.image_size}, {ds.num_classes} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
