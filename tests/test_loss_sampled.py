"""mode="sampled" (RS-KD, Anshumann et al. 2025) against float64 references written out here, and the
sampler draw_teacher_samples, on CPU."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.train.loss import draw_teacher_samples, topk_gkd_loss


def rskd_ref(
    z: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, lp: torch.Tensor, tau: float
) -> torch.Tensor:
    """The estimator written out per row, in float64 with plain autograd: importance weights
    c_i p_i^(1/tau - 1) normalized, the teacher's tempered log-prob estimated by self-normalization, and
    the student's full-vocabulary log_softmax(z / tau)."""
    total = z.new_zeros(())
    for r in range(z.shape[0]):
        live = counts[r] > 0
        c, i, logp = counts[r][live].double(), ids[r][live], lp[r][live].double()
        w = c * torch.exp((1 / tau - 1) * logp)
        phat = w / w.sum()
        log_pt = logp / tau - torch.log(w.sum() / c.sum())
        logq = torch.log_softmax(z[r] / tau, -1)[i]
        total = total + (phat * (log_pt - logq)).sum()
    return total / z.shape[0]


def sampled_case(n: int = 7, v: int = 30, samples: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    ids, counts, lp = draw_teacher_samples(t, samples, generator=g)
    return {"z": z, "t": t, "ids": ids, "counts": counts, "lp": lp}


def loss_and_grad(z: torch.Tensor, **kw: object) -> tuple[float, torch.Tensor, dict[str, float]]:
    leaf = z.detach().clone().requires_grad_()
    loss, stats = topk_gkd_loss(leaf, mode="sampled", beta=0.0, **kw)  # type: ignore[arg-type]
    loss.backward()
    assert leaf.grad is not None
    return loss.item(), leaf.grad, stats


@pytest.mark.parametrize("tau", [1.0, 0.7, 2.0])
def test_matches_the_float64_reference_values_and_gradients(tau: float) -> None:
    c = sampled_case()
    assert bool((c["counts"] == 0).any()), "the case should include padding entries"
    value, grad, _ = loss_and_grad(
        c["z"], teacher_ids=c["ids"], teacher_logprobs=c["lp"], teacher_counts=c["counts"], temperature=tau
    )
    leaf = c["z"].clone().requires_grad_()
    ref = rskd_ref(leaf, c["ids"], c["counts"], c["lp"], tau)
    ref.backward()
    assert value == pytest.approx(ref.item(), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-12, atol=1e-14)


def test_counts_proportional_to_the_teacher_give_the_full_vocabulary_forward_kl() -> None:
    # A teacher whose probabilities are counts / n exactly: the estimate is then the exact forward KL.
    counts = torch.tensor([[5, 3, 1, 1, 0, 0], [2, 2, 2, 2, 1, 1]])
    p = counts.double() / counts.sum(1, keepdim=True)
    ids = torch.arange(6).expand(2, 6)
    z = torch.randn(2, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lp = torch.where(counts > 0, p.log(), 0.0)
    value, grad, stats = loss_and_grad(z, teacher_ids=ids, teacher_logprobs=lp, teacher_counts=counts)
    q = torch.softmax(z, -1)
    kl = torch.where(p > 0, p * (p.log() - q.log()), 0.0).sum(-1).mean()
    assert value == pytest.approx(kl.item(), rel=1e-12)
    torch.testing.assert_close(grad, (q - p) / 2, rtol=1e-12, atol=1e-14)
    assert stats["teacher_mass"] == pytest.approx(1.0)


def test_gradient_is_unbiased_while_top_k_is_not() -> None:
    # The paper's claim, checked by Monte Carlo: the mean RS-KD gradient over many independent draws
    # converges to the full forward-KL gradient softmax(z) - p; renormalized top-k stays biased.
    v, samples, draws = 12, 4, 6000
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, v, generator=g, dtype=torch.float64)
    t = torch.randn(1, v, generator=g, dtype=torch.float64) * 1.5
    p = torch.softmax(t, -1)
    exact = (torch.softmax(z, -1) - p)[0]
    ids, counts, lp = draw_teacher_samples(t.expand(draws, v), samples, generator=g)
    leaf = z.expand(draws, v).clone().requires_grad_()
    loss, _ = topk_gkd_loss(leaf, ids, lp, teacher_counts=counts, mode="sampled", beta=0.0, normalizer=1.0)
    loss.backward()
    assert leaf.grad is not None
    per_draw = leaf.grad  # [draws, V]: one independent estimate per row
    mean, stderr = per_draw.mean(0), per_draw.std(0) / math.sqrt(draws)
    assert bool(((mean - exact).abs() <= 5 * stderr + 1e-12).all()), (mean - exact) / stderr
    top_lp, top_ids = torch.log_softmax(t, -1).topk(samples, -1)
    _, top_grad, _ = _topk_grad(z, top_ids, top_lp)
    assert (top_grad - exact).abs().max().item() > 20 * stderr.max().item()


def _topk_grad(
    z: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    leaf = z.clone().requires_grad_()
    loss, stats = topk_gkd_loss(leaf, ids, lp, mode="renorm", beta=0.0)
    loss.backward()
    assert leaf.grad is not None
    return loss, leaf.grad[0], stats


def test_gradcheck_in_float64() -> None:
    c = sampled_case(n=4, v=10, samples=5)

    def fn(z: torch.Tensor) -> torch.Tensor:
        return topk_gkd_loss(
            z, c["ids"], c["lp"], teacher_counts=c["counts"], mode="sampled", beta=0.0, temperature=1.4,
            chunk_rows=3,
        )[0]  # fmt: skip

    assert torch.autograd.gradcheck(fn, (c["z"].clone().requires_grad_(),))


def test_padding_entries_are_ignored_whatever_they_hold() -> None:
    c = sampled_case(seed=2)
    value, grad, stats = loss_and_grad(
        c["z"], teacher_ids=c["ids"], teacher_logprobs=c["lp"], teacher_counts=c["counts"], temperature=1.5
    )
    pad = c["counts"] == 0
    ids, lp = c["ids"].clone(), c["lp"].clone()
    ids[pad] = ids[:, :1].expand_as(ids)[pad]  # repeats a drawn id of the row
    lp[pad] = -math.inf
    value2, grad2, stats2 = loss_and_grad(
        c["z"], teacher_ids=ids, teacher_logprobs=lp, teacher_counts=c["counts"], temperature=1.5
    )
    assert value2 == pytest.approx(value, rel=1e-12)
    assert stats2 == pytest.approx(stats, rel=1e-12)
    torch.testing.assert_close(grad2, grad, rtol=1e-12, atol=1e-14)


def test_stats_over_the_drawn_ids() -> None:
    c = sampled_case(seed=3)
    _, _, stats = loss_and_grad(
        c["z"], teacher_ids=c["ids"], teacher_logprobs=c["lp"], teacher_counts=c["counts"]
    )
    live = c["counts"] > 0
    p_t, q = torch.softmax(c["t"], -1), torch.softmax(c["z"], -1)
    tmass = torch.where(live, p_t.gather(1, c["ids"]), 0.0).sum(1).mean().item()
    smass = torch.where(live, q.gather(1, c["ids"]), 0.0).sum(1).mean().item()
    top1 = ((c["ids"] == c["z"].argmax(1, keepdim=True)) & live).any(1).double().mean().item()
    assert stats["teacher_mass"] == pytest.approx(tmass, rel=1e-6)
    assert stats["student_mass"] == pytest.approx(smass, rel=1e-9)
    assert stats["top1_in_topk"] == pytest.approx(top1)


def test_draws_are_distinct_ids_with_counts_summing_to_n_sorted_by_logprob() -> None:
    g = torch.Generator().manual_seed(4)
    t = torch.randn(50, 20, generator=g) * 2
    ids, counts, lp = draw_teacher_samples(t, 8, generator=g)
    assert ids.shape == counts.shape == lp.shape == (50, 8)
    assert counts.sum(1).tolist() == [8] * 50
    logp = torch.log_softmax(t, -1)
    for r in range(50):
        live = counts[r] > 0
        assert live.sum() == len(set(ids[r][live].tolist()))  # distinct
        assert bool(live[: int(live.sum())].all())  # padding last
        torch.testing.assert_close(lp[r][live], logp[r][ids[r][live]])
        assert bool((lp[r][live][:-1] >= lp[r][live][1:]).all())
        assert bool((ids[r][~live] == 0).all() & (lp[r][~live] == 0).all())


def test_draw_frequencies_follow_the_teacher() -> None:
    g = torch.Generator().manual_seed(5)
    t = torch.randn(1, 6, generator=g, dtype=torch.float64)
    ids, counts, _ = draw_teacher_samples(t.expand(4000, 6), 5, generator=g)
    freq = torch.zeros(6, dtype=torch.float64).index_add_(0, ids.flatten(), counts.flatten().double())
    torch.testing.assert_close(freq / freq.sum(), torch.softmax(t, -1)[0], rtol=0, atol=0.01)


def _bad_cases() -> list[tuple[str, dict[str, object], str]]:
    c = sampled_case(n=4, v=20, samples=5, seed=6)
    ids, counts, lp = c["ids"], c["counts"], c["lp"]
    dup, neg, none, inf_lp = ids.clone(), counts.clone(), counts.clone(), lp.clone()
    dup[0, 1], neg[1, 0], none[2] = dup[0, 0], -1, 0
    counts_dup = counts.clone()
    counts_dup[0, 1] = max(1, int(counts_dup[0, 1]))
    inf_lp[3, 0] = -math.inf
    return [
        ("beta", {"beta": 0.5}, r"mode 'sampled' supports beta=0 \(forward KL.*got 0.5"),
        (
            "no counts",
            {"teacher_counts": None},
            r"teacher_counts: expected the draw counts in mode 'sampled'",
        ),
        ("float counts", {"teacher_counts": counts.float()}, r"teacher_counts: expected an integer tensor"),
        ("shape", {"teacher_counts": counts[:, :3]}, r"shape \(4, 5\).*got shape \(4, 3\)"),
        ("repeat", {"teacher_ids": dup, "teacher_counts": counts_dup}, r"distinct drawn ids.*1 row"),
        ("negative", {"teacher_counts": neg}, r"counts >= 0 .*1 row"),
        ("no draw", {"teacher_counts": none}, r"at least one drawn entry.*1 row"),
        ("-inf drawn", {"teacher_logprobs": inf_lp}, r"finite log-probabilities <= 0 for drawn.*1 row"),
    ]


@pytest.mark.parametrize(("name", "change", "message"), _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises_value_error_naming_expected_and_got(
    name: str, change: dict[str, object], message: str
) -> None:
    c = sampled_case(n=4, v=20, samples=5, seed=6)
    args: dict[str, object] = {"student_logits": c["z"], "teacher_ids": c["ids"], "teacher_logprobs": c["lp"]}
    args.update({"teacher_counts": c["counts"], "mode": "sampled", "beta": 0.0})
    args.update(change)
    with pytest.raises(ValueError, match=message):
        topk_gkd_loss(**args)  # type: ignore[arg-type]


def test_counts_are_refused_outside_sampled_mode() -> None:
    c = sampled_case(n=3, v=10, samples=4)
    with pytest.raises(ValueError, match=r"nothing in other modes, got counts with mode 'tail'"):
        topk_gkd_loss(c["z"], c["ids"], c["lp"], teacher_counts=c["counts"], mode="tail")
