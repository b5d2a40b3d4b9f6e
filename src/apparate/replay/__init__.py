"""Replay: the discrete-event simulator (a recording's outputs through a batcher and a policy, on
an arrival trace) and the summary of a run. Pure numpy: the recording, the bundles and the plots
belong to `apparate.bench`, the batchers to `apparate.core.batchers`, the traces to
`apparate.zoo.traces`.
"""
