"""Datasets, client partitions and batched transforms."""
from .datasets import DATASETS, DataError, DataNotFound, ImageDataset, convert_dataset, load_dataset
from .fixtures import write_cifar10_fixture, write_cifar100_fixture, write_cinic10_fixture, write_fashion_mnist_fixture
from .partition import PARTITIONS, label_histograms, partition
from .transforms import BatchTransform, eval_transform, train_transform

__all__ = [
    "DATASETS", "DataError", "DataNotFound", "ImageDataset", "convert_dataset", "load_dataset",
    "PARTITIONS", "partition", "label_histograms",
    "BatchTransform", "train_transform", "eval_transform",
    "write_cifar10_fixture", "write_cifar100_fixture", "write_cinic10_fixture", "write_fashion_mnist_fixture",
]
