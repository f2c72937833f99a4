"""Nuclei data: converters, lazy registration by name, the SAM mapper, synthetic cytology.

Importing this package registers every data set of ``datasets.BUILTIN_DATASETS`` (nothing is read
from disk until a data set is loaded).
"""

from . import datasets  # noqa: F401  (registers the built-in data sets)
from .cnseg import CNSegLayoutError, convert_cnseg
from .datasets import (
    BUILTIN_DATASETS,
    DatasetFormatError,
    DatasetNotFoundError,
    EmptyDatasetError,
    default_dataset_root,
    register_all_nuclei_datasets,
    register_nuclei_coco,
)
from .image_io import ImageNotFoundError, ImageReadError, read_image_rgb
from .isbi2014 import ISBIFormatError, convert_isbi2014
from .mapper import DESSAMDatasetMapper
from .synthetic import generate_synthetic_dataset, make_synthetic_cytology

__all__ = [
    "BUILTIN_DATASETS",
    "CNSegLayoutError",
    "DESSAMDatasetMapper",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "EmptyDatasetError",
    "ISBIFormatError",
    "ImageNotFoundError",
    "ImageReadError",
    "convert_cnseg",
    "convert_isbi2014",
    "default_dataset_root",
    "generate_synthetic_dataset",
    "make_synthetic_cytology",
    "read_image_rgb",
    "register_all_nuclei_datasets",
    "register_nuclei_coco",
]
