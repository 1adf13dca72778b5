import pytest
import torch

from bundle.networks import WarpNet, affine_to_ddf


def test_warpnet_is_identity_at_initialisation():
    torch.manual_seed(0)
    net = WarpNet()
    moving, fixed = torch.rand(2, 1, 64, 48), torch.rand(2, 1, 64, 48)
    ddf = net(moving, fixed)
    assert ddf.shape == (2, 2, 64, 48)
    assert ddf.abs().max() < 1e-2
    torch.testing.assert_close(net.warp_image(moving, ddf), moving, atol=1e-2, rtol=0)


def test_single_moving_image_is_shared_across_the_batch():
    torch.manual_seed(0)
    net = WarpNet()
    moving, fixed = torch.rand(1, 1, 32, 32), torch.rand(3, 1, 32, 32)
    assert net(moving, fixed).shape == (3, 2, 32, 32)


def test_affine_translation_moves_content_by_that_many_pixels():
    theta = torch.tensor([[[1.0, 0.0, 3.0], [0.0, 1.0, -2.0]]])  # +3 rows, -2 columns
    ddf = affine_to_ddf(theta, (16, 20))
    assert torch.allclose(ddf[0, 0], torch.full((16, 20), 3.0)) and torch.allclose(
        ddf[0, 1], torch.full((16, 20), -2.0)
    )
    image = torch.zeros(1, 1, 16, 20)
    image[0, 0, 8, 10] = 1.0
    warped = WarpNet().warp_image(image, ddf)
    # output pixel p samples the input at p + ddf: the dot at (8, 10) appears at (5, 12)
    assert warped[0, 0, 5, 12] > 0.99


def test_identity_affine_gives_zero_field():
    theta = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    assert affine_to_ddf(theta, (8, 8)).abs().max() == 0


def test_one_two_channel_tensor_equals_the_two_argument_call():
    torch.manual_seed(0)
    net = WarpNet()
    with torch.no_grad():  # move away from the near-identity initialisation so the fields differ per input
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    moving, fixed = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    expected = net(moving, fixed)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(net(torch.cat([moving, fixed], 1)), expected)
    swapped = net(torch.cat([fixed, moving], 1))  # the channel order matters: 0 = moving, 1 = fixed
    assert not torch.allclose(swapped, expected)
    with pytest.raises(ValueError, match="2 x 1 channels"):
        net(torch.rand(1, 3, 32, 32))
