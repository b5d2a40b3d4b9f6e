"""Named workloads (models + datasets + streams) and bring-your-own loaders.

    from apparate.zoo import get_workload
    w = get_workload("cifar10-resnet56", "../shared/data")
    stream = w.stream("camera-day", seed=0, n=2000)
"""

from apparate.zoo.bundles import load_bundle
from apparate.zoo.workload import Stream, StreamItem, Workload
from apparate.zoo.workloads import get_workload, list_workloads

__all__ = ["Stream", "StreamItem", "Workload", "get_workload", "list_workloads", "load_bundle"]
