"""Exceptions raised by the dataset layer.

Every message is one line that names the offending file, column or value, so command-line tools can print it
as is and exit with code 2.
"""


class DatasetError(Exception):
    """Base class: any problem with the data a user pointed the engine at."""


class UnknownDatasetError(DatasetError):
    """A dataset name that is not registered."""


class MissingFileError(DatasetError):
    """A file or folder the layout requires does not exist."""


class CorruptImageError(DatasetError):
    """An image file exists but cannot be decoded."""


class MissingColumnError(DatasetError):
    """A CSV file lacks a column the layout requires."""


class UnknownLabelError(DatasetError):
    """A label value outside the layout's class list."""


class EmptySplitError(DatasetError):
    """A split (train/val/test or a label fraction of it) has no images."""


class TooFewClassesError(DatasetError):
    """Labels that cannot train or score a classifier: fewer than two classes, or a class without a labeled
    training image."""
