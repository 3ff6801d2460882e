"""anondrop: a watched-folder DICOM de-identification daemon."""

__version__ = "0.1.0"
