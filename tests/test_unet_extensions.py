"""UNet extension points: attention processors (ldm/attention.py), the block contract and readable forwards.

Small real UNets with random weights (every layer non-zero, so attention reaches the output), plus the embedded
default model for the attention-map test.
"""
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

import kernels
import ldm
from ldm.attention import AttentionStore, attention_layers, attention_processor, set_attention_processor, \
    token_positions
from ldm.unet import ResBlock, SpatialTransformer, UNetModel, declared_inputs
from shapes.judge import BACKGROUND_TOLERANCE, WHITE, label_components
from random_weights import randomize_weights
from sample.generate import generate
from sample.models import default_model
from sample.params import GenerationParams

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT_DIM = 24


def small_unet(seed: int = 0) -> UNetModel:
    unet = UNetModel(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                     num_heads=2, context_dim=CONTEXT_DIM)
    with torch.no_grad():
        randomize_weights(unet, seed)
    return unet.eval()


def unet_inputs(seed: int = 1, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0][:batch]),
            torch.randn(batch, 7, CONTEXT_DIM, generator=g))


def todays_attention(module, q, k, v, *, name, is_cross, scale):
    # The call CrossAttention made before processors existed.
    return kernels.attention(q, k, v)


# --- Attention processors -------------------------------------------------------------------------------------------


@torch.no_grad()
def test_default_processor_leaves_outputs_bitwise_unchanged():
    unet, inputs = small_unet(), unet_inputs()
    default = unet(*inputs)
    with attention_processor(unet, todays_attention):
        before_processors = unet(*inputs)
    set_attention_processor(unet, lambda *a, **k: torch.zeros_like(a[1]))
    set_attention_processor(unet, None)  # back to the default
    assert torch.equal(default, before_processors)
    assert torch.equal(unet(*inputs), default)


@torch.no_grad()
def test_custom_processor_sees_every_layer_name_once_per_unet_call():
    unet, inputs = small_unet(), unet_inputs()
    seen = []

    def spy(module, q, k, v, *, name, is_cross, scale):
        seen.append((name, is_cross))
        assert module is dict(unet.named_modules())[name]
        assert scale == q.shape[-1] ** -0.5
        return kernels.attention(q, k, v, scale)

    with attention_processor(unet, spy):
        unet(*inputs)
    expected = {name: name.endswith("attn2") for name in attention_layers(unet)}
    assert Counter(name for name, _ in seen) == Counter(list(expected))  # each exactly once
    assert dict(seen) == expected
    assert "input_blocks.1.1.transformer_blocks.0.attn2" in expected  # names are the state-dict paths in the UNet
    assert all(f"{name}.to_q.weight" in unet.state_dict() for name in expected)


@torch.no_grad()
def test_filter_selects_layers_and_the_context_manager_restores_them():
    unet, inputs = small_unet(), unet_inputs()
    reference = unet(*inputs)
    calls = []

    def zero_cross(module, q, k, v, *, name, is_cross, scale):
        calls.append(name)
        return torch.zeros_like(q)

    with attention_processor(unet, zero_cross, filter=lambda name, is_cross: is_cross):
        changed = unet(*inputs)
    assert calls and all(name.endswith("attn2") for name in calls)
    assert not torch.allclose(changed, reference)
    assert torch.equal(unet(*inputs), reference)
    # Processors are attributes, not modules: the state dict is untouched.
    assert list(unet.state_dict()) == list(small_unet().state_dict())
    with pytest.raises(RuntimeError, match="inside the block"):
        with attention_processor(unet, zero_cross):
            raise RuntimeError("inside the block")
    assert torch.equal(unet(*inputs), reference)  # restored although the block raised
    with pytest.raises(ValueError, match="matched none"):
        set_attention_processor(unet, zero_cross, filter=lambda name, is_cross: name == "no such layer")


@torch.no_grad()
def test_attention_store_computes_attention_and_probabilities_sum_to_one_over_keys():
    unet, inputs = small_unet(), unet_inputs()
    reference = unet(*inputs)
    store = AttentionStore()
    with attention_processor(unet, store):
        recorded_output = unet(*inputs)
        unet(*inputs)
    # The textbook softmax-matmul agrees with the fused path to float32 round-off.
    torch.testing.assert_close(recorded_output, reference, atol=1e-5, rtol=1e-5)
    cross_layers = {name for name in attention_layers(unet) if name.endswith("attn2")}
    assert set(store.sums) == cross_layers
    for name in cross_layers:
        assert store.counts[name] == 2
        probs = store.probabilities(name)  # [B, Nq, Nk]
        assert probs.shape[0] == 2 and probs.shape[-1] == 7
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    maps = store.maps((32, 32))  # [B, Nk, 32, 32]; bilinear resizing keeps the partition of unity
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 32, 32))


@torch.no_grad()
def test_attention_store_bounds_memory_by_resolution_and_keeps_heads_on_request():
    unet, inputs = small_unet(), unet_inputs()
    store = AttentionStore(max_query_tokens=4 * 4, keep_heads=True)
    with attention_processor(unet, store):
        unet(*inputs)
    # 8×8 latents: the 8×8 layers (64 queries) are skipped, only the 4×4 ones are kept.
    assert store.sums and all(probs.shape[-2] == 16 for probs in store.sums.values())
    assert all(probs.shape == (2, 2, 16, 7) for probs in store.sums.values())  # [B, heads, Nq, Nk]
    with pytest.raises(KeyError, match="recorded nothing"):
        store.probabilities("input_blocks.1.1.transformer_blocks.0.attn2")


def object_mask(image) -> np.ndarray:
    """The shapes judge's segmentation (metrics.shapes.detect_objects): ink far enough from the white background,
    in 8-connected components; the largest one is the drawn object."""
    ink = np.clip(WHITE - np.asarray(image, dtype=np.float64), 0.0, None)
    labels, count = label_components(np.linalg.norm(ink, axis=2) > BACKGROUND_TOLERANCE)
    assert count >= 1, "the model drew nothing"
    largest = np.bincount(labels.ravel())[1:].argmax() + 1
    return labels == largest


# Measured on seeds 1–3 (Euler a, 20 steps, CFG 3): in the decoder's first full-resolution (16×16 latent)
# transformer, the "red" token's map holds 0.55–0.65 of its mass inside the circle, which covers 0.11–0.15 of the
# image. Other layers localize less, and on this model the tokens "blue" and "green" do not localize in any layer: its
# text stage (train.shapes_text) writes the caption into the padding tokens, so word tokens need not carry their word.
COLOUR_LAYER = "output_blocks.4.1.transformer_blocks.0.attn2"


@torch.no_grad()
def test_colour_token_looks_at_the_drawn_object():
    checkpoint = default_model()
    prompt = "a red circle on the left"
    store = AttentionStore()
    with attention_processor(checkpoint.model, store, filter=lambda name, is_cross: is_cross):
        image = generate(checkpoint, GenerationParams(prompt=prompt, sampler_name="Euler a", steps=20, cfg_scale=3,
                                                      seed=1), progress=False).images[0]
    (red,) = token_positions(checkpoint.model.cond_stage_model.tokenizer, prompt, "red")
    assert red == 2  # BOS, "a", "red"
    # generate()'s CFG runs the conditional image first in the UNet's batch (samplers.CFGDenoiser).
    red_map = store.maps((image.height, image.width), layers=[COLOUR_LAYER])[0, red].numpy()
    inside = object_mask(image)
    share_inside = (red_map * inside).sum() / red_map.sum()
    assert share_inside > 0.5
    assert share_inside > 3 * inside.mean()


# --- Block contract ---------------------------------------------------------------------------------------------------


class PooledTextMixer(nn.Module):
    """A plain module following the block contract: declares `context` and `emb`, adds a pooled text vector and the
    timestep embedding to every pixel, then a 3×3 convolution."""

    def __init__(self, channels: int, context_dim: int, emb_dim: int):
        super().__init__()
        self.text = nn.Linear(context_dim, channels)
        self.time = nn.Linear(emb_dim, channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb, context):
        # x: [B, C, H, W], emb: [B, E], context: [B, M, Dc] -> [B, C, H, W]
        shift = self.text(context.mean(dim=1)) + self.time(emb)
        return x + self.conv(torch.relu(x + shift[:, :, None, None]))


def test_a_plain_module_following_the_contract_replaces_a_middle_block_and_trains():
    torch.manual_seed(0)
    unet = small_unet()
    original = unet.state_dict()
    channels = unet.middle_block[0].out_conv.out_channels
    unet.middle_block[1] = PooledTextMixer(channels, CONTEXT_DIM, unet.time_embed[0].out_features)
    state = unet.state_dict()
    untouched = {k for k in original if not k.startswith("middle_block.1.")}
    assert untouched <= state.keys()
    assert all(torch.equal(state[k], original[k]) for k in untouched)
    assert {k for k in state if k.startswith("middle_block.1.")} == {
        f"middle_block.1.{p}.{w}" for p in ("text", "time", "conv") for w in ("weight", "bias")}
    # The swapped block has no attention layers any more.
    assert not any(name.startswith("middle_block") for name in attention_layers(unet))

    unet.train()
    x, t, context = unet_inputs(batch=2)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = (unet(x, t, context) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert unet.middle_block[1].text.weight.grad.abs().sum() > 0  # the context reached the new block


def test_block_inputs_follow_the_declared_parameters():
    assert declared_inputs(ResBlock) == ("emb",)
    assert declared_inputs(SpatialTransformer) == ("context",)
    assert declared_inputs(nn.Conv2d) == ()
    assert declared_inputs(PooledTextMixer) == ("emb", "context")


# --- Readable forwards ----------------------------------------------------------------------------------------------


def test_named_pieces_add_no_state_dict_keys():
    unet = small_unet()
    block = unet.input_blocks[1][0]
    assert block.in_conv is block.in_layers[2] and block.out_conv is block.out_layers[3]
    assert unet.out_conv is unet.out[2]
    assert all(".in_conv." not in k and ".out_conv." not in k and not k.startswith("out_") for k in unet.state_dict())


def test_exported_from_ldm():
    assert ldm.set_attention_processor is set_attention_processor
    assert ldm.attention_processor is attention_processor
    assert ldm.AttentionStore is AttentionStore
