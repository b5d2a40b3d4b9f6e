"""Scale-out on Ray Serve: replicas that release early, one tuner that learns from all of them.

Ray is an optional extra (`pip install 'apparate[cluster]'`); only this package imports it, and
only its Ray-facing modules do (`tuner`, `link`, `replica`, `launch`), so the rest can be used
and tested without Ray. Modules, one job each:

    options     ClusterOptions: replicas, CPUs, autoscaling bounds -> Serve's deployment options
    remote      RemotePolicy: a replica's policy; feedback goes to the tuner, Configs come back
                versioned, and an older one is never applied after a newer one
    tuner_core  TunerCore: the cluster's controller (the serving ControlLoop's, without its
                thread) fed by every replica; Config numbering; checkpoints in --state-dir format
    metrics     the tuner's Prometheus metrics; every replica's metrics merged under a label
    tuner       the Ray actor around TunerCore (a named actor, restarted by Ray from its checkpoint)
    link        a replica's connection to the tuner: feedback off the critical path, Configs by
                long-poll, re-registration when the tuner restarts, "unreachable" when it is gone
    replica     the Serve deployment: our engine and the same HTTP API on every replica
    launch      ClusterOptions, deploy() and `apparate serve --ray`

See docs/cluster.md.
"""

TUNER_NAME = "apparate-tuner"
NAMESPACE = "apparate"
