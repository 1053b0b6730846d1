"""Data sets read from local files (nothing is downloaded), transforms and splits.

``load_dataset(name, data_dir)`` returns ready ``DataSplits`` (train / train_eval / val / test
datasets and a ``DatasetInfo``); ``available_datasets()`` lists the names.
"""

from labelkit_ext.data.core import (
    ArraySplit,
    DatasetInfo,
    FileSplit,
    ImageFileDataset,
    RawDataset,
    TensorImageDataset,
    dataset_targets,
    holdout_indices,
    resize_images,
)
from labelkit_ext.data.mosaic import MosaicStats, class_prior, make_digit_mosaic
from labelkit_ext.data.nih import NIH_FINDINGS
from labelkit_ext.data.paths import DATA_ENV, DataNotFoundError, default_data_dir, resolve_data_dir
from labelkit_ext.data.registry import (
    DATASETS,
    DatasetSpec,
    DataSplits,
    available_datasets,
    load_dataset,
)
from labelkit_ext.data.transforms import ImageTransform, build_transform, channel_stats

__all__ = [
    "DATASETS",
    "DATA_ENV",
    "NIH_FINDINGS",
    "ArraySplit",
    "DataNotFoundError",
    "DataSplits",
    "DatasetInfo",
    "DatasetSpec",
    "FileSplit",
    "ImageFileDataset",
    "MosaicStats",
    "RawDataset",
    "TensorImageDataset",
    "available_datasets",
    "ImageTransform",
    "build_transform",
    "channel_stats",
    "class_prior",
    "dataset_targets",
    "default_data_dir",
    "holdout_indices",
    "load_dataset",
    "make_digit_mosaic",
    "resize_images",
    "resolve_data_dir",
]
