"""The engines under test: nitro_torch and the two HF baselines, each a `System` with `load / start / generate /
stop / close`. A new system is one class here plus its entry in `SYSTEMS`
(`server`, over HTTP, lives in http_system.py)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from nitro_torch.bench.context import NITRO, SERVER, BenchContext
from nitro_torch.bench.models import load_hf_model, nitro_random_loaded_model
from nitro_torch.bench.options import NITRO_FP32
from nitro_torch.bench.workloads import BenchRequest

Outputs = list[list[int]]
HF_CB_CPU_DEFAULTS = {"page_size": 256, "num_blocks": 256, "max_batch_tokens": 2048}
"""hf-cb sizes on CPU, where transformers' automatic sizing would take ~60 % of RAM; on CUDA it sizes itself."""


class System:
    """One engine under test. `load` once (untimed), then per timed run: `start` (untimed: fresh engine state and
    a tiny warm-up request), `generate` (timed), `stop`. `close` at the end."""

    name: ClassVar[str]
    token_outputs: ClassVar[bool] = True
    """False when `generate` returns placeholders of the right length rather than the token ids (no --check)."""
    notes: list[str]

    def __init__(self, ctx: BenchContext) -> None:
        self.ctx = ctx
        self.notes = []

    @classmethod
    def unavailable(cls, ctx: BenchContext) -> str | None:
        """Why this system cannot run here (it is then skipped), or None."""
        return None

    @property
    def requests(self) -> list[BenchRequest]:
        return self.ctx.requests_for(self.name)

    def model_module(self) -> torch.nn.Module | None:
        """The loaded model, once `load` ran (its weight bytes feed the bandwidth roofline)."""
        return getattr(self, "model", None)

    def load(self) -> None: ...

    def start(self) -> None: ...

    def generate(self, requests: Sequence[BenchRequest]) -> Outputs:
        raise NotImplementedError

    def run_stats(self) -> dict[str, float] | None:
        """Client-side measurements of the last `generate` (latencies, errors), for systems that take them."""
        return None

    def stop(self) -> None: ...

    def close(self) -> None: ...

    def warmup(self) -> None:
        first = self.requests[0]
        self.generate([BenchRequest(first.prompt_token_ids[:8], 4)])


class HFStatic(System):
    """HF `model.generate` over static batches (left padding), in request order. Each batch runs to its largest
    `max_tokens`; only each request's own `max_tokens` count (the padding overshoot is not useful output)."""

    name = "hf-static"

    def load(self) -> None:
        self.model = load_hf_model(self.ctx.source)
        gen = self.model.generation_config
        self.pad_id = _pad_token_id(gen)
        # EOS ignored without suppressing it (as ignore_eos does): no EOS id means no EOS stopping criterion.
        # (`min_new_tokens` would mask the EOS logit instead and change the greedy tokens.)
        gen.eos_token_id = None
        gen.pad_token_id = self.pad_id

    def start(self) -> None:
        self.warmup()

    def generate(self, requests: Sequence[BenchRequest]) -> Outputs:
        outputs: Outputs = []
        size = self.ctx.workload.static_batch_size
        for i in range(0, len(requests), size):
            outputs.extend(self._generate_batch(requests[i : i + size]))
        return outputs

    def _generate_batch(self, batch: Sequence[BenchRequest]) -> Outputs:
        input_ids, attention_mask = left_pad([r.prompt_token_ids for r in batch], self.pad_id)
        device = self.ctx.source.device
        longest = max(r.max_tokens for r in batch)
        out = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=longest,
            do_sample=False,
        )
        new = out[:, input_ids.shape[1] :].tolist()
        return [tokens[: r.max_tokens] for tokens, r in zip(new, batch, strict=True)]

    def close(self) -> None:
        del self.model


def _pad_token_id(gen: Any) -> int:
    for candidate in (gen.pad_token_id, gen.eos_token_id):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


class HFContinuousBatching(System):
    """transformers' own continuous batching (paged cache, background thread): `add_request(ids,
    max_new_tokens=n, eos_token_id=-1)` per request (-1: no EOS ids, so requests run to max_new_tokens)."""

    name = "hf-cb"

    @classmethod
    def unavailable(cls, ctx: BenchContext) -> str | None:
        import transformers

        missing = [n for n in ("ContinuousBatchingConfig", "GenerationMixin") if not hasattr(transformers, n)]
        if not missing and not hasattr(transformers.GenerationMixin, "init_continuous_batching"):
            missing.append("GenerationMixin.init_continuous_batching")
        if missing:
            return (f"transformers {transformers.__version__} has no {' / '.join(missing)} "
                    "(the continuous batching API this benchmark drives, transformers >= 5.17)")
        return None

    def load(self) -> None:
        from transformers.generation.continuous_batching.utils import WorkloadHints

        args = self.ctx.args
        self.model = load_hf_model(self.ctx.source, attn_implementation=args.hf_cb_attn)
        self.generation_config = copy.deepcopy(self.model.generation_config)
        self.generation_config.do_sample = False
        requests = self.requests
        self.hints = WorkloadHints(
            max_prompt_length=max(len(r.prompt_token_ids) for r in requests),
            max_generated_length=max(r.max_tokens for r in requests),
            num_requests=len(requests),
        )
        self.sizes = self._sizes()
        shown = " ".join(f"{k}={v}" for k, v in self.sizes.items()) or "sizes chosen by transformers"
        self.notes.append(f"attn={args.hf_cb_attn} {shown}; EOS ignored per request (eos_token_id=-1)")
        self._serial = 0

    def _sizes(self) -> dict[str, Any]:
        """Given flags, else the CPU defaults on CPU; `page_size` is `block_size` before transformers 5.2x."""
        from transformers import ContinuousBatchingConfig

        args = self.ctx.args
        given = {"page_size": args.hf_cb_page_size, "num_blocks": args.hf_cb_num_blocks,
                 "max_batch_tokens": args.hf_cb_max_batch_tokens}
        defaults = HF_CB_CPU_DEFAULTS if self.ctx.source.device == "cpu" else {}
        sizes = {k: v if v is not None else defaults.get(k) for k, v in given.items()}
        fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
        if "page_size" not in fields and "block_size" in fields:
            sizes["block_size"] = sizes.pop("page_size")
        return {k: v for k, v in sizes.items() if v is not None and k in fields}

    def start(self) -> None:
        from transformers import ContinuousBatchingConfig

        self.manager = self.model.init_continuous_batching(
            generation_config=self.generation_config,
            continuous_batching_config=ContinuousBatchingConfig(**self.sizes),
            workload_hints=self.hints,
        )
        if self.ctx.source.device != "cpu" and hasattr(self.manager, "warmup"):
            self.manager.warmup()  # captures CUDA graphs: untimed, as continuous_batching_context_manager does
        with torch.inference_mode():
            self.manager.start()
        self.warmup()

    def generate(self, requests: Sequence[BenchRequest]) -> Outputs:
        manager = self.manager
        ids = []
        for r in requests:
            self._serial += 1
            ids.append(f"bench-{self._serial}")
            manager.add_request(r.prompt_token_ids, request_id=ids[-1], max_new_tokens=r.max_tokens, eos_token_id=-1)
        finished: dict[str, Any] = {}
        while len(finished) < len(ids):
            result = manager.get_result(timeout=1.0)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("hf-cb: the generation thread stopped before all requests finished")
                continue
            if result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"hf-cb: request {result.request_id} failed: {result.error}")
                finished[result.request_id] = result
        return [list(finished[i].generated_tokens) for i in ids]

    def stop(self) -> None:
        self.manager.stop(block=True)
        self.manager.destroy()
        del self.manager

    def close(self) -> None:
        del self.model


class Nitro(System):
    """nitro_torch's offline engine: the model loaded once (`load_model`, or a random-init `LoadedModel`), a fresh
    `LLMEngine(loaded, config)` per run, then blocking `engine.generate(prompts, params)`."""

    name = NITRO

    @classmethod
    def unavailable(cls, ctx: BenchContext) -> str | None:
        try:
            from nitro_torch.engine.engine import LLMEngine
        except Exception as exc:  # noqa: BLE001 - any import failure means "cannot run here"
            return f"nitro_torch.engine.engine.LLMEngine cannot be imported ({type(exc).__name__}: {exc})"
        if not hasattr(LLMEngine, "generate"):
            return "LLMEngine has no generate yet"
        if ctx.source.quantization != "none":
            from nitro_torch.config import ModelConfig

            if "quantization" not in {f.name for f in dataclasses.fields(ModelConfig)}:
                return "nitro_torch's ModelConfig has no 'quantization' option yet"
        return None

    def config_options(self) -> dict[str, Any]:
        source = self.ctx.source
        options: dict[str, Any] = {"device": source.device, "dtype": str(source.dtype).removeprefix("torch.")}
        if not source.built_in_memory:
            options["model"] = source.nitro_model
        if source.quantization != "none":
            options["quantization"] = source.quantization
        options["cpu_decode_compile"] = "off"  # decode-b1 compiles it at start-up, never during the runs
        options.update(self.ctx.workload.nitro_options)
        options.update(parse_key_values(self.ctx.args.nitro_opt))
        return options

    def load(self) -> None:
        from nitro_torch.config import build_config
        from nitro_torch.models.loader import load_model
        from nitro_torch.runner.attention import register_paged_attention

        options = self.config_options()
        self.notes.append("options: " + " ".join(f"{k}={v}" for k, v in options.items()))
        self.config = build_config(options, env={})
        impl = register_paged_attention()
        if self.ctx.source.built_in_memory:
            self.loaded = nitro_random_loaded_model(self.ctx.source, impl)
        else:
            self.loaded = load_model(self.config.model, attn_implementation=impl)

    def model_module(self) -> torch.nn.Module | None:
        return self.loaded.model

    def start(self) -> None:
        from nitro_torch.engine.engine import LLMEngine

        self.engine = LLMEngine(self.loaded, self.config)
        row_decode = self.engine.core.row_decode
        compiled_note = "one-request decode step compiled (before the runs) in"
        if row_decode is not None and row_decode.ready and not any(compiled_note in n for n in self.notes):
            self.notes.append(f"{compiled_note} {row_decode.seconds:.1f} s")
        self.warmup()

    def generate(self, requests: Sequence[BenchRequest]) -> Outputs:
        from nitro_torch.sampling import SamplingParams

        params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
        prompts = [list(r.prompt_token_ids) for r in requests]
        if self.ctx.workload.one_at_a_time:
            return [list(self.engine.generate([prompt], [param])[0]) for prompt, param in zip(prompts, params)]
        return [list(out) for out in self.engine.generate(prompts, params)]

    def stop(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None) or getattr(self.engine, "close", None)
        if callable(shutdown):
            shutdown()
        del self.engine

    def close(self) -> None:
        del self.loaded


class NitroFloatWeights(Nitro):
    """nitro_torch with --cpu-weights fp32: the float weights transformers computes with (token-identical), beside
    `nitro`'s packed CPU weights in the same run."""

    name = NITRO_FP32

    @classmethod
    def unavailable(cls, ctx: BenchContext) -> str | None:
        if ctx.source.device != "cpu":
            return "--cpu-weights applies on the CPU only (on a GPU this is the same as nitro)"
        return super().unavailable(ctx)

    def config_options(self) -> dict[str, Any]:
        return {**super().config_options(), "cpu_weights": "fp32"}


SYSTEMS: dict[str, type[System]] = {
    cls.name: cls for cls in (Nitro, NitroFloatWeights, HFStatic, HFContinuousBatching)}
"""The in-process systems; `system_class` adds `server` (http_system.py, which builds on this module)."""


def system_class(name: str) -> type[System]:
    if name == SERVER:
        from nitro_torch.bench.http_system import ServerSystem

        return ServerSystem
    return SYSTEMS[name]


def parse_key_values(items: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--nitro-opt expects KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out
