"""Data layer: dataset layouts, synthetic data, transforms, P×K sampling, validation."""
