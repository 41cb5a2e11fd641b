"""ControlNet (ldm.controlnet): parity with diffusers' ControlNetModel through lllyasviel's key layout, the UNet's
`control=` residuals against diffusers' `down_block_additional_residuals`, full-size layout on meta, and loading
(prefix or not, .pth / .safetensors, refused variants, strict key lists)."""
from dataclasses import asdict, replace

import pytest
import torch

import ldm
from ldm.checkpoint import CheckpointError
from ldm.controlnet import ControlNet, from_unet, load_controlnet, save_controlnet, sum_residuals
from ldm.presets import PRESETS, UNetConfig
from ldm.unet import UNetModel
from oracles import diffusers_controlnet, diffusers_unet
from random_weights import randomize_weights
from test_models import ATOL, RTOL, TINY_UNETS, TINY_VAE

pytestmark = pytest.mark.usefixtures("one_thread")

# One UNet of each family with attention, as in tests/test_models.py (SD1: conv projections and fixed heads; SD2:
# linear projections and fixed head width; SDXL: label_emb, no attention at level 0, deeper middle).
FAMILIES = ["sd1", "sd2", "sdxl"]


def encoder_config(config: UNetConfig) -> dict:
    return {key: value for key, value in asdict(config).items() if key != "out_channels"}


def random_controlnet(config: UNetConfig, seed: int = 0) -> ControlNet:
    """Every weight random and non-zero (the zero convs too), so each residual carries signal."""
    return randomize_weights(ControlNet(**encoder_config(config)), seed=seed).eval()


def inputs(config: UNetConfig, seed: int = 1):
    """(x [2, C, 8, 8], hint [2, 3, 64, 64] in [0, 1], t [2], context, y or None, diffusers' SDXL kwargs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, config.in_channels, 8, 8, generator=g)
    hint = torch.rand(2, 3, 64, 64, generator=g)
    t = torch.tensor([3.0, 777.0])
    context = torch.randn(2, 11, config.context_dim, generator=g)
    y, kwargs = None, {}
    if config.adm_in_channels:
        from ldm.layers import timestep_embedding
        pooled = torch.randn(2, config.adm_in_channels - 6 * 256, generator=g)
        time_ids = torch.tensor([[1024.0, 768.0, 16.0, 0.0, 1024.0, 1024.0]] * 2)
        y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), 256).reshape(2, -1)], dim=-1)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    return x, hint, t, context, y, kwargs


@pytest.mark.parametrize("family", FAMILIES)
def test_residuals_match_diffusers_controlnet_through_original_keys(family):
    config = TINY_UNETS[family]
    ours = random_controlnet(config)
    theirs, converted = diffusers_controlnet(config, TINY_VAE, {"control_model." + k: v
                                                                 for k, v in ours.state_dict().items()})
    theirs.load_state_dict(converted, strict=True)
    assert len(converted) == len(ours.state_dict())  # one of their tensors per one of ours
    theirs.eval()
    x, hint, t, context, y, kwargs = inputs(config)
    with torch.no_grad():
        down, mid = theirs(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False, **kwargs)
        residuals = ours(x, hint, t, context, y)
    assert len(residuals) == len(down) + 1 == len(ours.input_blocks) + 1
    for actual, expected in zip(residuals, [*down, mid]):
        assert expected.abs().mean() > 0.05  # a real signal
        # fp32 on CPU, two implementations: agreement to round-off over ~20 layers (tests/test_models.py's bound).
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_unet_step_with_control_equals_diffusers_additional_residuals(family):
    """One UNet+ControlNet call equals diffusers' UNet given the ControlNet's down/mid residuals, as
    StableDiffusionControlNetPipeline makes it, with conditioning_scale 0.7 on both sides."""
    config = TINY_UNETS[family]
    net = random_controlnet(config)
    unet = randomize_weights(UNetModel(**asdict(config)), seed=3).eval()
    their_unet, converted = diffusers_unet(config, TINY_VAE, {"model.diffusion_model." + k: v
                                                              for k, v in unet.state_dict().items()})
    their_unet.load_state_dict(converted, strict=True)
    their_net, converted = diffusers_controlnet(config, TINY_VAE, net.state_dict())  # no prefix: also read
    their_net.load_state_dict(converted, strict=True)
    their_unet.eval(), their_net.eval()
    x, hint, t, context, y, kwargs = inputs(config, seed=2)
    with torch.no_grad():
        down, mid = their_net(x, t, encoder_hidden_states=context, controlnet_cond=hint, conditioning_scale=0.7,
                              return_dict=False, **kwargs)
        expected = their_unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid, **kwargs).sample
        control = sum_residuals([net(x, hint, t, context, y)], [0.7])
        actual = unet(x, t, context, y, control=control)
        uncontrolled = unet(x, t, context, y)
    assert (actual - uncontrolled).abs().mean() > 0.05  # the control changes the prediction
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


def test_full_size_sd15_controlnet_has_diffusers_keys_and_shapes_on_meta():
    with torch.device("meta"):
        ours = ControlNet(**encoder_config(PRESETS["sd15"].unet))
    theirs, converted = diffusers_controlnet(PRESETS["sd15"].unet, PRESETS["sd15"].vae, ours.state_dict())
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape)
                                                                 for k, v in theirs.state_dict().items()}
    assert len(converted) == len(ours.state_dict())
    # lllyasviel's SD1.5 ControlNets: 12 zero convs (one per input block) and the hint encoder 3 -> 320 channels.
    assert len(ours.zero_convs) == 12 and ours.input_hint_block[14].weight.shape == (320, 256, 3, 3)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_control_none_is_todays_unet_and_a_fresh_controlnet_changes_nothing():
    """from_unet copies the encoder and starts with zero residuals (paper §3.2): the controlled UNet's output is then
    bitwise the uncontrolled one, whatever the hint."""
    model = randomize_weights(ldm.create_model("tiny"), seed=4).eval()
    net = from_unet(model).eval()
    for name in ("time_embed", "input_blocks", "middle_block"):
        for key, value in getattr(model.unet, name).state_dict().items():
            assert torch.equal(getattr(net, name).state_dict()[key], value), f"{name}.{key}"
    assert net.hint_downscale == model.first_stage_model.downscale
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 64)
    hint = torch.rand(1, 3, 8 * net.hint_downscale, 8 * net.hint_downscale)
    with torch.no_grad():
        residuals = net(x, hint, t, context)
        assert all(not r.any() for r in residuals)
        assert torch.equal(model.apply_model(x, t, context, control=residuals), model.apply_model(x, t, context))


def test_each_residual_is_added_to_its_own_skip_and_the_middle():
    """A residual at skip i changes exactly what the decoder's consumer of skip i sees: with the UNet's decoder input
    recorded, control[i] appears in the concatenated input of the output block that pops skip i."""
    unet = randomize_weights(UNetModel(**asdict(TINY_UNETS["sd1"])), seed=5).eval()
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 3, 48)
    seen = []
    hooks = [block.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
             for block in unet.output_blocks]
    with torch.no_grad():
        unet(x, t, context)
        plain, seen = seen, []
        skips = len(unet.input_blocks)
        for i in (0, skips - 1):
            control = [torch.zeros(1) for _ in range(skips)] + [torch.zeros(1)]
            control[i] = torch.full((1,), 0.5)  # broadcasts over the skip's [1, C, h, w]
            unet(x, t, context, control=control)
            consumer = skips - 1 - i  # output block k pops skip (skips - 1 - k)
            width = unet.skip_channels[i]
            torch.testing.assert_close(seen[consumer][:, -width:], plain[consumer][:, -width:] + 0.5)
            assert all(torch.equal(a, b) for a, b in zip(seen[:consumer], plain[:consumer]))
            seen = []
    for hook in hooks:
        hook.remove()
    with pytest.raises(ValueError, match="control has 2 residuals; this UNet takes"):
        unet(x, t, context, control=[torch.zeros(1)] * 2)


def test_sum_residuals_weights_and_adds_units():
    a = [torch.ones(2), torch.full((3,), 2.0)]
    b = [torch.full((2,), 10.0), torch.full((3,), -1.0)]
    total = sum_residuals([a, b], [0.5, 2.0])
    assert torch.equal(total[0], torch.full((2,), 20.5)) and torch.equal(total[1], torch.full((3,), -1.0))
    with pytest.raises(ValueError, match="one weight per residual list"):
        sum_residuals([a, b], [1.0])
    with pytest.raises(ValueError, match="different numbers of residuals"):
        sum_residuals([a, b[:1]], [1.0, 1.0])


def test_hint_of_the_wrong_size_is_refused_with_the_expected_size():
    net = ControlNet(**encoder_config(TINY_UNETS["sd1"]))
    with pytest.raises(ValueError, match=r"must be \[B, 3, 8h, 8w\] for latents \[1, 4, 8, 8\], got \[1, 3, 32, 32\]"):
        net(torch.randn(1, 4, 8, 8), torch.rand(1, 3, 32, 32), torch.tensor([1.0]), torch.randn(1, 3, 48))


# ----------------------------------------------------------------------------------------------------------------------
# Files


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value), key


@pytest.fixture(scope="module")
def tiny_net():
    # Four heads and a ÷4 autoencoder, neither visible in shapes: the metadata must carry both.
    return randomize_weights(ControlNet(**encoder_config(replace(TINY_UNETS["sd1"], num_heads=4)),
                                        hint_downscale=4), seed=6).eval()


def test_saved_file_has_the_original_layout_and_loads_back_exactly(tiny_net, tmp_path):
    path = tmp_path / "control.safetensors"
    save_controlnet(tiny_net, path)
    keys = ldm.checkpoint.read_state_dict(path).keys()
    assert all(key.startswith("control_model.") for key in keys)
    assert {"control_model.input_hint_block.14.weight", "control_model.zero_convs.0.0.weight",
            "control_model.middle_block_out.0.bias", "control_model.time_embed.2.weight"} <= keys
    loaded = load_controlnet(path)
    assert_same_weights(tiny_net, loaded)
    assert loaded.encoder_config == tiny_net.encoder_config and loaded.hint_downscale == 4
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([5.0]), torch.randn(1, 2, 48)
    hint = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(tiny_net(x, hint, t, context), loaded(x, hint, t, context)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("prefix", ["control_model.", ""])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_files_with_or_without_prefix_load_as_pth_and_safetensors(prefix, suffix, tmp_path):
    net = random_controlnet(TINY_UNETS["sd2"], seed=7)
    state_dict = {prefix + key: value for key, value in net.state_dict().items()}
    path = tmp_path / f"net{suffix}"
    if suffix == ".pth":
        # lllyasviel's 1.0 files: a Lightning checkpoint holding the whole SD model beside the ControlNet.
        torch.save({"state_dict": {**state_dict, "model.diffusion_model.out.2.bias": torch.zeros(4)}
                    if prefix else state_dict}, path)
    else:
        from safetensors.torch import save_file
        save_file(state_dict, str(path))
    assert_same_weights(net, load_controlnet(path))


@pytest.mark.parametrize("key, kind", [
    ("difference", "diff"),  # beside a whole ControlNet's keys, as kohya's diff files hold it
    ("lora_controlnet", "Control-LoRA"),
    ("lllite_unet_input_blocks_1_0.down.weight", "ControlNet-LLLite"),
    ("controlnet_cond_embedding.conv_in.weight", "diffusers' layout"),
    ("adapter.body.0.block1.weight", "T2I-Adapter"),
])
def test_other_kinds_of_control_files_are_refused_saying_what_they_are(key, kind, tmp_path):
    from safetensors.torch import save_file
    state_dict = {"control_model." + k: v for k, v in random_controlnet(TINY_UNETS["sd1"]).state_dict().items()}
    state_dict[key] = torch.zeros(1)
    path = tmp_path / "other.safetensors"
    save_file(state_dict if key == "difference" else {key: torch.zeros(1), "conv_in.weight": torch.zeros(1)},
              str(path))
    with pytest.raises(CheckpointError, match=kind):
        load_controlnet(path)


def test_a_model_file_is_not_a_controlnet(tmp_path):
    path = tmp_path / "model.safetensors"
    ldm.save_model(ldm.create_model("tiny"), path)
    with pytest.raises(CheckpointError, match="is not a ControlNet: it lacks input_hint_block.0.weight.*found"):
        load_controlnet(path)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    from safetensors.torch import save_file
    state_dict = {"control_model." + k: v for k, v in random_controlnet(TINY_UNETS["sd1"]).state_dict().items()}
    del state_dict["control_model.zero_convs.3.0.bias"]
    state_dict["control_model.zero_convs.3.0.extra"] = torch.zeros(1)
    path = tmp_path / "damaged.safetensors"
    save_file(state_dict, str(path))
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\) \[zero_convs.3.0.bias\], 1 unexpected key\(s\) "
                                              r"\[zero_convs.3.0.extra\]"):
        load_controlnet(path)
