"""VAE behaviour beyond parity: tiled processing with blended seams, fp16 NaN recovery, the posterior."""
import pytest
import torch
import torch.nn.functional as F

from ldm.vae import AutoencoderKL, DiagonalGaussian, tiled_apply
from random_weights import randomize_weights


def local_decoder(z: torch.Tensor) -> torch.Tensor:
    """A stand-in for a decoder with no receptive field beyond one latent pixel: tiling must reproduce it exactly."""
    return F.interpolate(torch.tanh(z[:, :3] * 2 + 0.5), scale_factor=8, mode="nearest")


@pytest.mark.parametrize("size,tile,overlap", [((40, 56), 16, 4), ((33, 17), 16, 6), ((16, 16), 16, 4)])
def test_tiled_apply_blends_to_the_untiled_result_for_a_local_function(size, tile, overlap):
    z = torch.randn(2, 4, *size)
    torch.testing.assert_close(tiled_apply(local_decoder, z, tile, overlap, 8), local_decoder(z),
                               atol=1e-6, rtol=1e-6)


def test_tiled_encode_matches_untiled_for_a_local_function():
    image = torch.randn(1, 3, 96, 64)

    def local_encoder(x):  # 8× average pooling, 4 "moment" channels: strictly local to each 8×8 patch
        return F.avg_pool2d(torch.cat([x, x[:, :1]], dim=1), 8)

    torch.testing.assert_close(tiled_apply(local_encoder, image, 32, 16, 1 / 8), local_encoder(image),
                               atol=1e-6, rtol=1e-6)


def test_tiled_decode_is_close_to_full_decode_and_seamless():
    """Real decoder: GroupNorm statistics differ per tile, so tiled ≠ full exactly; blending keeps the difference
    small and spreads it smoothly instead of leaving hard seams at tile borders."""
    torch.manual_seed(0)
    vae = randomize_weights(AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1)).eval()
    vae.tile_latent, vae.tile_overlap_latent = 16, 8
    z = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        full = vae.decode(z, tiled=False)
        tiled = vae.decode(z)  # 32 > tile_latent: tiled automatically
    assert tiled.shape == full.shape
    rel = (tiled - full).norm() / full.norm()
    assert rel < 0.25
    # No seam: the jump between adjacent columns at a tile boundary is no larger than elsewhere in the image.
    col_jumps = (tiled[..., 1:] - tiled[..., :-1]).abs().mean(dim=(0, 1, 2))
    assert col_jumps.max() < 3 * col_jumps.median()


def test_fp16_overflow_is_retried_in_fp32():
    torch.manual_seed(0)
    vae = randomize_weights(AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1)).eval()
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(3e4)  # activations beyond fp16's 65504 -> inf -> NaN in GroupNorm
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        reference = vae.decode(z).clone()
        vae.half()
        out = vae.decode(z.half())
    assert torch.isfinite(reference).all()
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert vae.dtype == torch.float32  # stays upcast, as A1111's "revert VAE to 32-bit floats"
    torch.testing.assert_close(out.float(), reference, atol=2e-3, rtol=2e-3)


def test_posterior_sample_is_reproducible_and_has_the_encoded_moments():
    moments = torch.cat([torch.full((1, 4, 64, 64), 0.3), torch.full((1, 4, 64, 64), -2.0)], dim=1)
    posterior = DiagonalGaussian(moments)
    a = posterior.sample(torch.Generator().manual_seed(5))
    b = posterior.sample(torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert abs(a.mean().item() - 0.3) < 0.01
    assert abs(a.std().item() - torch.exp(torch.tensor(-1.0)).item()) < 0.01
    torch.testing.assert_close(posterior.mode(), moments[:, :4])
