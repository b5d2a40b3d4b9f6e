"""`apparate generate PROMPT`: decode with SmolLM2-135M-Instruct and token ramps tuned online,
printing each token as it is released; `--serve` instead serves `/v1/completions` (streaming)
on 127.0.0.1. Ramps are built and cached on first use (minutes; see docs/generate.md).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from apparate.bench.generate import add_tuner_args

    p = sub.add_parser("generate", help="decode a prompt with per-token early exits, or serve /v1/completions",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help="the user's message (omit with --serve)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens to generate (default 48)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--serve", action="store_true", help="serve /v1/completions instead")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-tokens-limit", type=int, default=256, help="largest max_tokens a request may ask (default 256)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="--serve: most sequences decoded together in one step (default 8; 1 decodes one at a time)")
    add_tuner_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from apparate import paths
    from apparate.cli import UserError
    from apparate.generate.control import build_tuner
    from apparate.generate.lm import missing_extra

    if args.serve == bool(args.prompt):
        raise UserError("give a PROMPT, or --serve (not both)")
    if args.max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    if args.max_batch < 1:
        raise UserError("--max-batch must be at least 1")
    why = missing_extra()
    if why:
        raise UserError(why)
    lm, _, _, tuner = build_tuner(paths.data_dir(args.data_dir), threads=args.threads, train_prompts=args.train_prompts,
                                  accuracy_constraint=args.accuracy_constraint, ramp_budget=args.ramp_budget,
                                  cost_reps=10)
    print(tuner.mode(), file=sys.stderr)
    if args.serve:
        import uvicorn

        from apparate.generate.server import create_app
        app = create_app(tuner, max_tokens_limit=args.max_tokens_limit, max_batch=args.max_batch)
        print(f"serving at http://{args.host}:{args.port}/v1/completions (up to {args.max_batch} sequences per step)",
              file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        return 0
    emitted: list[int] = []
    shown = [""]

    def on_emit(t):
        emitted.append(t.token)
        text = lm.tokenizer.decode(emitted, skip_special_tokens=True)
        sys.stdout.write(text[len(shown[0]):])
        sys.stdout.flush()
        shown[0] = text

    from apparate.generate.decode import Sampling

    dec = tuner.generate(lm.chat_ids(args.prompt), args.max_tokens, on_emit=on_emit,
                         sampling=Sampling(args.temperature, args.seed))
    n = len(dec.tokens)
    ramp = sum(t.exit < len(t.conf) for t in dec.tokens)
    agree = sum(t.token == t.deep for t in dec.tokens)
    print(f"\n{n} tokens in {dec.wall_s:.2f} s; released at a ramp: {ramp}; agree with the deep model: {agree}",
          file=sys.stderr)
    return 0
