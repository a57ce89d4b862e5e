"""The reference teacher's opt-in binary response: top-k rows as packed msgpack tensors, no JSON.

A server that offers it says so in its `/v1/models` card: ``"gkd_binary_topk": MEDIA_TYPE``. A client
that wants it sends the ordinary vLLM completions body plus ``"gkd_rows_from": prompt_len`` with
``Accept: MEDIA_TYPE``; the answer is the msgpack map

    {"v": 1, "model": str, "ids": <int32 [R, k] tensor>, "logprobs": <float32 [R, k] tensor>}

(tensors as in pipeline/wire/codec: {"dtype", "shape", "data"}), where row r is the distribution over token
gkd_rows_from + r, sorted descending, -inf as IEEE -inf. vLLM and SGLang never see these fields: the
client uses them only with endpoints that advertise the extension. The rows are validated exactly like
JSON answers (rows.finalize).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from pipeline.errors import MalformedResponse, WireFormatError
from pipeline.teacher import rows, vllm
from pipeline.teacher.protocol import TeacherProtocol
from pipeline.wire import mpack
from pipeline.wire.codec import ID_DTYPES, LOGPROB_WIRE_DTYPES, pack_tensor, unpack_tensor

MEDIA_TYPE = "application/x-gkd-topk+msgpack"
ADVERT_FIELD = "gkd_binary_topk"
ROWS_FROM_FIELD = "gkd_rows_from"
VERSION = 1


def advertised(models_body: Any) -> bool:
    """True when a `/v1/models` body's first card offers the binary response."""
    cards = vllm.model_cards(models_body)
    return bool(cards) and cards[0].get(ADVERT_FIELD) == MEDIA_TYPE


def build_request(input_ids: list[int], k: int, model: str, prompt_len: int) -> dict[str, Any]:
    """The vLLM completions body plus the rows-from field."""
    return {**vllm.build_request(input_ids, k, model), ROWS_FROM_FIELD: prompt_len}


def render(ids_RK: np.ndarray, logprobs_RK: np.ndarray, model: str) -> bytes:
    """The binary body for rows already sorted descending (server side)."""
    return mpack.dumps(
        {
            "v": VERSION,
            "model": model,
            "ids": pack_tensor(np.ascontiguousarray(ids_RK, dtype="<i4"), "ids"),
            "logprobs": pack_tensor(np.ascontiguousarray(logprobs_RK, dtype="<f4"), "logprobs"),
        }
    )


def read_tensors(raw: bytes, what: str, version: int, fields: dict[str, frozenset[str]]) -> list[np.ndarray]:
    """The 2-D tensors `fields` (name -> accepted dtypes) of a msgpack answer map of `version`, in order;
    MalformedResponse naming `what` when the body is not such a map (shared by the msgpack extensions)."""
    try:
        obj = mpack.loads(raw)
        if not isinstance(obj, dict) or obj.get("v") != version:
            raise MalformedResponse(f"{what}: expected a msgpack map with v={version}, got {str(obj)[:80]}")
        return [unpack_tensor(obj.get(name), name, dtypes, 2) for name, dtypes in fields.items()]
    except (ValueError, WireFormatError) as exc:
        raise MalformedResponse(f"{what}: {exc}") from None


def parse_response(raw: bytes, num_tokens: int, prompt_len: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [R, k], logprobs float32 [R, k]) from a binary body; MalformedResponse when invalid."""
    what = "binary top-k"
    ids_RK, lp_RK = read_tensors(raw, what, VERSION, {"ids": ID_DTYPES, "logprobs": LOGPROB_WIRE_DTYPES})
    R = num_tokens - prompt_len
    if ids_RK.shape != (R, k) or lp_RK.shape != (R, k):
        raise MalformedResponse(f"{what}: expected [{R}, {k}] arrays, got {ids_RK.shape} and {lp_RK.shape}")
    return rows.finalize(ids_RK.reshape(-1), lp_RK.reshape(-1), None, k, what, row_offset=prompt_len)


class BinaryProtocol(TeacherProtocol):
    """The binary top-k extension of the vLLM protocol (same path; the answer is msgpack tensors)."""

    name: ClassVar[str] = "binary"
    score_path: ClassVar[str] = vllm.COMPLETIONS_PATH
    media_type: ClassVar[str] = MEDIA_TYPE
    k_limit_hint: ClassVar[str] = vllm.VllmProtocol.k_limit_hint
    models_path: ClassVar[str] = vllm.MODELS_PATH

    def served_models(self, body: Any) -> list[str]:
        return vllm.VLLM.served_models(body)

    def request(self, input_ids: list[int], prompt_len: int, k: int, model: str) -> dict[str, Any]:
        return build_request(input_ids, k, model, prompt_len)

    def parse(self, raw: bytes, num_tokens: int, prompt_len: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        return parse_response(raw, num_tokens, prompt_len, k)

    @staticmethod
    def render(ids_RK: np.ndarray, logprobs_RK: np.ndarray, model: str) -> bytes:
        return render(ids_RK, logprobs_RK, model)

    @staticmethod
    def advertised(models_body: Any) -> bool:
        return advertised(models_body)

    @staticmethod
    def card() -> dict[str, str]:
        """The `/v1/models` card field a server adds to offer the extension."""
        return {ADVERT_FIELD: MEDIA_TYPE}


BINARY = BinaryProtocol()
