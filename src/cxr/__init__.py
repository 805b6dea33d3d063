"""cxr: chest X-ray diagnosis on NIH ChestX-ray14 (CheXNet-style DenseNet121)."""

__version__ = "0.1.0"
