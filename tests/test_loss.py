"""pipeline.train.loss against independent float64 references (written out here, not imported), on CPU."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.train.loss import TAIL_MASS_FLOOR, full_vocab_gjsd, topk_gkd_loss

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]


# ---------------------------------------------------------------- float64 references


def gjsd_ref(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's generalized_jsd_loss on normalized log-probs (last dim), per row."""
    if beta == 0:
        return F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)  # KL(P || Q)
    if beta == 1:
        return F.kl_div(logp, logq, reduction="none", log_target=True).sum(-1)  # KL(Q || P)
    mix = torch.logsumexp(torch.stack([logq + math.log(1 - beta), logp + math.log(beta)]), 0)
    kl_p = F.kl_div(mix, logp, reduction="none", log_target=True).sum(-1)
    kl_q = F.kl_div(mix, logq, reduction="none", log_target=True).sum(-1)
    return beta * kl_p + (1 - beta) * kl_q


def tail_ref(z: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, beta: float, tau: float) -> torch.Tensor:
    """Documented tail mode from full float64 distributions: coarsen to (K, rest), then temper."""

    def coarse(logits: torch.Tensor) -> torch.Tensor:
        logprobs = torch.log_softmax(logits.double(), -1)
        in_k = torch.zeros_like(logprobs, dtype=torch.bool).scatter(1, ids, True)
        rest = torch.logsumexp(logprobs.masked_fill(in_k, -math.inf), -1, keepdim=True)
        return torch.log_softmax(torch.cat([logprobs.gather(1, ids), rest], -1) / tau, -1)

    return gjsd_ref(coarse(t), coarse(z), beta).mean()


def renorm_ref(
    z: torch.Tensor, ids: torch.Tensor, teacher_lp: torch.Tensor, beta: float, tau: float
) -> torch.Tensor:
    """ms-swift gkd_logits_topk: student log_softmax gathered at the ids, both sides re-log-softmaxed."""
    student = torch.log_softmax(z.double() / tau, -1).gather(1, ids)
    return gjsd_ref(
        torch.log_softmax(teacher_lp.double() / tau, -1), torch.log_softmax(student, -1), beta
    ).mean()


def make_case(
    n: int = 6, v: int = 50, k: int = 8, scale: float = 2.0, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Student and teacher logits [n, v], the teacher's top-k ids (sorted by prob) and fp32 logprobs."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    lp_full = torch.log_softmax(t, -1)
    lp, ids = lp_full.topk(k, -1)
    return {"z": z, "t": t, "ids": ids, "lp": lp.float()}


def loss_and_grad(
    z: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor, dtype: torch.dtype = torch.float32, **kw: object
) -> tuple[float, torch.Tensor, dict[str, float]]:
    leaf = z.detach().to(dtype).requires_grad_()
    loss, stats = topk_gkd_loss(leaf, ids, lp, **kw)  # type: ignore[arg-type]
    loss.backward()
    assert leaf.grad is not None
    return loss.item(), leaf.grad, stats


def ref_grad(fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> tuple[float, torch.Tensor]:
    leaf = z.detach().double().requires_grad_()
    value = fn(leaf)
    value.backward()
    assert leaf.grad is not None
    return value.item(), leaf.grad


# ---------------------------------------------------------------- exactness against references


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_tail_with_k_equal_v_is_the_full_vocabulary_gjsd(beta: float, tau: float) -> None:
    c = make_case(v=60, k=60)
    # Shuffle the k entries: the loss must not rely on the teacher's descending order.
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(1))
    ids, lp = c["ids"][:, perm], c["lp"][:, perm]
    value, grad, _ = loss_and_grad(c["z"], ids, lp, beta=beta, temperature=tau, mode="tail")

    def ref(z: torch.Tensor) -> torch.Tensor:
        return gjsd_ref(torch.log_softmax(c["t"] / tau, -1), torch.log_softmax(z / tau, -1), beta).mean()

    ref_value, ref_g = ref_grad(ref, c["z"])
    assert value == pytest.approx(ref_value, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad.double(), ref_g, rtol=1e-4, atol=1e-6)
    full_value = full_vocab_gjsd(c["z"].float(), c["t"].float(), beta, tau).item()
    assert full_value == pytest.approx(ref_value, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_tail_with_k_below_v_matches_the_documented_coarsen_then_temper(beta: float, tau: float) -> None:
    c = make_case(v=80, k=5)
    value, grad, _ = loss_and_grad(c["z"], c["ids"], c["lp"], beta=beta, temperature=tau)
    ref_value, ref_g = ref_grad(lambda z: tail_ref(z, c["t"], c["ids"], beta, tau), c["z"])
    assert value == pytest.approx(ref_value, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad.double(), ref_g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_renorm_matches_ms_swift_formula(beta: float, tau: float) -> None:
    c = make_case(v=70, k=6)
    value, grad, _ = loss_and_grad(c["z"], c["ids"], c["lp"], beta=beta, temperature=tau, mode="renorm")
    ref_value, ref_g = ref_grad(lambda z: renorm_ref(z, c["ids"], c["lp"], beta, tau), c["z"])
    assert value == pytest.approx(ref_value, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad.double(), ref_g, rtol=1e-4, atol=1e-6)
    # Only the k gathered logits receive gradient in renorm mode.
    outside = torch.ones_like(grad, dtype=torch.bool).scatter(1, c["ids"], False)
    assert grad[outside].abs().max().item() == 0.0


def test_beta_endpoints_are_forward_and_reverse_kl() -> None:
    # An asymmetric pair: P is peaked, Q is flat, so KL(P||Q) and KL(Q||P) differ a lot.
    p = torch.tensor([[0.90, 0.05, 0.03, 0.02]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    forward_kl = (p * (p / q).log()).sum().item()
    reverse_kl = (q * (q / p).log()).sum().item()
    assert abs(forward_kl - reverse_kl) > 0.2
    ids = torch.arange(4)[None]
    for beta, expected in ((0.0, forward_kl), (1.0, reverse_kl)):
        loss, _ = topk_gkd_loss(q.log().float(), ids, p.log().float(), beta=beta)
        assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_tail_rest_mass_is_exact_when_student_puts_almost_everything_in_k() -> None:
    # Student rest mass ~1e-12: 1 - sum_K q in fp32 would be 0 (log = -inf); the loss must use the
    # true value, since forward KL weighs it by the teacher's rest mass of ~0.4.
    c = make_case(n=4, v=100, k=3, scale=0.5)
    z = torch.full((4, 100), -30.0, dtype=torch.float64).scatter(1, c["ids"], 0.0)
    value, grad, stats = loss_and_grad(z, c["ids"], c["lp"], beta=0.0)
    ref_value, ref_g = ref_grad(lambda zz: tail_ref(zz, c["t"], c["ids"], 0.0, 1.0), z)
    assert stats["student_mass"] > 1 - 1e-9
    assert value == pytest.approx(ref_value, rel=1e-5)
    torch.testing.assert_close(grad.double(), ref_g, rtol=1e-4, atol=1e-8)


def test_full_vocab_gjsd_respects_mask_and_normalizer() -> None:
    c = make_case()
    mask = torch.tensor([True, False, True, True, False, True])
    rows = gjsd_ref(torch.log_softmax(c["t"], -1), torch.log_softmax(c["z"], -1), 0.5)
    got = full_vocab_gjsd(c["z"], c["t"], 0.5, 1.0, mask, 10.0).item()
    assert got == pytest.approx(rows[mask].sum().item() / 10.0, rel=1e-12)


# ---------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    v=st.integers(2, 40),
    k_frac=st.floats(0.0, 1.0),
    scale=st.sampled_from([0.1, 1.0, 5.0, 20.0]),
    beta=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    tau=st.sampled_from([0.5, 1.0, 2.0]),
    mode=st.sampled_from(["tail", "renorm"]),
    half=st.booleans(),
)
def test_never_negative_and_finite(
    seed: int, v: int, k_frac: float, scale: float, beta: float, tau: float, mode: str, half: bool
) -> None:
    k = max(1, round(k_frac * v))
    c = make_case(n=3, v=v, k=k, scale=scale, seed=seed)
    lp = c["lp"].half() if half else c["lp"]
    value, grad, stats = loss_and_grad(c["z"], c["ids"], lp, beta=beta, temperature=tau, mode=mode)
    assert value >= 0.0 and stats["loss_sum"] >= 0.0
    assert math.isfinite(value) and bool(grad.isfinite().all())


@pytest.mark.parametrize("mode", ["tail", "renorm"])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_zero_when_teacher_equals_student(mode: str, beta: float, tau: float) -> None:
    c = make_case(v=90, k=7)
    lp, ids = torch.log_softmax(c["z"], -1).topk(7, -1)
    value, grad, _ = loss_and_grad(c["z"], ids, lp.float(), beta=beta, temperature=tau, mode=mode)
    assert abs(value) < 1e-7
    assert grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("mode", ["tail", "renorm"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_float64_gradients_pass_gradcheck(mode: str, beta: float, tau: float) -> None:
    c = make_case(n=4, v=12, k=4)
    lp = c["lp"].double()

    def fn(z: torch.Tensor) -> torch.Tensor:
        return topk_gkd_loss(z, c["ids"], lp, beta=beta, temperature=tau, mode=mode, chunk_rows=3)[0]

    assert torch.autograd.gradcheck(fn, (c["z"].clone().requires_grad_(),))


@pytest.mark.parametrize("mode", ["tail", "renorm"])
def test_invariant_to_permuting_k_and_to_shifting_student_logits(mode: str) -> None:
    c = make_case(v=60, k=9)
    base, base_grad, _ = loss_and_grad(c["z"], c["ids"], c["lp"], beta=0.5, temperature=1.5, mode=mode)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    permuted, permuted_grad, _ = loss_and_grad(
        c["z"], c["ids"][:, perm], c["lp"][:, perm], beta=0.5, temperature=1.5, mode=mode
    )
    shift = torch.linspace(-20, 20, 6, dtype=torch.float64)[:, None]
    shifted, shifted_grad, _ = loss_and_grad(
        c["z"] + shift, c["ids"], c["lp"], beta=0.5, temperature=1.5, mode=mode
    )
    assert permuted == pytest.approx(base, abs=1e-6)
    assert shifted == pytest.approx(base, abs=1e-5)
    torch.testing.assert_close(permuted_grad, base_grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(shifted_grad, base_grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["tail", "renorm"])
def test_chunk_size_does_not_change_the_result(mode: str) -> None:
    c = make_case(n=11, v=70, k=5)
    mask = torch.arange(11) % 4 != 1
    results = [
        loss_and_grad(c["z"], c["ids"], c["lp"], beta=0.4, mode=mode, mask=mask, chunk_rows=rows)
        for rows in (1, 3, 4, 11, None)
    ]
    for value, grad, stats in results[1:]:
        assert value == pytest.approx(results[0][0], abs=1e-6)
        assert stats["student_mass"] == pytest.approx(results[0][2]["student_mass"], abs=1e-6)
        torch.testing.assert_close(grad, results[0][1], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- edge cases stay finite


def _teacher_with_mass(mass: float, dtype: torch.dtype) -> torch.Tensor:
    """[2, 3] logprobs whose probabilities sum to `mass` (before rounding to dtype)."""
    p = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.45, 0.05]], dtype=torch.float64) * mass
    return p.log().to(dtype)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("mode", ["tail", "renorm"])
@pytest.mark.parametrize(
    ("mass", "dtype"), [(1 - 1e-7, torch.float32), (1.0, torch.float16), (1.0 + 2e-3, torch.float16)]
)
def test_finite_when_teacher_mass_is_at_or_above_one(
    beta: float, mode: str, mass: float, dtype: torch.dtype
) -> None:
    ids = torch.tensor([[4, 0, 9], [1, 2, 3]])
    lp = _teacher_with_mass(mass, dtype)
    z = torch.randn(2, 30, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    value, grad, stats = loss_and_grad(z, ids, lp, beta=beta, mode=mode)
    assert math.isfinite(value) and value >= 0.0
    assert bool(grad.isfinite().all())
    assert stats["teacher_mass"] == pytest.approx(mass, abs=2e-3)


def test_tail_floors_the_teacher_rest_mass() -> None:
    # sum_K p > 1 from fp16 rounding: the rest gets TAIL_MASS_FLOOR and the row is renormalized, so
    # reverse KL charges a student's rest mass log(q_rest / floor) instead of infinity.
    ids = torch.tensor([[0, 1]])
    lp = torch.tensor([[math.log(0.6), math.log(0.4)]]).half() + 1e-3
    z = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.1), math.log(0.1)]], dtype=torch.float64)
    value, _, stats = loss_and_grad(z, ids, lp.half(), beta=1.0)
    p = torch.cat([lp.double().exp(), torch.tensor([[TAIL_MASS_FLOOR]], dtype=torch.float64)], 1)
    p = p / p.sum()
    q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    assert stats["teacher_mass"] > 1.0
    assert value == pytest.approx((q * (q / p[0]).log()).sum().item(), rel=1e-5)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("mode", ["tail", "renorm"])
def test_k_equal_one(beta: float, mode: str) -> None:
    c = make_case(v=40, k=1)
    value, grad, _ = loss_and_grad(c["z"], c["ids"], c["lp"], beta=beta, mode=mode)
    assert math.isfinite(value) and bool(grad.isfinite().all())
    if mode == "renorm":  # one category on both sides: nothing to distil
        assert abs(value) < 1e-7 and grad.abs().max().item() < 1e-7
    else:
        ref_value, _ = ref_grad(lambda z: tail_ref(z, c["t"], c["ids"], beta, 1.0), c["z"])
        assert value == pytest.approx(ref_value, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("beta", BETAS)
def test_minus_inf_student_logits_outside_k_get_zero_gradient(beta: float) -> None:
    # A masked vocabulary (padding ids at -inf) must not produce NaN through the rest category.
    c = make_case(n=4, v=40, k=5)
    z = c["z"].clone()
    in_k = torch.zeros_like(z, dtype=torch.bool).scatter(1, c["ids"], True)
    padded = torch.zeros_like(in_k)
    padded[:, 30:] = True
    padded &= ~in_k
    z[padded] = -math.inf
    value, grad, _ = loss_and_grad(z, c["ids"], c["lp"], beta=beta)
    finite_z = z.masked_fill(padded, -1e4)  # same distribution, no infinities, for the reference
    ref_value, ref_g = ref_grad(lambda zz: tail_ref(zz, c["t"], c["ids"], beta, 1.0), finite_z)
    assert value == pytest.approx(ref_value, rel=1e-5, abs=1e-7)
    assert grad[padded].abs().max().item() == 0.0
    torch.testing.assert_close(grad.double(), ref_g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["tail", "renorm"])
def test_bf16_logits_compute_in_fp32(mode: str) -> None:
    c = make_case(n=5, v=64, k=8)
    z16 = c["z"].bfloat16()
    value, grad, _ = loss_and_grad(z16, c["ids"], c["lp"], dtype=torch.bfloat16, mode=mode)
    value32, grad32, _ = loss_and_grad(z16.float(), c["ids"], c["lp"], mode=mode)
    assert grad.dtype == torch.bfloat16 and bool(grad.isfinite().all())
    assert value == pytest.approx(value32, rel=1e-6)  # same numbers: only the input dtype differs
    torch.testing.assert_close(grad.float(), grad32, rtol=1e-2, atol=1e-4)  # bf16 rounding of the grad


# ---------------------------------------------------------------- mask, normalizer, stats


def test_masked_rows_contribute_nothing_even_with_garbage() -> None:
    c = make_case(n=6, v=50, k=4)
    mask = torch.tensor([True, False, True, False, True, True])
    value, grad, stats = loss_and_grad(c["z"], c["ids"], c["lp"], mask=mask)
    ids, lp, z = c["ids"].clone(), c["lp"].clone(), c["z"].clone()
    ids[1] = torch.tensor([-7, 0, 0, 999])  # out of range and repeated: ignored in masked-out rows
    lp[3] = math.nan
    z[1] *= 100
    value2, grad2, stats2 = loss_and_grad(z, ids, lp, mask=mask)
    assert value2 == pytest.approx(value, abs=1e-7)
    assert stats2 == pytest.approx(stats, abs=1e-7)
    assert stats["rows"] == 4.0
    assert grad2[~mask].abs().max().item() == 0.0
    torch.testing.assert_close(grad2[mask], grad[mask], rtol=0, atol=1e-7)


def test_normalizer_divides_the_sum_and_gives_a_global_mean() -> None:
    c = make_case(n=8, v=50, k=4)
    mask = torch.tensor([True, True, False, True, True, True, False, True])
    default, stats = topk_gkd_loss(c["z"].float(), c["ids"], c["lp"], mask=mask)
    assert stats["rows"] == 6.0
    assert default.item() == pytest.approx(stats["loss_sum"] / 6.0, rel=1e-6)
    as_float, _ = topk_gkd_loss(c["z"].float(), c["ids"], c["lp"], mask=mask, normalizer=10.0)
    as_tensor, _ = topk_gkd_loss(c["z"].float(), c["ids"], c["lp"], mask=mask, normalizer=torch.tensor(10))
    assert as_float.item() == pytest.approx(stats["loss_sum"] / 10.0, rel=1e-6)
    assert as_tensor.item() == pytest.approx(as_float.item(), rel=1e-7)
    # Two micro-batches normalized by the global count add up to the mean over all of their tokens.
    parts = [
        topk_gkd_loss(c["z"][s].float(), c["ids"][s], c["lp"][s], mask=mask[s], normalizer=6)[0]
        for s in (slice(0, 3), slice(3, 8))
    ]
    assert (parts[0] + parts[1]).item() == pytest.approx(default.item(), rel=1e-6)


def test_no_masked_rows_gives_zero_loss_and_zero_gradient() -> None:
    c = make_case(n=3, v=20, k=4)
    value, grad, stats = loss_and_grad(c["z"], c["ids"], c["lp"], mask=torch.zeros(3, dtype=torch.bool))
    assert value == 0.0 and grad.abs().max().item() == 0.0
    assert stats == {
        "teacher_mass": 0.0,
        "student_mass": 0.0,
        "top1_in_topk": 0.0,
        "loss_sum": 0.0,
        "rows": 0.0,
    }


def test_stats_report_masses_and_top1_coverage() -> None:
    c = make_case(n=6, v=50, k=5)
    ids = c["ids"].clone()
    ids[0, 0] = c["z"][0].argmax()  # row 0 certainly covers the student's argmax
    ids[1] = torch.tensor([v for v in range(50) if v != c["z"][1].argmax()][:5])  # row 1 certainly not
    _, stats = topk_gkd_loss(c["z"].float(), ids, c["lp"], temperature=2.0)
    q = torch.softmax(c["z"], -1)
    in_k = (ids == c["z"].argmax(-1, keepdim=True)).any(-1).double()
    assert 0 < in_k.mean().item() < 1
    assert stats["teacher_mass"] == pytest.approx(c["lp"].double().exp().sum(-1).mean().item(), rel=1e-6)
    assert stats["student_mass"] == pytest.approx(q.gather(1, ids).sum(-1).mean().item(), rel=1e-5)
    assert stats["top1_in_topk"] == pytest.approx(in_k.mean().item())
    assert stats["rows"] == 6.0


# ---------------------------------------------------------------- bad inputs


def _bad_cases() -> list[tuple[str, dict[str, object], str]]:
    c = make_case(n=6, v=50, k=4)
    z, ids, lp = c["z"].float(), c["ids"], c["lp"]
    too_big, negative, repeated, nan_lp = ids.clone(), ids.clone(), ids.clone(), lp.clone()
    too_big[2, 1], negative[4, 0], repeated[3, 1] = 50, -3, repeated[3, 0]
    nan_lp[5, 2] = math.nan
    inf_lp = lp.clone()
    inf_lp[0] = -math.inf
    return [
        ("id >= V", {"teacher_ids": too_big}, r"V=50.*got 50"),
        ("id < 0", {"teacher_ids": negative}, r"\[0, 50\).*got -3"),
        ("repeated id", {"teacher_ids": repeated}, r"distinct.*got repeats in 1 row"),
        ("nan logprob", {"teacher_logprobs": nan_lp}, r"expected log-probabilities.*got NaN"),
        ("all -inf row", {"teacher_logprobs": inf_lp}, r"not all -inf in a row.*got .* 1 row"),
        ("1-D logits", {"student_logits": z[0]}, r"2-D floating tensor \[N, V\], got shape \(50,\)"),
        ("row count", {"teacher_ids": ids[:5]}, r"N=6 rows, got shape \(5, 4\)"),
        ("float ids", {"teacher_ids": ids.float()}, r"integer tensor.*got .* dtype torch.float32"),
        ("k > V", {"teacher_ids": torch.zeros(6, 51, dtype=torch.long)}, r"k <= V=50.*got k=51"),
        ("logprob shape", {"teacher_logprobs": lp[:, :3]}, r"shape \(6, 4\).*got shape \(6, 3\)"),
        ("mask shape", {"mask": torch.ones(5, dtype=torch.bool)}, r"shape \(6,\), got shape \(5,\)"),
        ("mask dtype", {"mask": torch.ones(6)}, r"bool tensor.*dtype torch.float32"),
        ("beta < 0", {"beta": -0.1}, r"beta: expected a value in \[0, 1\], got -0.1"),
        ("beta > 1", {"beta": 1.5}, r"beta: expected a value in \[0, 1\], got 1.5"),
        ("tau = 0", {"temperature": 0.0}, r"temperature: expected a finite value > 0, got 0.0"),
        ("tau nan", {"temperature": math.nan}, r"temperature: expected a finite value > 0, got nan"),
        ("mode", {"mode": "full"}, r"mode: expected one of tail, renorm, sampled, got 'full'"),
        ("chunk_rows", {"chunk_rows": 0}, r"chunk_rows: expected an integer >= 1 or None, got 0"),
        ("normalizer", {"normalizer": 0}, r"normalizer: expected a finite number > 0.*got 0"),
        ("normalizer tensor", {"normalizer": torch.tensor(-2.0)}, r"normalizer: expected.*> 0.*got -2.0"),
    ]


@pytest.mark.parametrize(("name", "change", "message"), _bad_cases(), ids=[case[0] for case in _bad_cases()])
def test_bad_input_raises_value_error_naming_expected_and_got(
    name: str, change: dict[str, object], message: str
) -> None:
    c = make_case(n=6, v=50, k=4)
    args: dict[str, object] = {"student_logits": c["z"].float(), "teacher_ids": c["ids"]}
    args["teacher_logprobs"] = c["lp"]
    args.update(change)
    with pytest.raises(ValueError, match=message):
        topk_gkd_loss(**args)  # type: ignore[arg-type]


def test_full_vocab_gjsd_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"expected shape \(3, 10\).*got \(3, 11\)"):
        full_vocab_gjsd(torch.zeros(3, 10), torch.zeros(3, 11))
