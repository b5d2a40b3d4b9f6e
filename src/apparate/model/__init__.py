"""Torch side: sites, ramps, early-exit model, frozen-backbone training, profiling, bundles.

    from apparate.model import load_bundle, EarlyExitModel, find_sites, prepare_model
"""

from apparate.model.bundle import Bundle, BundleError, load_bundle, save_bundle
from apparate.model.early_exit import EarlyExitModel, EarlyExitOutput
from apparate.model.ramp_results import RampResult
from apparate.model.prepare import PrepareOptions, prepare_model, prepare_workload
from apparate.model.profiler import profile_latency
from apparate.model.ramps import RampSpec, build_ramps
from apparate.model.sites import Site, UntraceableModelError, find_sites
from apparate.model.training import TrainConfig, collect_activations, train_ramps

__all__ = [
    "Bundle", "BundleError", "load_bundle", "save_bundle", "EarlyExitModel", "EarlyExitOutput", "RampResult",
    "PrepareOptions", "prepare_model", "prepare_workload", "profile_latency", "RampSpec", "build_ramps",
    "Site", "UntraceableModelError", "find_sites", "TrainConfig", "collect_activations", "train_ramps",
]
