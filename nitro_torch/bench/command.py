"""`nitro-torch bench`: scripts/bench.py's benchmark in-process, or a running server over HTTP (`--url`).

Imported by the CLI when it builds its parser: only argparse (and the light `options`) at module level; torch and
the engines load inside `run_bench`.
"""

from __future__ import annotations

import argparse
import sys

from nitro_torch.bench.options import add_arguments


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Throughput benchmark: nitro_torch against the HF baselines in-process (the engines are "
                          "loaded here), or a running server over HTTP with --url. Same options as scripts/bench.py.")
    add_arguments(parser)


def preflight(args: argparse.Namespace) -> int | None:
    """With --url: the server must answer /v1/models before anything heavy loads. An exit status on failure (the
    reason printed as one line on stderr), else None."""
    if not args.url:
        return None
    from nitro_torch.bench.http_client import ServerError, probe

    try:
        probe(args.url, args.api_key)
    except ServerError as exc:
        print(f"nitro-torch bench: error: {exc}", file=sys.stderr)
        return 1
    return None


def run_bench(args: argparse.Namespace) -> int:
    from nitro_torch.bench.options import WORKLOAD_NAMES

    if args.workload not in WORKLOAD_NAMES:  # argparse checked it; a programmatic Namespace may not have been
        print(f"nitro-torch bench: error: unknown workload {args.workload!r}", file=sys.stderr)
        return 2
    status = preflight(args)
    if status is not None:
        return status
    from nitro_torch.bench.main import check_args, run

    error = check_args(args)
    if error:
        print(f"nitro-torch bench: error: {error}", file=sys.stderr)
        return 2
    from_command_line = sys.argv[1:2] == ["bench"]
    return run(args, reexec_argv=["-m", "nitro_torch.cli", *sys.argv[1:]] if from_command_line else None)
