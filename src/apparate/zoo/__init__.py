"""Named workloads: models, datasets and streams."""
