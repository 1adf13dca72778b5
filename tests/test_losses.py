"""The warping losses against MONAI's own."""

import pytest
import torch
from monai.losses import LocalNormalizedCrossCorrelationLoss

from bundle.losses import BoxLNCC


@pytest.mark.parametrize("dims, reduction", [(2, "mean"), (2, "none"), (3, "sum"), (1, "mean")])
def test_box_lncc_gives_monais_rectangular_lncc_and_its_gradient(dims, reduction):
    generator = torch.Generator().manual_seed(0)
    shape = (3, 2) + (24, 20, 16)[:dims]
    target = torch.rand(shape, generator=generator, dtype=torch.float64)
    # a prediction that resembles the target in places, and constant patches where the variance floor applies
    pred = (0.6 * target + 0.4 * torch.rand(shape, generator=generator, dtype=torch.float64)).requires_grad_()
    with torch.no_grad():
        pred[..., :6] = 0.5
    ours = BoxLNCC(spatial_dims=dims, kernel_size=5, reduction=reduction)
    monai = LocalNormalizedCrossCorrelationLoss(dims, kernel_size=5, kernel_type="rectangular", reduction=reduction)
    a, b = ours(pred, target), monai(pred, target)
    assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    (grad_a,) = torch.autograd.grad(a.sum(), pred)
    (grad_b,) = torch.autograd.grad(b.sum(), pred)
    assert grad_b.abs().max() > 0 and torch.allclose(grad_a, grad_b, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError):
        ours(pred, target[:1])
