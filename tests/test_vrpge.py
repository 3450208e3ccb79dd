"""Tests of maskprop.vrpge: projection, estimators (docs/methods.md, section 1) and ChannelScores."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import maskprop
from maskprop.vrpge import (
    ESTIMATORS,
    ChannelScores,
    ExpectedKept,
    check_alpha,
    get_estimator,
    log_prob_grad,
    project_scores,
    score_grad,
    vrpge,
    vrpge_sym,
)

# ------------------------------------------------------------------------------------------------------ projection


def reference_projection(s: torch.Tensor, budget: float, iterations: int = 200,
                         prices: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Independent solver: bisection in float64 on the shift v of ``clamp(s - v w, 0, 1)`` (``w``: the prices, 1)."""
    s = s.double().reshape(-1)
    w = torch.ones_like(s) if prices is None else prices.double().reshape(-1)
    if (w * s.clamp(0, 1)).sum() <= budget:
        return s.clamp(0, 1), 0.0
    low, high = 0.0, float((s / w).max())
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        if (w * (s - middle * w).clamp(0, 1)).sum() > budget:
            low = middle
        else:
            high = middle
    v = 0.5 * (low + high)
    return (s - v * w).clamp(0, 1), v


def assert_is_projection(s: torch.Tensor, budget: float, x: torch.Tensor, atol: float) -> None:
    """KKT conditions plus the variational inequality <s - x, y - x> <= 0 for random feasible y."""
    s64, x64 = s.double().reshape(-1), x.double().reshape(-1)
    assert x64.min() >= 0 and x64.max() <= 1
    assert x64.sum() <= budget + atol * max(1, x64.numel())
    reference, v = reference_projection(s64, budget)
    assert v >= 0
    torch.testing.assert_close(x64, (s64 - v).clamp(0, 1), atol=atol, rtol=0)  # x = clamp(s - v, 0, 1)
    torch.testing.assert_close(x64, reference, atol=atol, rtol=0)
    assert abs(v * (budget - float(x64.sum()))) <= atol * max(1, x64.numel())  # complementary slackness
    generator = torch.Generator().manual_seed(0)
    y = torch.rand(64, x64.numel(), generator=generator, dtype=torch.float64)
    y = y * torch.clamp(budget / y.sum(dim=1, keepdim=True), max=1)  # feasible points
    inner = ((s64 - x64) * (y - x64)).sum(dim=1)
    assert inner.max() <= atol * max(1, x64.numel()) * (1 + float(s64.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", range(6))
def test_projection_matches_kkt_and_bisection(seed: int, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(seed)
    n = [1, 2, 5, 17, 100, 1000][seed]
    s = (torch.randn(n, generator=generator, dtype=torch.float64) * 0.8 + 0.5).to(dtype)
    atol = 1e-9 if dtype == torch.float64 else 1e-5
    for budget in [0.0, 0.3, 0.25 * n, 0.5 * n, float(n), n + 2.0]:
        x = project_scores(s, budget)
        assert x.dtype == dtype and x.shape == s.shape
        assert_is_projection(s, budget, x, atol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_unit_prices_project_as_the_priced_formula_at_prices_one(dtype: torch.dtype) -> None:
    """Without prices the projection skips the multiplications by 1 (fewer kernels in a training step): the same
    projection as with explicit prices of 1, ties and saturated entries included, with a budget number or tensor."""
    generator = torch.Generator().manual_seed(11)
    for n in (1, 7, 300):
        s = (torch.randn(n, generator=generator, dtype=torch.float64) * 0.8 + 0.5).to(dtype)
        s[: n // 3] = s[0]  # ties
        ones = torch.ones_like(s)
        for budget in (0.0, 0.4 * n, float(n), torch.tensor(0.3 * n, dtype=dtype)):
            torch.testing.assert_close(project_scores(s, budget), project_scores(s, budget, ones),
                                       rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)


def test_projection_with_many_ties_and_breakpoints() -> None:
    """Scores and budgets on a 0.25 grid put the solution on breakpoints of f and create many ties."""
    generator = torch.Generator().manual_seed(4)
    for _ in range(200):
        n = int(torch.randint(1, 20, (1,), generator=generator))
        s = torch.randint(-4, 9, (n,), generator=generator).double() * 0.25
        budget = float(torch.randint(0, 4 * n + 2, (1,), generator=generator)) * 0.25
        torch.testing.assert_close(project_scores(s, budget), reference_projection(s, budget)[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_priced_projection_matches_kkt_and_bisection(seed: int) -> None:
    """With prices w (a budget in FLOPs): x = clamp(s - v w, 0, 1), sum w x <= K, v (sum w x - K) = 0, and no random
    feasible point is closer to s (the variational inequality)."""
    generator = torch.Generator().manual_seed(seed)
    n = [1, 3, 20, 200, 2000][seed]
    s = torch.randn(n, generator=generator, dtype=torch.float64) * 0.8 + 0.5
    w = torch.rand(n, generator=generator, dtype=torch.float64) * 20 + 0.05  # prices spread over 400x
    for budget in [0.0, 0.1 * float(w.sum()), 0.5 * float(w.sum()), float(w.sum()) + 1]:
        x = project_scores(s, budget, prices=w)
        reference, v = reference_projection(s, budget, prices=w)
        torch.testing.assert_close(x, reference, atol=1e-9, rtol=0)
        torch.testing.assert_close(x, (s - v * w).clamp(0, 1), atol=1e-9, rtol=0)
        assert x.min() >= 0 and x.max() <= 1 and float((w * x).sum()) <= budget + 1e-9 * n
        assert abs(v * (budget - float((w * x).sum()))) <= 1e-7 * n
        y = torch.rand(64, n, generator=generator, dtype=torch.float64)
        y = y * torch.clamp(budget / (y * w).sum(dim=1, keepdim=True), max=1)  # feasible points
        assert ((s - x) * (y - x)).sum(dim=1).max() <= 1e-9 * n


@pytest.mark.parametrize("priced", [False, True])
def test_projection_enumeration_on_tiny_sizes(priced: bool) -> None:
    """Brute force in 2-D: no point of a fine grid of the feasible set (priced or not) is closer to s than the
    projection, and the grid's closest point is near it."""
    grid = torch.linspace(0, 1, 201, dtype=torch.float64)
    points = torch.cartesian_prod(grid, grid)
    generator = torch.Generator().manual_seed(5)
    for _ in range(10):
        s = torch.rand(2, generator=generator, dtype=torch.float64) * 2 - 0.5
        w = torch.rand(2, generator=generator, dtype=torch.float64) * 4 + 0.25 if priced else torch.ones(2).double()
        budget = float(torch.rand(1, generator=generator, dtype=torch.float64) * w.sum())
        feasible = points[(points * w).sum(dim=1) <= budget + 1e-12]
        best = ((feasible - s) ** 2).sum(dim=1).min()
        x = project_scores(s, budget, prices=w if priced else None)
        assert float((x * w).sum()) <= budget + 1e-12 and x.min() >= 0 and x.max() <= 1
        assert ((x - s) ** 2).sum() <= best + 1e-12  # no grid point is closer,
        assert best - ((x - s) ** 2).sum() <= 1e-2  # and the grid's best is near it


def test_unit_prices_give_the_channel_budget_and_prices_match_the_scores() -> None:
    generator = torch.Generator().manual_seed(5)
    s = torch.randn(300, generator=generator) + 0.5
    torch.testing.assert_close(project_scores(s, 70.0, prices=torch.ones(300)), project_scores(s, 70.0), atol=1e-6,
                               rtol=0)
    with pytest.raises(ValueError, match="prices must have the shape of the scores"):
        project_scores(s, 70.0, prices=torch.ones(299))


def test_projection_is_idempotent_and_feasible_points_are_fixed() -> None:
    generator = torch.Generator().manual_seed(1)
    s = torch.randn(50, generator=generator, dtype=torch.float64) + 0.5
    x = project_scores(s, 12.5)
    torch.testing.assert_close(project_scores(x, 12.5), x, atol=1e-12, rtol=0)
    feasible = torch.rand(50, generator=generator, dtype=torch.float64) * 0.2
    torch.testing.assert_close(project_scores(feasible, 12.5), feasible, atol=0, rtol=0)


def test_projection_edge_cases() -> None:
    f64 = torch.float64
    # all above 1: every entry shifts down by the same v; the budget is met exactly
    s = torch.tensor([2.0, 2.5, 3.0, 1.2], dtype=f64)
    x = project_scores(s, 1.5)
    assert math.isclose(float(x.sum()), 1.5, abs_tol=1e-12)
    assert_is_projection(s, 1.5, x, 1e-10)
    # budget in (0, 1)
    s = torch.tensor([0.9, 0.8, 0.1], dtype=f64)
    x = project_scores(s, 0.5)
    torch.testing.assert_close(x, torch.tensor([0.3, 0.2, 0.0], dtype=f64), atol=1e-12, rtol=0)
    # K >= n: plain clamp
    s = torch.tensor([-1.0, 0.4, 7.0], dtype=f64)
    torch.testing.assert_close(project_scores(s, 3.0), torch.tensor([0.0, 0.4, 1.0], dtype=f64))
    torch.testing.assert_close(project_scores(s, 10.0), torch.tensor([0.0, 0.4, 1.0], dtype=f64))
    # ties: equal scores stay equal and share the budget
    x = project_scores(torch.full((10,), 0.7, dtype=f64), 3.0)
    torch.testing.assert_close(x, torch.full((10,), 0.3, dtype=f64), atol=1e-12, rtol=0)
    # K = 0: everything goes to 0
    torch.testing.assert_close(project_scores(torch.tensor([0.5, 2.0, -1.0]), 0.0), torch.zeros(3))
    # solution at a breakpoint of f: v = 0.5 lands exactly where the second entry leaves the box
    x = project_scores(torch.tensor([1.5, 0.5, 0.2], dtype=f64), 1.0)
    torch.testing.assert_close(x, torch.tensor([1.0, 0.0, 0.0], dtype=f64), atol=1e-12, rtol=0)
    # flat stretch of f (no partial entries between breakpoints)
    x = project_scores(torch.tensor([3.0, 3.0, -1.0], dtype=f64), 1.5)
    torch.testing.assert_close(x, torch.tensor([0.75, 0.75, 0.0], dtype=f64), atol=1e-12, rtol=0)


def test_projection_shape_dtype_autograd_and_empty() -> None:
    s = torch.rand(3, 4, requires_grad=True)
    x = project_scores(s, 2.0)
    assert x.shape == (3, 4) and x.dtype == torch.float32 and not x.requires_grad
    half = project_scores(torch.full((8,), 0.9, dtype=torch.float16), 2.0)
    assert half.dtype == torch.float16 and math.isclose(float(half.float().sum()), 2.0, abs_tol=1e-2)
    assert project_scores(torch.empty(0), 1.0).numel() == 0


def test_projection_large_input_float32() -> None:
    generator = torch.Generator().manual_seed(7)
    s = torch.rand(50_000, generator=generator) * 1.4 - 0.2
    x = project_scores(s, 5_000.0)
    reference, _ = reference_projection(s, 5_000.0, iterations=60)
    torch.testing.assert_close(x.double(), reference, atol=2e-5, rtol=0)
    assert abs(float(x.double().sum()) - 5_000.0) < 0.1


@pytest.mark.parametrize("budget", [-1.0, math.nan, math.inf, "3", None])
def test_projection_rejects_bad_budget(budget: float) -> None:
    with pytest.raises(ValueError, match="budget"):
        project_scores(torch.rand(4), budget)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("priced", [False, True])
def test_a_budget_on_the_device_projects_as_the_number_without_a_host_read(dtype, priced) -> None:
    """The projection inside a captured search step reads its budget from a device scalar: the same result, bit for
    bit, as the budget given as a number, and no value goes to the host."""
    from test_static import _Recorder

    generator = torch.Generator().manual_seed(3)
    prices = torch.rand(300, generator=generator, dtype=torch.float64) + 0.5 if priced else None
    for budget in (0.0, 17.25, 70.0, 150.5, 400.0):  # an empty budget, binding ones, a slack one
        s = (torch.rand(300, generator=generator, dtype=torch.float64) * 1.4 - 0.2).to(dtype)
        w = None if prices is None else prices.to(dtype)
        device_budget = torch.tensor(budget, dtype=dtype)
        with _Recorder() as recorder:
            x = project_scores(s, device_budget, prices=w)
        assert not recorder.found, recorder.found
        torch.testing.assert_close(x, project_scores(s, budget, prices=w), rtol=0, atol=0)


@pytest.mark.parametrize("budget", [torch.ones(2), torch.tensor(3), torch.tensor([True])], ids=["two", "int", "bool"])
def test_a_bad_budget_tensor_is_one_line(budget) -> None:
    with pytest.raises(ValueError, match="one floating-point value on the scores' device"):
        project_scores(torch.rand(4), budget)


def test_projection_rejects_integer_scores() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        project_scores(torch.ones(4, dtype=torch.long), 2.0)


# ------------------------------------------------------------------------------------------------------ estimators


def toy_problem(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L(m) = sum_j c_j m_j + sum_{i<j} q_ij m_i m_j with q strictly upper triangular."""
    generator = torch.Generator().manual_seed(seed)
    c = torch.randn(n, generator=generator, dtype=torch.float64)
    q = torch.randn(n, n, generator=generator, dtype=torch.float64).triu(1)
    return c, q


def toy_loss(mask: torch.Tensor, c: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    m = mask.double()
    return m @ c + ((m @ q) * m).sum(dim=-1)


def toy_target(s: torch.Tensor, c: torch.Tensor, q: torch.Tensor, alpha: float) -> torch.Tensor:
    """H^alpha(s) grad_s E[L]: E[L] = c.s + sum_{i<j} q_ij s_i s_j, so grad = c + (q + q^T) s (zero diagonal)."""
    return (s * (1 - s)) ** alpha * (c + (q + q.T) @ s)


def all_masks(n: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0, 1], repeat=n)), dtype=torch.float64)


def mask_probabilities(masks: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.where(masks.bool(), s, 1 - s).prod(dim=-1)


def test_log_prob_grad_matches_autograd() -> None:
    s = torch.tensor([0.1, 0.5, 0.93, 0.3], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, False, True, False])
    m = mask.double()
    (m * s.log() + (1 - m) * (1 - s).log()).sum().backward()
    torch.testing.assert_close(log_prob_grad(mask, s), s.grad)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_vrpge_formula(alpha: float) -> None:
    s = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64)
    mask = torch.tensor([True, False, True])
    expected = (3.0 - 1.25) * (s * (1 - s)) ** alpha * log_prob_grad(mask, s)  # supplement eq. (12)
    torch.testing.assert_close(vrpge(3.0, 1.25, mask, s, alpha=alpha), expected)
    mask2 = torch.tensor([False, False, True])
    h_alpha = (s * (1 - s)) ** alpha
    symmetric = 0.5 * (3.0 - 1.25) * h_alpha * (log_prob_grad(mask, s) - log_prob_grad(mask2, s))
    torch.testing.assert_close(vrpge_sym(3.0, 1.25, mask, mask2, s, alpha=alpha), symmetric)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.75])
def test_estimators_are_exactly_unbiased_by_enumeration(name: str, alpha: float) -> None:
    """Supplement A.3: E_{m, m'}[G] = H^alpha(s) grad_s E[L], summing over all 2^n x 2^n mask pairs."""
    n = 4
    c, q = toy_problem(n, seed=11)
    s = torch.tensor([0.05, 0.3, 0.6, 0.97], dtype=torch.float64)
    masks = all_masks(n)
    weights = mask_probabilities(masks, s)
    loss = toy_loss(masks, c, q)
    index_m, index_m2 = torch.cartesian_prod(torch.arange(len(masks)), torch.arange(len(masks))).T
    g = score_grad(name, loss[index_m, None], loss[index_m2, None], masks[index_m], masks[index_m2], s, alpha=alpha)
    mean = ((weights[index_m] * weights[index_m2])[:, None] * g).sum(dim=0)
    torch.testing.assert_close(mean, toy_target(s, c, q, alpha), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("alpha", [0.5, 0.75])
def test_vrpge_second_moment_within_supplement_a2_bound(alpha: float) -> None:
    """E||G||^2 <= V_max(s) sum_j s_j^{2a} (1-s_j)^{2a-1} + s_j^{2a-1} (1-s_j)^{2a} <= |C| V_max(s) (supplement A.2)."""
    n = 4
    c, q = toy_problem(n, seed=5)
    s = torch.tensor([0.02, 0.2, 0.5, 0.9], dtype=torch.float64)
    masks = all_masks(n)
    weights = mask_probabilities(masks, s)
    loss = toy_loss(masks, c, q)
    index_m, index_m2 = torch.cartesian_prod(torch.arange(len(masks)), torch.arange(len(masks))).T
    pair_weight = weights[index_m] * weights[index_m2]
    g = vrpge(loss[index_m, None], loss[index_m2, None], masks[index_m], s, alpha=alpha)
    second_moment = float((pair_weight * (g**2).sum(dim=1)).sum())
    gap2 = (loss[index_m] - loss[index_m2]) ** 2
    v_max = 0.0
    for j, value in itertools.product(range(n), [0.0, 1.0]):  # E over m_{-j}, m' with m_j fixed
        given = masks[index_m, j] == value
        conditional = pair_weight[given] / (s[j] if value == 1.0 else 1 - s[j])
        v_max = max(v_max, float((conditional * gap2[given]).sum()))
    a = alpha
    factor = float((s ** (2 * a) * (1 - s) ** (2 * a - 1) + s ** (2 * a - 1) * (1 - s) ** (2 * a)).sum())
    assert second_moment <= v_max * factor * (1 + 1e-12)
    assert factor <= n


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_estimators_monte_carlo_mean_converges(name: str) -> None:
    """The seeded Monte-Carlo mean is within 5 standard errors of H^alpha(s) grad_s E[L] in every component."""
    n, samples, alpha = 6, 100_000, 0.5
    c, q = toy_problem(n, seed=2)
    s = torch.tensor([0.05, 0.2, 0.4, 0.5, 0.75, 0.9], dtype=torch.float64)
    generator = torch.Generator().manual_seed(123)
    mask_m = torch.rand(samples, n, generator=generator, dtype=torch.float64) < s
    mask_m2 = torch.rand(samples, n, generator=generator, dtype=torch.float64) < s
    loss_m, loss_m2 = toy_loss(mask_m, c, q)[:, None], toy_loss(mask_m2, c, q)[:, None]
    g = score_grad(name, loss_m, loss_m2, mask_m, mask_m2, s, alpha=alpha)
    standard_error = g.std(dim=0) / math.sqrt(samples)
    error = (g.mean(dim=0) - toy_target(s, c, q, alpha)).abs()
    assert torch.all(error <= 5 * standard_error), (error / standard_error).tolist()


def test_preconditioning_lowers_variance_when_scores_are_near_zero() -> None:
    """Supplement Remark 3: with alpha = 0 the variance grows like 1/s_j; alpha = 1/2 keeps it bounded."""
    n, samples = 20, 20_000
    c, q = toy_problem(n, seed=4)
    s = torch.full((n,), 0.02, dtype=torch.float64)
    s[:3] = 0.6
    generator = torch.Generator().manual_seed(9)
    mask_m = torch.rand(samples, n, generator=generator, dtype=torch.float64) < s
    mask_m2 = torch.rand(samples, n, generator=generator, dtype=torch.float64) < s
    loss_m, loss_m2 = toy_loss(mask_m, c, q)[:, None], toy_loss(mask_m2, c, q)[:, None]
    for estimator in (vrpge, lambda *args, **kw: vrpge_sym(*args[:3], mask_m2, *args[3:], **kw)):
        variance = {a: float(estimator(loss_m, loss_m2, mask_m, s, alpha=a).var(dim=0).sum()) for a in (0.0, 0.5)}
        assert variance[0.5] < 0.2 * variance[0.0]


def test_estimators_batched_equals_rowwise_and_follow_dtype() -> None:
    s = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    masks = torch.tensor([[True, False, True], [False, True, True]])
    masks2 = torch.tensor([[False, False, True], [True, True, False]])
    losses, losses2 = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.5], [2.5]])
    batched = vrpge_sym(losses, losses2, masks, masks2, s)
    for row in range(2):
        single = vrpge_sym(losses[row, 0], losses2[row, 0], masks[row], masks2[row], s)
        torch.testing.assert_close(batched[row], single)
    assert batched.dtype == torch.float64
    loss = torch.tensor(1.0, requires_grad=True) * 3
    g32 = vrpge(loss, 1.0, masks[0], s.float())
    assert g32.dtype == torch.float32 and not g32.requires_grad


def test_estimators_are_finite_at_the_box_boundary() -> None:
    s = torch.tensor([0.0, 1.0, 0.0, 1.0])
    mask = torch.tensor([False, True, False, True])  # the only masks Bernoulli(s) can draw here
    for alpha in (0.0, 0.5):
        g = vrpge(2.0, 1.0, mask, s, alpha=alpha)
        assert torch.equal(g, torch.zeros(4))
    assert torch.isfinite(vrpge(2.0, 1.0, ~mask, s)).all()  # a forced channel (empty-group policy) stays finite


@pytest.mark.parametrize("alpha", [-0.1, 1.0, 1.5, math.nan, "0.5", None])
def test_bad_alpha_is_rejected(alpha: float) -> None:
    with pytest.raises(ValueError, match=r"alpha .*\[0, 1\)"):
        vrpge(1.0, 0.0, torch.ones(3, dtype=torch.bool), torch.full((3,), 0.5), alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        check_alpha(alpha)


def test_unknown_estimator_and_mismatched_lengths_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"'reinforce'.*'vrpge', 'vrpge_sym'"):
        get_estimator("reinforce")
    with pytest.raises(ValueError, match="unknown estimator"):
        score_grad("nope", 1.0, 0.0, torch.ones(2), torch.ones(2), torch.full((2,), 0.5))
    with pytest.raises(ValueError, match="channels"):
        vrpge(1.0, 0.0, torch.ones(3, dtype=torch.bool), torch.full((4,), 0.5))
    assert get_estimator("vrpge") is vrpge and get_estimator("vrpge_sym") is vrpge_sym


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_score_grad_passes_eps_on_to_the_estimator(name: str, alpha: float) -> None:
    """A non-default eps reaches the estimator through score_grad: at s = 0 and s = 1 (h = 0) the factor is
    eps^(alpha - 1), against the closed form of docs/methods.md with h clamped at eps, in float64."""
    s = torch.tensor([0.0, 1.0, 0.3, 0.0], dtype=torch.float64)
    mask = torch.tensor([True, False, True, False])  # channel 0 forced in at s = 0 (the empty-group policy)
    mask2 = torch.tensor([False, True, False, True])
    eps = 0.01
    factor = (s * (1 - s)).clamp_min(eps) ** (alpha - 1)
    m, m2 = mask.double(), mask2.double()
    expected = (3.0 - 1.25) * ((m - s) if name == "vrpge" else 0.5 * (m - m2)) * factor
    got = score_grad(name, 3.0, 1.25, mask, mask2, s, alpha=alpha, eps=eps)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(get_estimator(name)(3.0, 1.25, mask, *([mask2] if name == "vrpge_sym" else []), s,
                                                   alpha=alpha, eps=eps), expected, rtol=1e-12, atol=0)


def test_estimators_carry_no_autograd_history_of_the_scores() -> None:
    """The results are meant for scores.grad: no autograd history even when s (the parameter itself) requires grad."""
    s = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64, requires_grad=True)
    mask, mask2 = torch.tensor([True, False, True]), torch.tensor([False, False, True])
    loss = torch.tensor(2.0, dtype=torch.float64, requires_grad=True) * 1.5
    results = [log_prob_grad(mask, s), vrpge(loss, 1.0, mask, s), vrpge_sym(loss, 1.0, mask, mask2, s),
               *(score_grad(name, loss, 1.0, mask, mask2, s) for name in sorted(ESTIMATORS))]
    for g in results:
        assert not g.requires_grad and g.grad_fn is None


# ----------------------------------------------------------------------------------------------------- scores

GROUPS = {"stem": 4, "layer1": 8, "layer1.0.conv1": 8, "fc_in": 3}


def test_channel_scores_construction_and_projection() -> None:
    scores = ChannelScores(GROUPS, keep_ratio=0.25)
    params = list(scores.parameters())
    assert len(params) == 1 and params[0] is scores.scores and params[0].shape == (23,)
    assert scores.budget == pytest.approx(0.25 * 23)
    torch.testing.assert_close(scores.scores.detach(), torch.full((23,), 0.25))  # 0.5 projected onto the budget
    loose = ChannelScores(GROUPS, keep_ratio=1.0, init=0.3, dtype=torch.float64)
    assert loose.scores.dtype == torch.float64 and torch.all(loose.scores == 0.3)
    with torch.no_grad():
        scores.scores.add_(torch.linspace(-1, 2, 23))
    scores.project_()
    projected = scores.scores.detach()
    assert float(projected.sum()) <= scores.budget + 1e-5 and 0 <= projected.min() <= projected.max() <= 1
    assert "keep_ratio=0.25" in repr(scores)


@pytest.mark.parametrize("keep_ratio", [0.0, -0.5, 1.5, math.nan, True, "0.5", None])
def test_bad_keep_ratio_is_rejected(keep_ratio: float) -> None:
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
        ChannelScores(GROUPS, keep_ratio=keep_ratio)


@pytest.mark.parametrize("groups", [{}, {"a": 0}, {"a": 2.5}, {"": 3}, {"a": True}, [("a", 3)]])
def test_bad_groups_are_rejected(groups: dict) -> None:
    with pytest.raises(ValueError, match="group"):
        ChannelScores(groups, keep_ratio=0.5)


def test_bad_init_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"init must be in \[0, 1\]"):
        ChannelScores(GROUPS, keep_ratio=0.5, init=1.5)


def test_split_and_flatten_round_trip() -> None:
    scores = ChannelScores(GROUPS, keep_ratio=0.5)
    flat = torch.arange(23.0)
    parts = scores.split(flat)
    assert list(parts) == list(GROUPS) and [len(v) for v in parts.values()] == list(GROUPS.values())
    assert torch.equal(parts["layer1"], torch.arange(4.0, 12.0))
    assert torch.equal(scores.flatten(parts), flat)
    batched = torch.arange(46.0).reshape(2, 23)
    assert torch.equal(scores.flatten(scores.split(batched)), batched)
    with pytest.raises(ValueError, match="23 channels"):
        scores.split(torch.zeros(22))
    with pytest.raises(ValueError, match=r"missing \['fc_in'\], unexpected \['extra'\]"):
        scores.flatten({**{k: v for k, v in parts.items() if k != "fc_in"}, "extra": torch.zeros(3)})
    with pytest.raises(ValueError, match="'stem' has 4 channels"):
        scores.flatten({**parts, "stem": torch.zeros(5)})


def test_sample_dtype_shape_and_reproducibility() -> None:
    scores = ChannelScores(GROUPS, keep_ratio=0.5)
    mask = scores.sample(torch.Generator().manual_seed(0))
    assert list(mask) == list(GROUPS)
    for name, size in GROUPS.items():
        assert mask[name].dtype == torch.bool and mask[name].shape == (size,)
    same = scores.sample(torch.Generator().manual_seed(0))
    assert all(torch.equal(mask[k], same[k]) for k in GROUPS)
    generator = torch.Generator().manual_seed(1)
    state = generator.get_state()
    first = scores.sample_flat(generator)
    assert not torch.equal(first, scores.sample_flat(generator))  # the generator advances
    generator.set_state(state)
    assert torch.equal(first, scores.sample_flat(generator))
    different = [scores.sample_flat(torch.Generator().manual_seed(seed)) for seed in range(2, 6)]
    assert any(not torch.equal(scores.flatten(mask), other) for other in different)


def test_sample_frequencies_match_scores() -> None:
    scores = ChannelScores({"a": 6, "b": 6}, keep_ratio=1.0, dtype=torch.float64)
    with torch.no_grad():
        scores.scores.copy_(torch.tensor([0.5, 0.9, 0.3, 0.7, 0.6, 0.8] * 2))  # groups never end up empty in practice
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([scores.sample_flat(generator) for _ in range(2000)]).double()
    standard_error = (scores.scores * (1 - scores.scores)).sqrt().detach() / math.sqrt(2000)
    assert torch.all((draws.mean(dim=0) - scores.scores.detach()).abs() <= 5 * standard_error)


def test_empty_group_policy_keeps_the_largest_score() -> None:
    scores = ChannelScores({"a": 4, "b": 4, "c": 3}, keep_ratio=1.0, dtype=torch.float64)
    with torch.no_grad():
        scores.scores.copy_(torch.tensor([0.0, 0.2, 0.2, 0.05, 0.9, 0.8, 0.7, 0.9, 0.0, 0.0, 0.0]))
    fallbacks = 0
    for seed in range(400):
        raw_generator = torch.Generator().manual_seed(seed)
        raw = torch.rand(11, generator=raw_generator, dtype=torch.float64) < scores.scores.detach()
        mask = scores.sample(torch.Generator().manual_seed(seed))
        raw_parts = scores.split(raw)
        for name in ("a", "b", "c"):
            assert mask[name].any()
            if raw_parts[name].any():
                assert torch.equal(mask[name], raw_parts[name])  # non-empty groups are left alone
        if not raw_parts["a"].any():
            fallbacks += 1
            assert torch.equal(mask["a"], torch.tensor([False, True, False, False]))  # largest score, lowest index
        assert torch.equal(mask["c"], torch.tensor([True, False, False]))  # all zero: lowest index
    expected = 400 * 0.8 * 0.8 * 0.95  # P(group "a" drawn empty) = prod_j (1 - s_j)
    assert abs(fallbacks - expected) <= 5 * math.sqrt(400 * 0.608 * 0.392)


def test_a_channel_is_kept_exactly_when_its_uniform_is_below_its_score() -> None:
    """m = [u < s]: a score of 0 is never kept, even at u = 0 (torch.rand can draw 0), a uniform equal to its score
    drops the channel and the float just below it keeps it; rows of a batch each follow the rule."""
    scores = ChannelScores({"a": 4, "b": 2}, keep_ratio=1.0, dtype=torch.float64)
    s = torch.tensor([0.0, 0.5, 0.5, 1.0, 0.0, 1.0], dtype=torch.float64)  # groups a and b keep their s = 1 channel
    with torch.no_grad():
        scores.scores.copy_(s)
    below = torch.nextafter(torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    u = torch.tensor([0.0, 0.5, float(below), 0.999, 0.0, 0.0], dtype=torch.float64)
    expected = torch.tensor([False, False, True, True, False, True])
    assert torch.equal(scores.mask_from_uniforms(u), expected)
    batch = torch.stack([u, torch.zeros(6, dtype=torch.float64)])
    assert torch.equal(scores.mask_from_uniforms(batch), torch.stack([expected, s > 0]))


def test_top_mask_never_keeps_more_than_the_budget_when_the_scores_spend_more() -> None:
    """Scores not yet projected onto a lowered budget (set_budget projects nothing) spend more than K: top_mask keeps
    round(K) channels, and with prices the prefix whose price comes closest to K (not to sum w s)."""
    groups = {"a": 4, "b": 4}
    plain = ChannelScores(groups, keep_ratio=1.0, dtype=torch.float64).set_budget(4.0)
    unit = ChannelScores(groups, keep_ratio=1.0, prices={"a": 3.0, "b": 3.0}, dtype=torch.float64).set_budget(4.0)
    priced = ChannelScores(groups, keep_ratio=1.0, prices={"a": 1.0, "b": 3.0}, dtype=torch.float64).set_budget(4.0)
    s = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.95, 0.85, 0.75, 0.65], dtype=torch.float64)  # sum 6.2 > K = 4
    for each in (plain, unit, priced):
        with torch.no_grad():
            each.scores.copy_(s)
    for each in (plain, unit):
        assert torch.equal(each.flatten(each.top_mask()).nonzero().flatten(), torch.tensor([0, 1, 4, 5]))
    w = priced.prices  # 0.5 for a, 1.5 for b
    assert float((w * s).sum()) > priced.budget
    forced, order = [4, 0], [5, 1, 6, 2, 7, 3]  # group maxima, then the rest by score
    totals = [float(w[forced + order[:n]].sum()) for n in range(len(order) + 1)]
    best = min(range(len(totals)), key=lambda n: (abs(totals[n] - priced.budget), -n))
    kept = priced.flatten(priced.top_mask())
    assert torch.equal(kept.nonzero().flatten(), torch.tensor(sorted(forced + order[:best])))


def test_priced_top_mask_rounds_a_half_up_as_the_count_does() -> None:
    """Equal prices: the priced rule equals the count rule, ties included: sum s = 2.5 keeps 3 channels (halves
    rounded up, the larger total on a tie), in float64 and float32 (both exact here)."""
    groups = {"a": 2, "b": 2}
    for dtype in (torch.float64, torch.float32):
        plain = ChannelScores(groups, keep_ratio=1.0, dtype=dtype)
        unit = ChannelScores(groups, keep_ratio=1.0, prices={"a": 5.0, "b": 5.0}, dtype=dtype)
        for each in (plain, unit):
            with torch.no_grad():
                each.scores.copy_(torch.tensor([0.75, 0.5, 0.75, 0.5]))  # sum 2.5 <= K = 4
        for each in (plain, unit):
            assert torch.equal(each.flatten(each.top_mask()), torch.tensor([True, True, True, False]))


def test_floor_is_one_channel_of_every_group_with_groups_of_different_sizes() -> None:
    """ChannelScores.floor: the number of groups, or the sum over groups of one channel's (normalised) price; the
    groups' first channels found from unequal sizes."""
    groups = {"a": 3, "b": 1, "c": 2}
    assert ChannelScores(groups, keep_ratio=0.5).floor == 3.0
    priced = ChannelScores(groups, keep_ratio=0.5, prices={"a": 1.0, "b": 2.0, "c": 4.0}, dtype=torch.float64)
    mean = (3 * 1.0 + 1 * 2.0 + 2 * 4.0) / 6
    assert priced.floor == pytest.approx((1.0 + 2.0 + 4.0) / mean, rel=1e-12)


def test_top_mask_keeps_the_budget_and_one_channel_per_group() -> None:
    scores = ChannelScores({"a": 4, "b": 4, "c": 2}, keep_ratio=0.4, dtype=torch.float64)  # K = 4
    with torch.no_grad():
        scores.scores.copy_(torch.tensor([0.9, 0.1, 0.8, 0.7, 0.6, 0.6, 0.0, 0.2, 0.01, 0.02]))
    mask = scores.flatten(scores.top_mask())
    # group maxima 0.9 (a), 0.6 (b, first of the tie), 0.02 (c); then the largest remaining: 0.8
    assert torch.equal(mask.nonzero().flatten(), torch.tensor([0, 2, 4, 9]))
    tiny = ChannelScores({"a": 3, "b": 3, "c": 3}, keep_ratio=0.1)  # round(0.9) = 1 < 3 groups
    kept = tiny.top_mask()
    assert all(int(m.sum()) == 1 for m in kept.values())
    half = ChannelScores({"a": 5}, keep_ratio=0.5)  # K = 2.5 rounds up to 3
    assert int(half.top_mask()["a"].sum()) == 3


def test_top_mask_keeps_the_expected_count_when_scores_settle_below_the_budget() -> None:
    scores = ChannelScores({"a": 4, "b": 4}, keep_ratio=0.75, dtype=torch.float64)  # K = 6
    with torch.no_grad():
        scores.scores.copy_(torch.tensor([0.9, 0.8, 0.02, 0.01, 0.9, 0.7, 0.03, 0.0]))  # sum s = 3.36 < K
    mask = scores.flatten(scores.top_mask())
    # round(sum s) = 3 channels, not round(K) = 6: the group maxima (0 and 4), then the largest remaining (1).
    assert torch.equal(mask.nonzero().flatten(), torch.tensor([0, 1, 4]))


def test_priced_scores_project_onto_the_priced_budget_and_fill_it_in_top_mask() -> None:
    """Prices scaled to a mean of 1; the scores feasible for sum w s <= K; prices of 1 change nothing; top_mask fills
    the priced budget in score order (checked prefix by prefix)."""
    groups, prices = {"stream": 4, "a": 4, "b": 2}, {"stream": 6.0, "a": 1.0, "b": 2.0}
    scores = ChannelScores(groups, keep_ratio=0.5, init=0.9, prices=prices, dtype=torch.float64)
    w = scores.prices
    torch.testing.assert_close(w, torch.tensor([6.0] * 4 + [1.0] * 4 + [2.0] * 2, dtype=torch.float64) / 3.2)
    s = scores.scores.detach()
    assert float((w * s).sum()) == pytest.approx(scores.budget) and s.min() >= 0 and s.max() <= 1
    assert s[0] < s[4]  # the expensive channels give up more probability
    assert "priced budget" in repr(scores)

    generator = torch.Generator().manual_seed(2)
    unit = ChannelScores(groups, keep_ratio=0.3, prices=dict.fromkeys(groups, 7.0), dtype=torch.float64)
    plain = ChannelScores(groups, keep_ratio=0.3, dtype=torch.float64)
    for _ in range(20):
        raw = torch.rand(10, generator=generator, dtype=torch.float64)
        for each in (unit, plain):
            with torch.no_grad():
                each.scores.copy_(raw)
            each.project_()
        torch.testing.assert_close(unit.scores, plain.scores, atol=1e-12, rtol=0)
        assert torch.equal(unit.flatten(unit.top_mask()), plain.flatten(plain.top_mask()))

    with torch.no_grad():
        scores.scores.copy_(torch.tensor([0.9, 0.2, 0.1, 0.0, 0.95, 0.9, 0.8, 0.3, 0.7, 0.05]))
    kept = scores.flatten(scores.top_mask())
    target = min(float((w * scores.scores.detach()).sum()), scores.budget)
    forced = [0, 4, 8]  # each group's largest score
    order = [5, 6, 7, 1, 2, 9, 3]  # the rest by score
    totals = [float(w[forced + order[:n]].sum()) for n in range(len(order) + 1)]
    best = min(range(len(totals)), key=lambda n: (abs(totals[n] - target), -n))
    assert torch.equal(kept.nonzero().flatten(), torch.tensor(sorted(forced + order[:best])))


def test_priced_scores_reject_bad_prices() -> None:
    with pytest.raises(ValueError, match="prices must give every group a price"):
        ChannelScores({"a": 2, "b": 2}, keep_ratio=0.5, prices={"a": 1.0})
    for bad in (0.0, -1.0, math.nan, math.inf, True):
        with pytest.raises(ValueError, match="price of group 'b' must be a positive finite number"):
            ChannelScores({"a": 2, "b": 2}, keep_ratio=0.5, prices={"a": 1.0, "b": bad})


def test_expected_kept() -> None:
    scores = ChannelScores({"a": 2, "b": 3}, keep_ratio=1.0, dtype=torch.float64)
    with torch.no_grad():
        scores.scores.copy_(torch.tensor([0.5, 0.25, 1.0, 0.0, 0.75]))
    kept = scores.expected_kept()
    assert isinstance(kept, ExpectedKept)
    assert kept.per_group == {"a": 0.75, "b": 1.75} and kept.ratio == pytest.approx(2.5 / 5)


def test_state_dict_round_trip_and_layout_check(tmp_path) -> None:
    scores = ChannelScores(GROUPS, keep_ratio=0.3)
    with torch.no_grad():
        scores.scores.copy_(torch.rand(23, generator=torch.Generator().manual_seed(0)))
    scores.project_()
    path = tmp_path / "scores.pt"
    torch.save(torch.nn.Sequential(scores).state_dict(), path)
    state = torch.load(path, weights_only=True)
    restored = torch.nn.Sequential(ChannelScores(GROUPS, keep_ratio=0.3))
    restored.load_state_dict(state)
    assert torch.equal(restored[0].scores, scores.scores)
    for other in ({**GROUPS, "extra": 2}, {"stem": 4, "layer1": 8, "layer1.0.conv2": 8, "fc_in": 3}):
        target = torch.nn.Sequential(ChannelScores(other, keep_ratio=0.3))
        before = target[0].scores.detach().clone()
        with pytest.raises(ValueError, match="cannot load ChannelScores.*another model"):
            target.load_state_dict(state)
        assert torch.equal(target[0].scores, before)  # nothing partial was written


def test_a_loaded_state_restores_the_budget_its_scores_were_projected_onto() -> None:
    """An annealed search's scores are feasible for the budget of their last projection: a load restores it (so that
    top_mask keeps as many channels as before), also into scores built with another keep ratio; a state saved before
    the budget was kept leaves the budget as built."""
    scores = ChannelScores(GROUPS, keep_ratio=0.3, init=1.0, budget=20.0)
    scores.set_budget(15.5).project_()
    kept = int(scores.flatten(scores.top_mask()).sum())
    for keep_ratio in (0.3, 0.5):
        restored = ChannelScores(GROUPS, keep_ratio=keep_ratio)
        restored.load_state_dict(scores.state_dict())
        assert restored.budget == 15.5 and int(restored.flatten(restored.top_mask()).sum()) == kept == 16
    old = scores.state_dict()
    old["_extra_state"] = {"groups": old["_extra_state"]["groups"]}
    restored = ChannelScores(GROUPS, keep_ratio=0.3)
    restored.load_state_dict(old)
    assert restored.budget == pytest.approx(0.3 * 23)


def test_the_estimators_refuse_a_dict_mask_and_per_example_losses_in_one_line() -> None:
    scores = ChannelScores(GROUPS, keep_ratio=0.5)
    with pytest.raises(TypeError, match=r"mask_m is a dict of groups; expected one flat tensor .*flatten\(mask\)"):
        vrpge(1.0, 2.0, scores.top_mask(), scores.scores)
    flat = scores.sample_flat(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"the losses have shape \(8,\); expected each mask's loss .*mean over the "):
        vrpge(torch.ones(8), torch.zeros(8), flat, scores.scores)
    with pytest.raises(ValueError, match=r"a model of plain torch layers has none: maskprop.make_prunable"):
        ChannelScores(maskprop.channel_groups(torch.nn.Linear(2, 2)), 0.5)
    two = torch.stack([flat, ~flat])  # two masks at once, one loss each: (2, 1)
    assert vrpge(torch.tensor([[1.0], [2.0]]), torch.zeros(2, 1), two, scores.scores).shape == (2, 23)


def test_score_training_loop_finds_the_useful_channels() -> None:
    """End to end on a toy loss: Adam on VR-PGE gradients plus projection moves the budget onto useful channels."""
    groups = {"a": 6, "b": 6}
    scores = ChannelScores(groups, keep_ratio=1 / 3)
    value = torch.tensor([3.0, 0, 0, 2.0, 0, 0, 0, 2.5, 0, 0, 0, 3.5])  # loss = -(value . m): keep the valued ones
    # A channel whose score reaches 0 is never sampled again and gets zero gradient (an absorbing state of the
    # method), so a small learning rate keeps noise from burying a useful channel early.
    optimizer = torch.optim.Adam(scores.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        mask, mask2 = scores.sample_flat(generator), scores.sample_flat(generator)
        loss, loss2 = -(value * mask).sum(), -(value * mask2).sum()
        scores.scores.grad = vrpge(loss, loss2, mask, scores.scores)
        optimizer.step()
        scores.project_()
    kept = scores.flatten(scores.top_mask())
    assert torch.equal(kept.nonzero().flatten(), torch.tensor([0, 3, 7, 11]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_projection_and_sampling() -> None:
    s = torch.randn(10_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.3
    x = project_scores(s.cuda(), 1234.5)
    assert x.is_cuda
    torch.testing.assert_close(x.cpu(), project_scores(s, 1234.5), atol=1e-12, rtol=0)
    scores = ChannelScores(GROUPS, keep_ratio=0.5, device="cuda")
    mask = scores.sample(torch.Generator(device="cuda").manual_seed(0))
    assert all(m.is_cuda and m.dtype == torch.bool for m in mask.values())
    with pytest.raises(ValueError, match="generator is on cpu"):
        scores.sample(torch.Generator().manual_seed(0))
