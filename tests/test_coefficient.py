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
