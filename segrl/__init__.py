"""segrl: label-efficient semantic segmentation at scale on Ray."""

__version__ = "0.1.0"
