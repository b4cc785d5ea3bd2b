"""`nitro-torch pull [MODEL]` (download a hub model into the Hugging Face cache, nothing else: for images, init
containers and air-gapped preparation) and `nitro-torch models` (what the cache holds, and what of it serves), as
`ollama pull` / `ollama list`. Neither imports torch."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from nitro_torch.config import CONFIG_ENV, ConfigError, build_config


def add_pull_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="ORG/NAME[@REVISION] or ORG/NAME-GGUF:QUANT (default: the --model the configuration "
                             f"names: --config, ${CONFIG_ENV} or $NITRO_MODEL, as `serve` reads it)")
    parser.add_argument("--config", help=f"YAML file of serve options whose `model` is pulled [env {CONFIG_ENV}]")
    parser.add_argument("--hf-token-file", default=None,
                        help="file holding the Hugging Face token for gated or private models (default: $HF_TOKEN, "
                             "or the token of `hf auth login`)")


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON list instead of the table")


def run_pull(args: argparse.Namespace) -> int:
    from nitro_torch.models.hub import fetch_hub_model
    from nitro_torch.models.hub_names import NOT_HUB_NAMES, hub_name_of

    config = build_config({"model": args.model, "hf_token_file": args.hf_token_file}, config_file=args.config)
    model = config.model.model
    if model in NOT_HUB_NAMES:
        print(f"nothing to pull: --model {model} is {'the embedded model' if model == 'default' else 'no model'}")
        return 0
    name = hub_name_of(model)
    if name is None:
        raise ConfigError(f"{model!r} is a local path, not a hub model name: pull takes ORG/NAME[@REVISION] or "
                          "ORG/NAME-GGUF:QUANT")
    hub_model = fetch_hub_model(name, hf_token_file=config.model.hf_token_file, progress=True, refresh=True)
    where = hub_model.gguf_parts[0] if hub_model.gguf else hub_model.snapshot
    print(f"{name} is in the Hugging Face cache: {where}")
    return 0


def run_models(args: argparse.Namespace) -> int:
    from nitro_torch.models.hub_cache import hf_hub_cache_dir, list_cached
    from nitro_torch.models.hub_errors import size_text

    cache = hf_hub_cache_dir()
    repos = list_cached(cache)
    if args.json:
        print(json.dumps({"cache": str(cache), "models": [dataclasses.asdict(repo) for repo in repos]}, indent=2))
        return 0
    print(f"Hugging Face cache: {cache}", file=sys.stderr)
    if not repos:
        print("no models yet: `nitro-torch pull ORG/NAME` downloads one", file=sys.stderr)
        return 0
    rows = [("MODEL", "SIZE", "SERVABLE")]
    for repo in repos:
        servable = f"yes ({repo.note}): {', '.join(repo.servable)}" if repo.servable else f"no: {repo.note}"
        rows.append((repo.name, size_text(repo.size_bytes), servable))
    widths = [max(len(row[column]) for row in rows) for column in range(2)]
    for name, size, servable in rows:
        print(f"{name:<{widths[0]}}  {size:>{widths[1]}}  {servable}")
    return 0
