"""Data layer: NIH tables, images, splits, synthetic data, datasets."""
