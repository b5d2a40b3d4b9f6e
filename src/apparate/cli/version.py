"""`apparate version`: the package version and the versions of what it runs on."""

from __future__ import annotations

import argparse
import platform


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("version", help="print the version of apparate and its main dependencies")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy

    from apparate import __version__

    print(f"apparate {__version__}")
    print(f"python {platform.python_version()}, numpy {numpy.__version__}")
    return 0
