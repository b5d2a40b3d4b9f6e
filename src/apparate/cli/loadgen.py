"""`apparate loadgen`: open-loop HTTP load from a trace, with latency, throughput, goodput, exits
and accuracy reports.

    apparate loadgen http://127.0.0.1:8000 --stream cifar10-vehicle-resnet56 --rate 200 --duration 60
    apparate loadgen URL_A URL_B ...          same trace to both servers, one after the other; ratios B/A
    apparate loadgen --compare BUNDLE ...     starts a vanilla and an apparate server on free loopback
                                              ports, serves the same trace to each, prints ratios
    apparate loadgen --compare BUNDLE --early-stop ...   and a third, apparate with early stop

See docs/serve.md for what each figure means.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from apparate.zoo import trace_specs

    p = sub.add_parser("loadgen", help="open-loop HTTP load generator (compare vanilla and apparate servers)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("urls", nargs="*", help="server URL(s): http://HOST:PORT (with --model) or .../v2/models/NAME")
    p.add_argument("--compare", metavar="BUNDLE", help="start a vanilla and an apparate server for BUNDLE and compare")
    p.add_argument("--model", help="model name (default: the --stream workload's name)")
    p.add_argument("--stream", required=True, metavar="WORKLOAD", help="zoo workload whose stream supplies the inputs")
    p.add_argument("--stream-name", help="stream of the workload (default: camera-day for images, sst2-dev for text), "
                                         "or your own: video:PATH (footage, decoded at the workload's frame size), "
                                         "images:PATH (an image folder or a CSV manifest), csv:PATH (texts)")
    p.add_argument("--trace", default="poisson", help=trace_specs.HELP + " (default poisson)")
    p.add_argument("--rate", type=float, help="mean requests per second (required for synthetic traces unless --fps "
                                              "or a video:PATH stream; a real trace is rescaled to it when given)")
    p.add_argument("--fps", type=float, help="a camera: fixed-rate trace at this many frames per second "
                                             "(video:PATH default: the first clip's own frame rate)")
    p.add_argument("--duration", type=float, help="seconds of measured load per run (default 30; a real trace: "
                                                  "all of it, cut or repeated to --duration when given)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of unmeasured load first (fixed rate)")
    p.add_argument("--cv", type=float, default=2.0, help="gamma trace: coefficient of variation of the gaps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1, help="comparisons: alternate A B A B ... this many times")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a request counts as failed")
    p.add_argument("--data-dir", help="data directory (default: $APPARATE_DATA, else ../shared/data)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", help="also write the summaries to this JSON file")
    p.add_argument("--json-tensors", action="store_true",
                   help="send image pixels as JSON numbers instead of binary tensor data")
    srv = p.add_argument_group("servers started by --compare (passed to `apparate serve`)")
    srv.add_argument("--slo-ms", type=float)
    srv.add_argument("--max-batch", type=int)
    srv.add_argument("--batching", choices=("clockwork", "tfserving"))
    srv.add_argument("--threads", type=int)
    srv.add_argument("--accuracy-constraint", type=float)
    srv.add_argument("--early-stop", action="store_true",
                     help="also start apparate with --early-stop (reported as apparate-stop)")
    srv.add_argument("--serve-arg", action="append", default=[], help="any other `apparate serve` flag (repeatable)")
    srv.add_argument("--server-log", help="directory for the servers' logs (default: a temporary one)")
    p.set_defaults(func=run)


def _serve_args(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for flag, v in (("--slo-ms", args.slo_ms), ("--max-batch", args.max_batch), ("--batching", args.batching),
                    ("--threads", args.threads), ("--accuracy-constraint", args.accuracy_constraint),
                    ("--data-dir", args.data_dir)):
        if v is not None:
            out += [flag, str(v)]
    for extra in args.serve_arg:
        out += extra.split()
    return out


def run(args: argparse.Namespace) -> int:
    import json
    import shlex
    import sys

    from apparate.cli import UserError
    from apparate.client import loadgen as lg

    if args.compare and args.urls:
        raise UserError("give either server URLs or --compare BUNDLE, not both")
    if not args.compare and not args.urls:
        raise UserError("give a server URL (or two to compare), or --compare BUNDLE")
    if len(args.urls) > 2:
        raise UserError("at most two URLs")
    if args.rounds < 1:
        raise UserError("--rounds must be at least 1")
    from apparate.zoo import trace_specs
    from apparate.zoo.own_streams import check_stream
    from apparate.zoo.video import is_video_stream, probe_all

    check_stream(args.stream_name)  # an unreadable file or malformed row fails before any server starts
    if is_video_stream(args.stream_name):
        infos = probe_all(args.stream_name[len("video:"):])
        if not args.fps and args.rate is None:
            args.fps = infos[0].fps
    if args.fps:
        args.trace, args.rate = "fixed", args.fps
    trace_specs.parse(args.trace)
    real = trace_specs.is_real(args.trace)
    if args.rate is None and not real:
        raise UserError("give --rate (requests per second) or --fps (a camera's frame rate)")
    fitted = lg.fitted_trace(args.trace, args.rate, args.duration, args.seed, args.cv, args.data_dir)
    times = fitted.times
    if len(times) == 0:
        raise UserError("the trace is empty: raise --rate or --duration")
    rate = args.rate or fitted.rate  # the warm-up runs at the trace's mean rate
    n_items = len(times) + int(args.warmup * rate)
    print(f"trace {fitted.note if real else args.trace}: {len(times)} requests over {float(times[-1]):.4g} s "
          f"(mean {fitted.rate:.4g}/s, seed {args.seed}); "
          f"inputs: {args.stream} stream {args.stream_name or '(default)'}", flush=True)
    payloads = lg.stream_payloads(args.stream, args.stream_name, n_items, args.data_dir, args.seed,
                                  binary=not args.json_tensors)
    model = args.model or args.stream
    procs = []
    try:
        if args.compare:
            from apparate.client.launch import start_server

            extra = _serve_args(args)
            targets = []
            servers = [("vanilla", "vanilla", []), ("apparate", "apparate", [])]
            if args.early_stop:
                servers.append(("apparate-stop", "apparate", ["--early-stop"]))
            for name, policy, own in servers:
                proc, url = start_server(args.compare, policy, extra + own, args.server_log, name=name)
                procs.append(proc)
                targets.append((name, url))
            print("servers: " + ", ".join(f"{n} at {u}" for n, u in targets)
                  + (f" (apparate serve ... {' '.join(shlex.quote(a) for a in extra)})" if extra else ""), flush=True)
        else:
            targets = []
            for i, u in enumerate(args.urls):
                base, name = lg.model_url(u, model)
                targets.append((f"server {'AB'[i]}" if len(args.urls) == 2 else "server", base))
                model = name
        for _, base in targets:
            lg.wait_ready(base)
        results: dict[str, list] = {n: [] for n, _ in targets}
        order = [(n, b) for _ in range(args.rounds) for n, b in targets]
        for k, (name, base) in enumerate(order):
            res = lg.measure(name, base, model, times, payloads, args.warmup if k < len(targets) else 0.0, rate,
                             not args.no_progress, args.timeout)
            results[name].append(res)
            s = lg.summarize([res])
            print(f"  {name} run {len(results[name])}: {s['ok']}/{s['requests']} ok, p50 {s['p50_ms']:.1f} ms, "
                  f"{s['throughput']:.1f}/s", flush=True)
        summaries = [(n, lg.summarize(results[n])) for n, _ in targets]
        if args.compare:  # vanilla answers as the original model does: every answer can be checked
            for n, s in summaries:
                s["same_as_reference"] = lg.same_answers(results[n], results["vanilla"])
        how = ("one after the other" if args.rounds == 1 else f"alternating A B x{args.rounds}, pooled")
        print(f"\n{len(times)} requests per run, same trace and inputs for each server, {how}; "
              f"warm-up {args.warmup:g} s excluded")
        print(lg.format_report(summaries))
        print("\ncommand: apparate loadgen " + " ".join(shlex.quote(a) for a in sys.argv[2:]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({n: s for n, s in summaries}, f, indent=1, default=str)
    finally:
        if procs:
            from apparate.client.launch import stop_server

            for proc in procs:
                stop_server(proc)
    return 0
