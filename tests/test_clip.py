"""Text encoders: parity with transformers' CLIP through diffusers' checkpoint converters, and exact key spaces.

Parity tests push small random models (width 64, 3 layers, 4 heads, the real 49408-token vocabulary and 77 positions)
through the real checkpoint prefixes, convert them with diffusers' `single_file_utils` converters, load the result
strictly into transformers' `CLIPTextModel` / `CLIPTextModelWithProjection` (eager attention, an independent
implementation of the causal mask) and compare in float32 with atol 1e-5, rtol 1e-5.
"""
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldm.clip import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder

BOS, EOS = 49406, 49407
VOCAB, CONTEXT = 49408, 77
SMALL = dict(width=64, layers=3, heads=4)
TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (LayerNorm gains around 1), so a swapped or transposed tensor cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(1.0)
    return model.eval()


def random_tokens(lengths: list[int], pad_token_id: int, seed: int = 1) -> torch.Tensor:
    """Rows of BOS, `length` random word ids, EOS, then padding: LongTensor [len(lengths), 77]."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.full((len(lengths), CONTEXT), pad_token_id, dtype=torch.long)
    for row, length in zip(rows, lengths):
        words = torch.randint(0, BOS, (length,), generator=generator)
        row[: length + 2] = torch.cat([torch.tensor([BOS]), words, torch.tensor([EOS])])
    return rows


def hf_config(width: int, layers: int, heads: int, hidden_act: str, projection_dim: int = 512) -> CLIPTextConfig:
    config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                            num_attention_heads=heads, max_position_embeddings=CONTEXT, hidden_act=hidden_act,
                            projection_dim=projection_dim, bos_token_id=BOS, eos_token_id=EOS)
    config._attn_implementation = "eager"
    return config


def model_keys(hf_model: nn.Module, converted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A converter's `text_model.*` dict in hf_model's keys: recent transformers flattened CLIPTextModel's wrapper."""
    if hasattr(hf_model, "text_model"):
        return converted
    return {key.removeprefix("text_model."): value for key, value in converted.items()}


def load_strict(hf_model: nn.Module, converted: dict[str, torch.Tensor]) -> nn.Module:
    hf_model.load_state_dict(model_keys(hf_model, converted), strict=True)
    return hf_model.eval()


def text_module(hf_model: nn.Module) -> nn.Module:
    return hf_model.text_model if hasattr(hf_model, "text_model") else hf_model


def prefixed(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state_dict.items()}


@torch.no_grad()
def test_sd1_clip_matches_transformers_for_every_clip_skip():
    ours = randomized(FrozenCLIPEmbedder(**SMALL))
    converted = convert_ldm_clip_checkpoint(prefixed(ours.state_dict(), "cond_stage_model."))
    hf = load_strict(CLIPTextModel(hf_config(**SMALL, hidden_act="quick_gelu")), converted)
    tokens = random_tokens([5, 0, 40], pad_token_id=EOS)
    out = hf(tokens, output_hidden_states=True)

    torch.testing.assert_close(ours.encode_tokens(tokens), out.last_hidden_state, **TOLERANCE)
    final_layer_norm = text_module(hf).final_layer_norm
    for clip_skip in (2, 3):  # A1111: the state clip_skip-1 layers back, then final_layer_norm
        torch.testing.assert_close(ours.encode_tokens(tokens, clip_skip=clip_skip),
                                   final_layer_norm(out.hidden_states[-clip_skip]), **TOLERANCE)


@torch.no_grad()
def test_sdxl_clip_l_gives_penultimate_state_without_final_norm():
    ours = randomized(FrozenCLIPEmbedder(**SMALL, layer="penultimate", final_norm=False))
    converted = convert_ldm_clip_checkpoint(prefixed(ours.state_dict(), "conditioner.embedders.0."))
    hf = load_strict(CLIPTextModel(hf_config(**SMALL, hidden_act="quick_gelu")), converted)
    tokens = random_tokens([7, 30], pad_token_id=EOS)
    out = hf(tokens, output_hidden_states=True)

    torch.testing.assert_close(ours.encode_tokens(tokens), out.hidden_states[-2], **TOLERANCE)
    torch.testing.assert_close(ours.encode_tokens(tokens, clip_skip=2), out.hidden_states[-3], **TOLERANCE)


@torch.no_grad()
def test_sd2_open_clip_gives_penultimate_state_then_ln_final():
    ours = randomized(FrozenOpenCLIPEmbedder(**SMALL, embed_dim=64))
    hf = CLIPTextModel(hf_config(**SMALL, hidden_act="gelu"))
    converted = convert_open_clip_checkpoint(hf, prefixed(ours.state_dict(), "cond_stage_model."),
                                             prefix="cond_stage_model.model.")
    load_strict(hf, converted)
    tokens = random_tokens([3, 60], pad_token_id=0)
    out = hf(tokens, output_hidden_states=True)

    final_layer_norm = text_module(hf).final_layer_norm
    torch.testing.assert_close(ours.encode_tokens(tokens), final_layer_norm(out.hidden_states[-2]), **TOLERANCE)
    torch.testing.assert_close(ours.encode_tokens(tokens, clip_skip=2), final_layer_norm(out.hidden_states[-3]),
                               **TOLERANCE)


@torch.no_grad()
def test_sdxl_open_clip_gives_penultimate_state_and_projected_pooled_eos():
    # embed_dim differs from width so that a transposed text_projection cannot pass.
    ours = randomized(FrozenOpenCLIPEmbedder(**SMALL, embed_dim=48, final_norm=False, return_pooled=True))
    hf = CLIPTextModelWithProjection(hf_config(**SMALL, hidden_act="gelu", projection_dim=48))
    converted = convert_open_clip_checkpoint(hf, prefixed(ours.state_dict(), "conditioner.embedders.1."),
                                             prefix="conditioner.embedders.1.model.")
    load_strict(hf, converted)
    tokens = random_tokens([9, 0, 75], pad_token_id=0)
    out = hf(tokens, output_hidden_states=True)

    context, pooled = ours.encode_tokens(tokens)
    torch.testing.assert_close(context, out.hidden_states[-2], **TOLERANCE)
    torch.testing.assert_close(pooled, out.text_embeds, **TOLERANCE)
    # clip_skip moves the context back; the pooled vector stays the last layer's.
    context, pooled = ours.encode_tokens(tokens, clip_skip=2)
    torch.testing.assert_close(context, out.hidden_states[-3], **TOLERANCE)
    torch.testing.assert_close(pooled, out.text_embeds, **TOLERANCE)


@torch.no_grad()
def test_padding_never_changes_the_prompt_positions():
    # Causal attention: positions up to EOS cannot see what follows, so EOS- and 0-padding agree there.
    ours = randomized(FrozenCLIPEmbedder(**SMALL))
    with_eos_padding = ours.encode_tokens(random_tokens([10], pad_token_id=EOS))
    with_zero_padding = ours.encode_tokens(random_tokens([10], pad_token_id=0))
    torch.testing.assert_close(with_eos_padding[:, :12], with_zero_padding[:, :12], atol=0, rtol=0)
    assert not torch.allclose(with_eos_padding[:, 12:], with_zero_padding[:, 12:])


# --- the full-size key spaces, built on the meta device -------------------------------------------------------------


def clip_l_keys() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of OpenAI CLIP ViT-L/14 text under SD1's `cond_stage_model.` (SDXL: conditioner.embedders.0.)."""
    width, root = 768, "transformer.text_model."
    keys = {root + "embeddings.token_embedding.weight": (VOCAB, width),
            root + "embeddings.position_embedding.weight": (CONTEXT, width),
            root + "final_layer_norm.weight": (width,), root + "final_layer_norm.bias": (width,)}
    for i in range(12):
        layer = f"{root}encoder.layers.{i}."
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys[f"{layer}self_attn.{projection}.weight"] = (width, width)
            keys[f"{layer}self_attn.{projection}.bias"] = (width,)
        for norm in ("layer_norm1", "layer_norm2"):
            keys[f"{layer}{norm}.weight"] = keys[f"{layer}{norm}.bias"] = (width,)
        keys |= {layer + "mlp.fc1.weight": (4 * width, width), layer + "mlp.fc1.bias": (4 * width,),
                 layer + "mlp.fc2.weight": (width, 4 * width), layer + "mlp.fc2.bias": (width,)}
    return keys


def open_clip_keys(width: int, layers: int, embed_dim: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of an OpenCLIP text tower under `cond_stage_model.` (SD2) / `conditioner.embedders.1.` (SDXL)."""
    keys = {"model.token_embedding.weight": (VOCAB, width), "model.positional_embedding": (CONTEXT, width),
            "model.ln_final.weight": (width,), "model.ln_final.bias": (width,),
            "model.text_projection": (width, embed_dim), "model.logit_scale": ()}
    for i in range(layers):
        block = f"model.transformer.resblocks.{i}."
        keys |= {block + "attn.in_proj_weight": (3 * width, width), block + "attn.in_proj_bias": (3 * width,),
                 block + "attn.out_proj.weight": (width, width), block + "attn.out_proj.bias": (width,),
                 block + "mlp.c_fc.weight": (4 * width, width), block + "mlp.c_fc.bias": (4 * width,),
                 block + "mlp.c_proj.weight": (width, 4 * width), block + "mlp.c_proj.bias": (width,)}
        for norm in ("ln_1", "ln_2"):
            keys[f"{block}{norm}.weight"] = keys[f"{block}{norm}.bias"] = (width,)
    return keys


def shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state_dict.items()}


def test_full_size_clip_l_has_exactly_the_sd1_and_sdxl_keys_and_converts_onto_vit_l():
    with torch.device("meta"):
        sd1 = FrozenCLIPEmbedder()
        sdxl = FrozenCLIPEmbedder(layer="penultimate", final_norm=False)
        vit_l = CLIPTextModel(hf_config(width=768, layers=12, heads=12, hidden_act="quick_gelu"))
    assert len(clip_l_keys()) == 2 + 12 * 16 + 2
    for ours, prefix in ((sd1, "cond_stage_model."), (sdxl, "conditioner.embedders.0.")):
        assert all(p.is_meta for p in ours.parameters())
        assert shapes(ours.state_dict()) == clip_l_keys()
        converted = convert_ldm_clip_checkpoint(prefixed(ours.state_dict(), prefix))
        assert shapes(model_keys(vit_l, converted)) == shapes(vit_l.state_dict())


def test_full_size_vit_h_has_exactly_the_sd2_keys_and_its_last_block_is_the_one_diffusers_drops():
    with torch.device("meta"):
        ours = FrozenOpenCLIPEmbedder()
        # diffusers' SD2 text encoder is ViT-H with 23 layers: it drops block 23 because SD2 uses the penultimate state.
        vit_h = CLIPTextModel(hf_config(width=1024, layers=23, heads=16, hidden_act="gelu"))
    assert all(p.is_meta for p in ours.parameters())
    assert shapes(ours.state_dict()) == open_clip_keys(width=1024, layers=24, embed_dim=1024)
    converted = convert_open_clip_checkpoint(vit_h, prefixed(ours.state_dict(), "cond_stage_model."))
    assert shapes(model_keys(vit_h, converted)) == shapes(vit_h.state_dict())


def test_full_size_vit_big_g_has_exactly_the_sdxl_keys_and_converts_onto_big_g_with_projection():
    with torch.device("meta"):
        ours = FrozenOpenCLIPEmbedder(width=1280, layers=32, heads=20, embed_dim=1280, final_norm=False,
                                      return_pooled=True)
        big_g = CLIPTextModelWithProjection(hf_config(width=1280, layers=32, heads=20, hidden_act="gelu",
                                                      projection_dim=1280))
    assert all(p.is_meta for p in ours.parameters())
    assert shapes(ours.state_dict()) == open_clip_keys(width=1280, layers=32, embed_dim=1280)
    converted = convert_open_clip_checkpoint(big_g, prefixed(ours.state_dict(), "conditioner.embedders.1."),
                                             prefix="conditioner.embedders.1.model.")
    assert shapes(model_keys(big_g, converted)) == shapes(big_g.state_dict())


# --- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder, clip_skip", [(FrozenCLIPEmbedder, 0), (FrozenCLIPEmbedder, 4),
                                                (FrozenOpenCLIPEmbedder, 0), (FrozenOpenCLIPEmbedder, 3)])
def test_clip_skip_beyond_the_available_layers_is_refused(encoder, clip_skip):
    model = encoder(**SMALL)  # 3 layers: "last" allows 1..3, "penultimate" 1..2
    with pytest.raises(ValueError, match="clip_skip"):
        model.encode_tokens(random_tokens([3], pad_token_id=0), clip_skip=clip_skip)


def test_token_rows_longer_than_the_context_are_refused():
    model = FrozenCLIPEmbedder(**SMALL)
    with pytest.raises(ValueError, match="n <= 77"):
        model.encode_tokens(torch.zeros(1, 78, dtype=torch.long))


def test_unknown_layer_name_is_refused():
    with pytest.raises(ValueError, match="layer='hidden'"):
        FrozenOpenCLIPEmbedder(**SMALL, layer="hidden")


# --- the string-level API -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder, pad_token_id", [(FrozenCLIPEmbedder, EOS), (FrozenOpenCLIPEmbedder, 0)])
@torch.no_grad()
def test_encoding_strings_equals_encoding_their_tokens_with_the_family_padding(encoder, pad_token_id):
    from ldm.tokenizer import CLIPTokenizer

    model = randomized(encoder(**SMALL, pad_token_id=pad_token_id))
    texts = ["a photo of a cat", "", "a dog in manipal university jaipur hostel on a rainy day"]
    tokens = CLIPTokenizer(pad_token_id=pad_token_id, context_length=CONTEXT)(texts)
    assert tokens[0, -1] == pad_token_id
    assert torch.equal(model(texts), model.encode_tokens(tokens))
