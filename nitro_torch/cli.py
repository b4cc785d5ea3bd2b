"""`nitro-torch serve [options]`, `nitro-torch chat [--url ...]`, `nitro-torch bench [...]`, `nitro-torch pull MODEL`,
`nitro-torch models`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from nitro_torch import __version__
from nitro_torch.config import Config, ConfigError, add_arguments, build_config


def config_from_args(args: argparse.Namespace) -> Config:
    options = {name: value for name, value in vars(args).items() if name not in ("command", "config", "handler")}
    return build_config(options, config_file=args.config)


def _serve(args: argparse.Namespace) -> int:
    from nitro_torch.server.app import run_server

    run_server(config_from_args(args))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from nitro_torch.terminal_chat import run_chat

    return run_chat(args)


def _bench(args: argparse.Namespace) -> int:
    from nitro_torch.bench.command import run_bench

    return run_bench(args)


def _pull(args: argparse.Namespace) -> int:
    from nitro_torch.model_commands import run_pull

    return run_pull(args)


def _models(args: argparse.Namespace) -> int:
    from nitro_torch.model_commands import run_models

    return run_models(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nitro-torch", description="OpenAI-compatible LLM server on PyTorch")
    parser.add_argument("--version", action="version", version=f"nitro-torch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="serve the OpenAI-compatible HTTP API",
        epilog="--model ORG/NAME serves a Hugging Face Hub model, downloading it into the HF cache first when it "
               "is not there (HF_TOKEN for gated ones; HF_HUB_OFFLINE=1: the cache only). "
               "--model none starts without a model, as Nitro did: load one later with "
               "POST /inferences/llamacpp/loadmodel (models can be switched the same way while the server runs).",
    )
    add_arguments(serve)
    serve.set_defaults(handler=_serve)

    from nitro_torch.bench.command import add_bench_arguments
    from nitro_torch.model_commands import add_models_arguments, add_pull_arguments
    from nitro_torch.terminal_chat import add_chat_arguments

    chat = commands.add_parser("chat", help="chat with a running server in the terminal (streams; /reset, /system)")
    add_chat_arguments(chat)
    chat.set_defaults(handler=_chat)
    bench = commands.add_parser("bench", help="benchmark a running server (--url) or an in-process engine")
    add_bench_arguments(bench)
    bench.set_defaults(handler=_bench)
    pull = commands.add_parser("pull", help="download a hub model into the Hugging Face cache (nothing else), "
                                            "e.g. for an image or an air-gapped machine")
    add_pull_arguments(pull)
    pull.set_defaults(handler=_pull)
    models = commands.add_parser("models", help="list the models in the Hugging Face cache: sizes, and the "
                                                "--model names that serve them")
    add_models_arguments(models)
    models.set_defaults(handler=_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (ConfigError, FileNotFoundError) as exc:  # bad options, or a model that is not there (or not fetched)
        parser.exit(2, f"nitro-torch: error: {exc}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
