"""fused_topk_gkd_loss against the logits version topk_gkd_loss(F.linear(hidden, weight, bias), ...), on CPU.

The logits version is itself tested against independent float64 references in test_loss.py; here the
fused loss must give the same value, stats and gradients (to hidden, weight and bias) without ever
building the [N, V] logits.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.train.loss import draw_teacher_samples, fused_topk_gkd_loss, topk_gkd_loss


def make_case(
    n: int = 9, h: int = 6, v: int = 40, k: int = 5, seed: int = 0, sampled: bool = False
) -> dict[str, torch.Tensor]:
    """Hidden states, LM head (weight, bias) in float64, and the teacher's entries for the rows."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    bias = torch.randn(v, generator=g, dtype=torch.float64) * 0.5
    teacher_logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    case = {"hidden": hidden, "weight": weight, "bias": bias}
    if sampled:
        ids, counts, lp = draw_teacher_samples(teacher_logits, k, generator=g)
        case.update(ids=ids, lp=lp, counts=counts)
    else:
        lp, ids = torch.log_softmax(teacher_logits, -1).topk(k, -1)
        case.update(ids=ids, lp=lp.float())
    return case


def run(
    fused: bool,
    case: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float64,
    with_bias: bool = True,
    **kw,
) -> tuple[float, dict[str, float], dict[str, torch.Tensor]]:
    """Loss value, stats, and gradients of hidden, weight and bias, through either path."""
    leaves = {name: case[name].detach().to(dtype).requires_grad_() for name in ("hidden", "weight", "bias")}
    bias = leaves["bias"] if with_bias else None
    teacher = {"teacher_counts": case["counts"]} if "counts" in case else {}
    if fused:
        loss, stats = fused_topk_gkd_loss(
            leaves["hidden"], leaves["weight"], case["ids"], case["lp"], bias=bias, **teacher, **kw
        )
    else:
        kw.pop("vocab_tile", None)
        logits = F.linear(leaves["hidden"], leaves["weight"], bias)
        loss, stats = topk_gkd_loss(logits, case["ids"], case["lp"], **teacher, **kw)
    loss.backward()
    grads = {name: leaf.grad for name, leaf in leaves.items() if leaf.grad is not None}
    return loss.item(), stats, grads


def assert_same(a: tuple, b: tuple, rtol: float, atol: float) -> None:  # type: ignore[type-arg]
    assert a[0] == pytest.approx(b[0], rel=rtol, abs=atol)
    assert a[1] == pytest.approx(b[1], rel=rtol, abs=atol)
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], rtol=rtol, atol=atol, msg=name)


CASES = [
    ("tail", 0.0),
    ("tail", 0.3),
    ("tail", 1.0),
    ("renorm", 0.0),
    ("renorm", 0.5),
    ("renorm", 1.0),
    ("sampled", 0.0),
]


@pytest.mark.parametrize(("mode", "beta"), CASES)
@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_float64_value_stats_and_gradients_equal_the_logits_version(
    mode: str, beta: float, tau: float
) -> None:
    case = make_case(sampled=mode == "sampled")
    mask = torch.tensor([True, True, False, True, True, False, True, True, True])
    kw = {"beta": beta, "temperature": tau, "mode": mode, "mask": mask}
    # Chunks and tiles that do not divide N = 9 and V = 40: every boundary case is exercised.
    fused = run(True, case, chunk_rows=4, vocab_tile=7, **kw)
    logits = run(False, case, **kw)
    assert_same(fused, logits, rtol=1e-12, atol=1e-14)
    assert fused[2]["hidden"][~mask].abs().max().item() == 0.0  # masked rows get no gradient
    assert fused[2]["weight"].abs().max().item() > 0


@pytest.mark.parametrize("mode", ["tail", "renorm", "sampled"])
def test_without_bias_and_with_a_tensor_normalizer(mode: str) -> None:
    case = make_case(sampled=mode == "sampled", seed=3)
    kw = {"beta": 0.0, "mode": mode, "normalizer": torch.tensor(20.0, dtype=torch.float64)}
    fused = run(True, case, with_bias=False, vocab_tile=16, **kw)
    logits = run(False, case, with_bias=False, **kw)
    assert "bias" not in fused[2]
    assert_same(fused, logits, rtol=1e-12, atol=1e-14)
    assert fused[0] == pytest.approx(fused[1]["loss_sum"] / 20.0, rel=1e-12)


@pytest.mark.parametrize(("mode", "beta"), [("tail", 0.3), ("renorm", 1.0), ("sampled", 0.0)])
def test_float64_gradients_pass_gradcheck(mode: str, beta: float) -> None:
    case = make_case(n=4, h=2, v=9, k=3, sampled=mode == "sampled")
    counts = {"teacher_counts": case["counts"]} if mode == "sampled" else {}

    def fn(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        loss, _ = fused_topk_gkd_loss(
            hidden, weight, case["ids"], case["lp"].double(), bias=bias, beta=beta, temperature=1.3,
            mode=mode, chunk_rows=2, vocab_tile=5, **counts,
        )  # fmt: skip
        return loss

    inputs = tuple(case[name].clone().requires_grad_() for name in ("hidden", "weight", "bias"))
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("mode", ["tail", "renorm"])
def test_chunk_rows_and_vocab_tile_do_not_change_the_result(mode: str) -> None:
    case = make_case(n=13, h=8, v=70, k=6, seed=5)
    results = [
        run(True, case, dtype=torch.float32, beta=0.4, mode=mode, chunk_rows=rows, vocab_tile=tile)
        for rows, tile in ((None, None), (1, 1), (5, 9), (13, 70), (64, 512))
    ]
    for other in results[1:]:
        assert_same(other, results[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["tail", "renorm"])
def test_bf16_inputs_compute_the_loss_in_fp32_and_return_bf16_gradients(mode: str) -> None:
    case = make_case(n=16, h=32, v=64, k=8, seed=7)
    fused = run(True, case, dtype=torch.bfloat16, mode=mode, chunk_rows=5, vocab_tile=24)
    logits = run(False, case, dtype=torch.bfloat16, mode=mode)
    assert all(g.dtype == torch.bfloat16 and bool(g.isfinite().all()) for g in fused[2].values())
    # Same bf16 logits on both sides up to the matmul's blocking; gradients to bf16 rounding.
    assert fused[0] == pytest.approx(logits[0], rel=2e-2)
    for name in fused[2]:
        torch.testing.assert_close(fused[2][name].float(), logits[2][name].float(), rtol=5e-2, atol=5e-3)


def test_autocast_sets_the_matmul_dtype_like_it_would_for_the_lm_head() -> None:
    case = make_case(n=8, h=16, v=48, k=4, seed=2)
    hidden = case["hidden"].float().requires_grad_()
    weight = case["weight"].float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = fused_topk_gkd_loss(hidden, weight, case["ids"], case["lp"], mode="tail")
        logits = F.linear(hidden, weight)
    assert logits.dtype == torch.bfloat16
    ref, _ = topk_gkd_loss(logits.detach(), case["ids"], case["lp"], mode="tail")
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-2)
    loss.backward()
    assert hidden.grad is not None and hidden.grad.dtype == torch.float32  # flows back through the cast
    assert weight.grad is not None and weight.grad.dtype == torch.float32


def test_no_grad_computes_the_value_only() -> None:
    case = make_case(seed=4)
    hidden, weight = case["hidden"].requires_grad_(), case["weight"].requires_grad_()
    with torch.no_grad():
        loss, stats = fused_topk_gkd_loss(hidden, weight, case["ids"], case["lp"], beta=0.0)
    ref, ref_stats = topk_gkd_loss(F.linear(hidden, weight).detach(), case["ids"], case["lp"], beta=0.0)
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert stats == pytest.approx(ref_stats, rel=1e-12)


def test_rows_outside_the_mask_may_hold_garbage() -> None:
    case = make_case(n=6, seed=8)
    mask = torch.tensor([True, False, True, True, False, True])
    clean = run(True, case, mask=mask, beta=0.5)
    ids, lp, hidden = case["ids"].clone(), case["lp"].clone(), case["hidden"].clone()
    ids[1] = torch.tensor([-7, 0, 0, 999, 3])
    lp[4] = math.nan
    hidden[1] *= 1e3
    dirty = run(True, {**case, "ids": ids, "lp": lp, "hidden": hidden}, mask=mask, beta=0.5)
    assert dirty[0] == pytest.approx(clean[0], rel=1e-12)
    assert dirty[2]["hidden"][~mask].abs().max().item() == 0.0
    torch.testing.assert_close(dirty[2]["weight"], clean[2]["weight"], rtol=1e-12, atol=1e-14)


def _bad_cases() -> list[tuple[str, dict[str, object], str]]:
    c = make_case()
    h, w = c["hidden"], c["weight"]
    return [
        (
            "1-D hidden",
            {"hidden": h[0]},
            r"hidden: expected a 2-D floating tensor \[N, H\], got shape \(6,\)",
        ),
        ("H mismatch", {"weight": w[:, :5]}, r"weight: expected .*\[V, H\] with H=6.*got shape \(40, 5\)"),
        ("dtype mismatch", {"weight": w.float()}, r"weight: expected dtype torch.float64.*got torch.float32"),
        (
            "bias shape",
            {"bias": torch.zeros(39, dtype=torch.float64)},
            r"bias: expected shape \(40,\).*\(39,\)",
        ),
        ("rows", {"teacher_ids": c["ids"][:4]}, r"N=9 rows, got shape \(4, 5\)"),
        ("k > V", {"teacher_ids": torch.zeros(9, 41, dtype=torch.long)}, r"k <= V=40.*got k=41"),
        ("vocab_tile", {"vocab_tile": 0}, r"vocab_tile: expected an integer >= 1 or None, got 0"),
        ("id >= V", {"teacher_ids": c["ids"].clone().fill_(40)}, r"V=40.*got 40"),
        ("sampled beta", {"mode": "sampled", "beta": 0.5}, r"supports beta=0 .*got 0.5"),
    ]


@pytest.mark.parametrize(("name", "change", "message"), _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises_value_error_naming_expected_and_got(
    name: str, change: dict[str, object], message: str
) -> None:
    c = make_case()
    args: dict[str, object] = {"hidden": c["hidden"], "weight": c["weight"], "teacher_ids": c["ids"]}
    args["teacher_logprobs"] = c["lp"]
    args.update(change)
    with pytest.raises(ValueError, match=message):
        fused_topk_gkd_loss(**args)  # type: ignore[arg-type]
