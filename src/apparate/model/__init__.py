"""Torch side: sites, ramps, early-exit model, training, profiling, bundles."""
