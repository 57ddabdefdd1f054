import math

import pytest
import torch

from occ_exp.algo.coefficient import CoefficientState, occ_coefficient


def _rand(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(shape, generator=g) * 3
    main = old + 0.1 * torch.randn(shape, generator=g)
    mtp = old + 0.2 * torch.randn(shape, generator=g)
    mask = (torch.rand(shape, generator=g) > 0.3).float()
    return main, mtp, old, mask


def test_equals_formula():
    main, mtp, old, mask = _rand((5, 17))
    d_rl, d_mtp = main - old, mtp - old
    c = (mask * d_rl * d_mtp).sum().double()
    v2 = (mask * d_mtp**2).sum().double()
    expected = 0.7 * c / (v2 + 1e-8)
    got = occ_coefficient(main, mtp, old, mask, lambda_plus=0.7, eps=1e-8)
    assert got.shape == ()
    assert torch.isclose(got.double(), expected, rtol=1e-6)


def test_respects_mask():
    main, mtp, old, mask = _rand((4, 9), seed=1)
    ref = occ_coefficient(main, mtp, old, mask)
    # garbage (even inf/nan) where the mask is 0 must not change the result
    main2, mtp2 = main.clone(), mtp.clone()
    main2[mask == 0] = float("nan")
    mtp2[mask == 0] = float("inf")
    assert torch.equal(occ_coefficient(main2, mtp2, old, mask), ref)


def test_finite_when_mtp_equals_old():
    main, _, old, mask = _rand((3, 8), seed=2)
    lam = occ_coefficient(main, old.clone(), old, mask)
    assert math.isfinite(float(lam)) and float(lam) == 0.0
    # all-masked batch
    assert float(occ_coefficient(main, old, old, torch.zeros_like(mask))) == 0.0


def test_finite_for_huge_gaps():
    main, mtp, old, mask = _rand((3, 8), seed=3)
    lam = occ_coefficient(main * 1e6, mtp * 1e6, old, mask)
    assert math.isfinite(float(lam))


def test_can_be_negative():
    old = torch.zeros(1, 4)
    main = torch.tensor([[0.1, 0.2, 0.1, 0.3]])
    mtp = -main  # the MTP head moved against the policy
    assert float(occ_coefficient(main, mtp, old, torch.ones(1, 4))) < 0


def test_shape_mismatch_is_clear():
    with pytest.raises(ValueError, match="shapes differ"):
        occ_coefficient(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3), torch.ones(2, 3))


def test_no_gradient_flows():
    main, mtp, old, mask = _rand((2, 5))
    main.requires_grad_(True)
    mtp.requires_grad_(True)
    lam = occ_coefficient(main, mtp, old, mask)
    assert not lam.requires_grad


def test_ema_and_clip_state():
    st = CoefficientState(ema=0.5, clip=0.3)
    assert float(st(torch.tensor(1.0))) == pytest.approx(0.3)  # first value seeds the EMA, then clipped
    assert float(st(torch.tensor(0.0))) == pytest.approx(0.3)  # 0.5*1 + 0.5*0 = 0.5 -> clip 0.3
    s = st.state_dict()
    st2 = CoefficientState(ema=0.5, clip=0.3)
    st2.load_state_dict(s)
    assert st2.value == st.value


# -- estimator variants (regime.estimator) on hand-built tensors ------------------------------------
from occ_exp.algo.coefficient import ESTIMATORS  # noqa: E402

# one sequence, 5 positions, the last one padding (garbage log-probs there must not matter)
D_RL = [0.1, 0.2, -0.1, 0.5, 9.0]
D_MTP = [0.2, 0.1, 0.3, -1.0, 7.0]
MASK = [[1.0, 1.0, 1.0, 1.0, 0.0]]


def _hand():
    old = torch.full((1, 5), -1.0)
    return old + torch.tensor([D_RL]), old + torch.tensor([D_MTP]), old, torch.tensor(MASK)


def test_registry_has_the_variants():
    assert {"paper", "reference_code", "paper_in_clip", "exact"} <= set(ESTIMATORS)


def test_paper_estimator_by_hand():
    c = 0.1 * 0.2 + 0.2 * 0.1 - 0.1 * 0.3 - 0.5 * 1.0  # -0.49
    v2 = 0.04 + 0.01 + 0.09 + 1.0  # 1.14
    got = ESTIMATORS["paper"](*_hand(), 2.0, 1e-8)
    assert float(got) == pytest.approx(2.0 * c / v2, rel=1e-5)


def test_reference_code_estimator_by_hand():
    eps = 1e-2
    per_token = [r * m / (m * m + eps) for r, m in zip(D_RL[:4], D_MTP[:4])] + [0.0]  # padding counts as 0
    got = ESTIMATORS["reference_code"](*_hand(), 1.0, eps)
    assert float(got) == pytest.approx(sum(per_token) / 5, rel=1e-5)  # mean over all 5 positions
    # dilution: the same tokens with twice the padding give a smaller value
    main, mtp, old, mask = _hand()
    pad = lambda x, v: torch.cat([x, torch.full((1, 5), v)], 1)  # noqa: E731
    diluted = ESTIMATORS["reference_code"](pad(main, 0.0), pad(mtp, 0.0), pad(old, -1.0), pad(mask, 0.0), 1.0, eps)
    assert float(diluted) == pytest.approx(float(got) / 2, rel=1e-5)


def test_paper_in_clip_estimator_by_hand():
    # clip region [0.8, 1.28] for both ratios: token 3 (d_mtp=0.3 > log 1.28) and token 4 (d_rl=0.5,
    # d_mtp=-1) drop out, the badly wrong head token no longer flips the sign
    c = 0.1 * 0.2 + 0.2 * 0.1
    v2 = 0.04 + 0.01
    got = ESTIMATORS["paper_in_clip"](*_hand(), 1.0, 1e-8, clip_low=0.2, clip_high=0.28)
    assert float(got) == pytest.approx(c / v2, rel=1e-5)
    assert float(ESTIMATORS["paper"](*_hand(), 1.0, 1e-8)) < 0 < float(got)
    # a wider clip range keeps token 3 (d_mtp = 0.3 < log 1.4) but not token 4 (d_mtp = -1 < log 0.6)
    wide = ESTIMATORS["paper_in_clip"](*_hand(), 1.0, 1e-8, clip_low=0.4, clip_high=0.4)
    assert float(wide) == pytest.approx((c - 0.03) / (v2 + 0.09), rel=1e-5)


def test_exact_estimator_by_hand():
    from occ_exp.diagnostics import GradientProbe

    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    a, b = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64), torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    probe = GradientProbe((a * w).sum(), [w], [])
    got = ESTIMATORS["exact"](*_hand(), 0.5, 1e-8, probe=probe, k=0, loss_k=(b * w).sum() + (w * w).sum())
    assert float(got) == pytest.approx(0.5 * float(a @ b) / float(b @ b), rel=1e-6)  # grad at w=0: a and b
    with pytest.raises(ValueError, match="estimator=exact"):
        ESTIMATORS["exact"](*_hand(), 1.0, 1e-8)
