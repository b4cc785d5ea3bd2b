"""What a hub model name means, and which of a repository's files serving it needs.

A name is `ORG/NAME[@REVISION][:QUANT]`, optionally written `hf.co/ORG/NAME...` as Ollama does. `:QUANT` picks a
GGUF file of the repository the way llama.cpp's `-hf repo:quant` and Ollama do (`bartowski/X-GGUF:Q4_K_M`).
Pure functions of names and file lists: no network, no cache.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

HUB_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "huggingface.co/", "hf.co/")
NOT_HUB_NAMES = frozenset({"default", "none"})
DEFAULT_QUANT = "Q4_K_M"
"""What `ORG/NAME-GGUF` without `:QUANT` serves when the repository has it (llama.cpp's and Ollama's default)."""

_SEGMENT = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_NAME = re.compile(rf"(?P<repo>(?:{_SEGMENT}/)?{_SEGMENT})(?:@(?P<revision>[^\s:@]+))?(?::(?P<quant>[A-Za-z0-9_.-]+))?")
_MAX_REPO_ID = 96
_SPLIT_PART = re.compile(r"-(\d{5})-of-(\d{5})$")
_QUANT_TAG = re.compile(r"(?i)^(?:UD-)?(?:I?Q\d(?:_[A-Z0-9]+)*|TQ\d_\d|B?F16|F32|MXFP4(?:_MOE)?)$")

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
SIDE_FILES = frozenset({
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "tiktoken.model", "chat_template.jinja", "chat_template.json",
})
"""Besides config.json and the weights: what transformers reads to build the tokenizer, chat template and
generation defaults of a causal LM."""
CHAT_TEMPLATE_FOLDER = "additional_chat_templates/"


@dataclass(frozen=True)
class HubName:
    repo_id: str
    revision: str | None = None  # None: the default branch ("main")
    quant: str | None = None  # a GGUF quant tag, e.g. "Q4_K_M"

    @property
    def ref(self) -> str:
        return self.revision or "main"

    def __str__(self) -> str:
        revision = f"@{self.revision}" if self.revision else ""
        quant = f":{self.quant}" if self.quant else ""
        return f"{self.repo_id}{revision}{quant}"


def parse_hub_name(text: str) -> HubName | None:
    """The hub name `text` spells, or None when it is not one (paths, 'default', 'none', malformed names)."""
    if text in NOT_HUB_NAMES:
        return None
    for prefix in HUB_PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    match = _NAME.fullmatch(text)
    if match is None:
        return None
    repo = match["repo"]
    if len(repo) > _MAX_REPO_ID or "--" in repo or ".." in repo or repo.endswith(".git"):
        return None
    return HubName(repo, match["revision"], match["quant"])


def hub_name_of(model: str) -> HubName | None:
    """The hub name a --model value means, or None for the other kinds of source: 'default', 'none', a .gguf
    file, an existing path, or something written like a path (a local path always wins over a hub name)."""
    if model in NOT_HUB_NAMES or model.lower().endswith(".gguf"):
        return None
    if model.startswith(HUB_PREFIXES):
        return parse_hub_name(model)
    if looks_like_path(model) or Path(model).expanduser().exists():
        return None
    return parse_hub_name(model)


def looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~", ".\\")) or model.count("/") > 1 or "\\" in model


# safetensors models ---------------------------------------------------------------------------------------------


def safetensors_files(repo_files: Iterable[str]) -> list[str] | None:
    """What serving a transformers safetensors model downloads, config.json last (its presence in a snapshot then
    marks a finished download); None when the repository has no such model. Shards are the `model-*` files
    save_pretrained writes; sub-folders (original/, onnx/, ...) and other formats are left out."""
    top = [name for name in repo_files if "/" not in name]
    if CONFIG_FILE not in top:
        return None
    if INDEX_FILE in top:
        weights = [INDEX_FILE, *sorted(n for n in top if n.startswith("model-") and n.endswith(".safetensors"))]
    elif SINGLE_WEIGHTS_FILE in top:
        weights = [SINGLE_WEIGHTS_FILE]
    else:
        return None
    templates = sorted(n for n in repo_files if n.startswith(CHAT_TEMPLATE_FOLDER) and n.endswith(".jinja"))
    return [*sorted(n for n in top if n in SIDE_FILES), *templates, *weights, CONFIG_FILE]


def weight_formats(repo_files: Iterable[str]) -> list[str]:
    """The weight-like files of a repository, for an error that says what it has instead (at most 8 shown)."""
    suffixes = (".bin", ".pt", ".pth", ".safetensors", ".gguf", ".onnx", ".h5", ".msgpack", ".ckpt", ".npz")
    found = sorted({_collapse_shard(name) for name in repo_files if name.lower().endswith(suffixes)})
    return found[:8] + ([f"... ({len(found) - 8} more)"] if len(found) > 8 else [])


def _collapse_shard(name: str) -> str:
    return re.sub(r"-\d{5}-of-(\d{5})", r"-*-of-\1", name)


# GGUF quants ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufModel:
    """One model file of a GGUF repository: a single .gguf, or the parts of a split one, in order."""

    stem: str  # the path without ".gguf" and without a split suffix
    quant: str | None  # its tag, upper case (None when the name carries none)
    parts: tuple[str, ...]
    expected_parts: int = 1

    @property
    def complete(self) -> bool:
        return len(self.parts) == self.expected_parts

    @property
    def label(self) -> str:
        return self.quant or PurePosixPath(self.stem).name


def gguf_models(repo_files: Iterable[str]) -> list[GgufModel]:
    """The GGUF models of a file list, grouped by split parts (vision projectors, mmproj-*, left out)."""
    groups: dict[str, list[tuple[int, int, str]]] = {}
    for name in repo_files:
        path = PurePosixPath(name)
        if path.suffix.lower() != ".gguf" or "mmproj" in path.name.lower():
            continue
        stem = name[: -len(".gguf")]
        split = _SPLIT_PART.search(stem)
        index, count = (int(split[1]), int(split[2])) if split else (1, 1)
        groups.setdefault(stem[: split.start()] if split else stem, []).append((index, count, name))
    models = []
    for stem, parts in sorted(groups.items()):
        parts.sort()
        names = tuple(name for _, _, name in parts)
        models.append(GgufModel(stem, quant_tag(stem), names, max(count for _, count, _ in parts)))
    return models


def quant_tag(stem: str) -> str | None:
    """The quant tag at the end of a GGUF file name: `Llama-3.2-1B-Instruct-Q4_K_M` -> Q4_K_M."""
    name = PurePosixPath(stem).name
    tokens = re.split(r"[-.]", name)
    for count in (2, 1):  # "UD-Q4_K_XL" before "Q4_K_XL"
        if len(tokens) > count and _QUANT_TAG.match(candidate := "-".join(tokens[-count:])):
            return candidate.upper()
    return None


def quants_of(models: Iterable[GgufModel]) -> list[str]:
    return sorted({model.label for model in models})


def matching_gguf(models: list[GgufModel], quant: str | None) -> list[GgufModel]:
    """The models `quant` names (the default choice without one): exact tags first, else names that contain the
    tag as a whole word (case-insensitive, as llama.cpp matches it)."""
    if quant is None:
        default = [m for m in models if m.quant == DEFAULT_QUANT]
        return default or (models if len(models) == 1 else [])
    wanted = quant.upper()
    exact = [m for m in models if m.quant == wanted]
    if exact:
        return exact
    word = re.compile(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])", re.IGNORECASE)
    return [m for m in models if word.search(PurePosixPath(m.stem).name)]
