"""`apparate serve BUNDLE`: serve a prepared model over HTTP (Open Inference Protocol v2; over gRPC
too with --grpc-port) with early exits, batching, live tuning, Prometheus metrics and checkpointed
state. See docs/serve.md.
"""

from __future__ import annotations

import argparse

from apparate.devices import add_device_arg


def register(sub: argparse._SubParsersAction) -> None:
    from apparate.bench.experiment_args import add_set_arg
    from apparate.core.settings import Settings

    defaults = Settings()
    p = sub.add_parser("serve", help="serve a bundle over HTTP with early exits (Open Inference Protocol v2)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle directory made by `apparate prepare`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed; default 8000)")
    p.add_argument("--grpc-port", type=int,
                   help="also serve OIP v2 over gRPC on this port (0: any free port, in the port file; "
                        "needs the grpc extra); default: HTTP only")
    p.add_argument("--allow-load", action="store_true",
                   help="accept Triton's load verb (POST /v2/repository/models/NAME/load with parameters "
                        "{\"bundle\": PATH}, or gRPC RepositoryModelLoad): swap in a re-prepared bundle of the "
                        "same model without a restart")
    p.add_argument("--model-name", help="name in the URL /v2/models/NAME (default: the bundle's workload)")
    p.add_argument("--policy", default="apparate",
                   help="apparate: ramps and thresholds adapt within the budget; apparate-all: the same with a "
                        "budget admitting every ramp; static: the initial placement, never adapted; branchynet / "
                        "branchynet+: every ramp, one shared / per-ramp thresholds tuned once on the bootstrap; "
                        "vanilla: no ramps; apparate-learned: apparate on the learned exit rule's scores (the policies "
                        "replay runs, apparate.policies)")
    p.add_argument("--slo-ms", type=float, help="latency objective per request (default: 3x a full batch, >= 50 ms)")
    p.add_argument("--batching", choices=("clockwork", "tfserving"), default="clockwork")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--batch-timeout-ms", type=float, default=5.0, help="tfserving: batch timeout")
    p.add_argument("--max-queue", type=int, default=1024, help="inputs waiting before new requests get 503")
    p.add_argument("--no-shed", action="store_true",
                   help="serve requests late instead of answering 503 when they can no longer meet the SLO")
    p.add_argument("--early-stop", action="store_true",
                   help="while requests wait, inputs released at a ramp leave their batch's pass (a batch whose "
                        "inputs all left stops); a sampled share still runs to the end for unbiased feedback")
    p.add_argument("--stop-sample", type=float, default=0.05,
                   help="with --early-stop: the share of released inputs that still run to the end, weighted by "
                        "its inverse in the feedback (pick 1/k; default %(default)s)")
    p.add_argument("--accuracy-constraint", type=float, default=defaults.accuracy_constraint,
                   help="max share of answers that may differ from the original model's (default %(default)s)")
    p.add_argument("--ramp-budget", type=float, default=defaults.ramp_budget,
                   help="max latency the active ramps may add, as a share of the model's (default %(default)s)")
    add_set_arg(p)
    p.add_argument("--state-dir", help="checkpoint the controller state here (and restore it on start)")
    p.add_argument("--checkpoint-every", type=float, default=30.0, help="seconds between checkpoints")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores but one, left to HTTP)")
    p.add_argument("--data-dir", help="data directory for zoo models (default: $APPARATE_DATA, else ../shared/data)")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="request body limit (413 beyond)")
    p.add_argument("--max-inputs", type=int, default=64, help="inputs per request")
    p.add_argument("--long-text", choices=("truncate", "reject"), default="truncate",
                   help="text over --max-tokens: cut it, or refuse the request (400)")
    p.add_argument("--max-tokens", type=int, help="text token limit (default: the encoder's, 128 for MiniLM)")
    c = p.add_argument_group("connections (see docs/serve.md: what the server does past capacity)")
    c.add_argument("--max-connections", type=int, default=1024,
                   help="open connections; beyond, the longest idle one is closed, else 503 (health exempt)")
    c.add_argument("--idle-timeout", type=float, default=5.0, help="seconds a keep-alive connection may stay idle")
    c.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's head (line and headers)")
    c.add_argument("--body-timeout", type=float, default=30.0, help="seconds a client has to send a request's body")
    p.add_argument("--access-log", action="store_true")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--port-file", help="write {url, port, pid} as JSON here once listening")
    add_device_arg(p)
    r = p.add_argument_group("Ray Serve (needs the cluster extra: pip install 'apparate[cluster]'; see docs/cluster.md)")
    r.add_argument("--ray", action="store_true",
                   help="serve on Ray Serve: replicas behind Serve's HTTP proxy, one tuner for all of them")
    r.add_argument("--replicas", type=int, default=2, help="replicas (the initial number when autoscaling; default 2)")
    r.add_argument("--replica-cpus", type=float, default=1.0,
                   help="CPUs Ray reserves per replica; its torch threads default to this (default 1)")
    r.add_argument("--min-replicas", type=int, help="autoscale between --min-replicas and --max-replicas")
    r.add_argument("--max-replicas", type=int)
    r.add_argument("--address", help="join this Ray cluster ('auto', or ray://HOST:10001); default: start one here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from apparate.cli import UserError

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {args.host}: the server is reachable from other machines")
    if args.max_batch < 1:
        raise UserError("--max-batch must be at least 1")
    if args.max_connections < 1:
        raise UserError("--max-connections must be at least 1")
    for flag in ("idle_timeout", "header_timeout", "body_timeout"):
        if not getattr(args, flag) > 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive")
    from apparate.devices import resolve_device
    from apparate.policies import check_servable

    resolve_device(args.device)  # no CUDA: a clear error before the bundle loads

    try:
        check_servable(args.policy)
    except ValueError as e:
        raise UserError(f"--policy: {e}") from None
    if args.policy == "apparate+heads" and (args.early_stop or args.ray):
        raise UserError("--policy apparate+heads: its heads read every input's features to the end, and the "
                        "learned heads are not shared across replicas yet: no --early-stop or --ray")
    if args.early_stop and args.policy == "apparate-learned":
        raise UserError("--early-stop runs with the confidence rule only: apparate-learned keeps every input to "
                        "the end (its evidence compares consecutive inputs' answers); use --policy apparate")
    from apparate.serve.early_stop import check_sample

    try:
        check_sample(args.stop_sample)
    except ValueError as e:
        raise UserError(f"--stop-sample: {e}") from None
    from apparate.bench.experiment_args import settings_changes

    try:
        settings_changes(args)
    except (TypeError, ValueError) as e:
        raise UserError(f"--set: {e}") from None
    if args.ray:
        return _serve_on_ray(args)
    if args.address or args.min_replicas or args.max_replicas:
        raise UserError("--address, --min-replicas and --max-replicas need --ray")
    from apparate.serve.server import run as serve

    return serve(options_from_args(args))


def _serve_on_ray(args: argparse.Namespace) -> int:
    from apparate.cli import UserError

    if args.policy == "apparate-learned":
        raise UserError("--ray: the learned exit rule is not served on a cluster yet (its evidence model would "
                        "have to move to the tuner); use --policy apparate")
    from apparate.cluster.options import ClusterOptions

    try:
        options = ClusterOptions(replicas=args.replicas, replica_cpus=args.replica_cpus, min_replicas=args.min_replicas,
                                 max_replicas=args.max_replicas, address=args.address)
    except ValueError as e:
        raise UserError(f"--ray: {e}") from None
    try:
        from apparate.cluster.launch import run
    except ImportError as e:
        raise UserError(f"--ray needs Ray Serve: pip install 'apparate[cluster]' ({e})") from None
    if args.port == 0:  # Serve's proxy reports no bound port: pick a free one here
        import socket

        with socket.socket() as s:
            s.bind((args.host, 0))
            args.port = int(s.getsockname()[1])
    return run(options_from_args(args), options)


def options_from_args(args: argparse.Namespace):
    """The `ServeOptions` the flags ask for."""
    from apparate.bench.experiment_args import settings_changes
    from apparate.serve.server import ServeOptions

    return ServeOptions(
        bundle=args.bundle, host=args.host, port=args.port, model_name=args.model_name, policy=args.policy,
        slo_ms=args.slo_ms, batching=args.batching, max_batch=args.max_batch, batch_timeout_ms=args.batch_timeout_ms,
        max_queue=args.max_queue, shed=not args.no_shed, accuracy_constraint=args.accuracy_constraint,
        ramp_budget=args.ramp_budget, state_dir=args.state_dir, checkpoint_every_s=args.checkpoint_every,
        threads=args.threads, data_dir=args.data_dir, max_body_bytes=int(args.max_body_mb * (1 << 20)),
        max_inputs=args.max_inputs, long_text=args.long_text, max_tokens=args.max_tokens,
        access_log=args.access_log, log_level=args.log_level, port_file=args.port_file,
        max_connections=args.max_connections, idle_timeout_s=args.idle_timeout, header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout, grpc_port=args.grpc_port,
        allow_load=args.allow_load, device=args.device, early_stop=args.early_stop,
        stop_sample=args.stop_sample, settings_changes=tuple(settings_changes(args).items()))
