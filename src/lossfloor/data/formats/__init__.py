"""User data files: ``.npz``, ``.npy`` (memory-mapped), image folders and EDM-style zips.

Every reader returns a :class:`RawData`: the first ``limit`` items in canonical layout
(N×C×H×W images or N×D vectors), unscaled, with optional int64 labels; every ``open_*`` an
:class:`Items` that reads them by rows. One module per kind of file: ``arrays`` (``.npz``,
``.npy``) and ``images`` (folders, zips), each stating its rules; ``items`` holds what they
share (the canonical layout of arrays, the labels' check). This package gives their public
names.
"""

from lossfloor.data.formats.arrays import (
    ArrayItems,
    NpyFileItems,
    load_npy,
    load_npz,
    open_npy,
)
from lossfloor.data.formats.images import (
    IMAGE_SUFFIXES,
    LABELS_FILE,
    ImageItems,
    load_edm_zip,
    load_image_folder,
    open_edm_zip,
    open_image_folder,
)
from lossfloor.data.formats.items import Items, RawData, canonical_array, check_labels

__all__ = [
    "IMAGE_SUFFIXES",
    "LABELS_FILE",
    "ArrayItems",
    "ImageItems",
    "Items",
    "NpyFileItems",
    "RawData",
    "canonical_array",
    "check_labels",
    "load_edm_zip",
    "load_image_folder",
    "load_npy",
    "load_npz",
    "open_edm_zip",
    "open_image_folder",
    "open_npy",
]
