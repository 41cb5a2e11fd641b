"""CLIP towers against transformers' CLIP (random weights through a key mapping), CLIP score against torchmetrics."""
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig as HFCLIPConfig
from transformers import CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from ldm.checkpoint import CheckpointError, save_state_dict
from ldm.clip_model import CLIP, PRESETS, CLIPConfig, load_clip
from metrics.clip import clip_score, clip_similarities, preprocess
from metrics_oracles import torchmetrics
from random_weights import randomize_weights

TINY = CLIPConfig(embed_dim=48, image_resolution=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2,
                  text_width=64, text_layers=2, text_heads=4)

# OpenAI/open_clip names -> transformers names, per tensor; attention's packed in_proj is split into q, k, v.
RENAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: transformers' name
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
BLOCK_RENAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted = {}
    for key, tensor in state_dict.items():
        if block := re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)", key):
            tower, index, name, kind = block.groups()
            prefix = f"{'vision' if tower else 'text'}_model.encoder.layers.{index}."
            if name == "attn.in_proj":
                for projection, part in zip("qkv", tensor.chunk(3)):
                    converted[f"{prefix}self_attn.{projection}_proj.{kind}"] = part
            else:
                name = next(new + name[len(old):] for old, new in BLOCK_RENAMES.items() if name.startswith(old))
                converted[f"{prefix}{name}.{kind}"] = tensor
        elif key in TRANSPOSED:
            converted[TRANSPOSED[key]] = tensor.T
        else:
            converted[RENAMES[key]] = tensor
    return converted


def transformers_config(config: CLIPConfig) -> HFCLIPConfig:
    return HFCLIPConfig(
        text_config=dict(vocab_size=config.vocab_size, hidden_size=config.text_width,
                         intermediate_size=4 * config.text_width, num_hidden_layers=config.text_layers,
                         num_attention_heads=config.text_heads, max_position_embeddings=config.context_length,
                         hidden_act=config.activation, bos_token_id=49406, eos_token_id=49407, pad_token_id=0),
        vision_config=dict(hidden_size=config.vision_width, intermediate_size=4 * config.vision_width,
                           num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads,
                           image_size=config.image_resolution, patch_size=config.patch_size,
                           hidden_act=config.activation),
        projection_dim=config.embed_dim)


@pytest.fixture(scope="module")
def tiny_pair() -> tuple[CLIP, CLIPModel]:
    ours = randomize_weights(CLIP(TINY)).eval()
    reference = CLIPModel(transformers_config(TINY)).eval()
    reference.load_state_dict(to_transformers(ours.state_dict()), strict=True)
    return ours, reference


def features(output) -> torch.Tensor:
    # transformers 5 returns a model output with the projected embedding as pooler_output; 4.x a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_image_tower_matches_transformers_vision_model_with_projection(tiny_pair):
    ours, _ = tiny_pair
    vision_state = {k: v for k, v in to_transformers(ours.state_dict()).items()
                    if k.startswith(("vision_model.", "visual_projection."))}
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=48, hidden_act="quick_gelu")
    reference = CLIPVisionModelWithProjection(config).eval()
    reference.load_state_dict(vision_state, strict=True)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(pixel_values=pixels).image_embeds
        torch.testing.assert_close(ours.encode_image(pixels), expected, rtol=1e-5, atol=1e-5)


def test_both_towers_match_transformers_clip_model(tiny_pair):
    ours, reference = tiny_pair
    tokens = ours.tokenizer(["a red square above a blue circle", "", "a photo of a cat " * 30])
    attention_mask = (torch.arange(tokens.shape[1]) <= tokens.argmax(dim=-1, keepdim=True)).long()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_text(tokens),
                                   features(reference.get_text_features(input_ids=tokens,
                                                                        attention_mask=attention_mask)),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.encode_image(pixels), features(reference.get_image_features(pixels)),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["ViT-B/32", "ViT-L/14"])
def test_full_size_key_layout_maps_onto_transformers_shapes(name):
    """On the meta device (nothing allocated): every tensor of OpenAI's layout has its transformers counterpart with
    the same shape, so a released checkpoint in either layout describes exactly this architecture."""
    config = PRESETS[name]
    with torch.device("meta"):
        ours = CLIP(config)
        reference = CLIPModel(transformers_config(config))
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items() if not k.endswith("position_ids")}
    assert {k: tuple(v.shape) for k, v in to_transformers(ours.state_dict()).items()} == expected
    assert CLIPConfig.from_state_dict(ours.state_dict()) == config


def test_load_clip_reads_the_architecture_from_the_weights(tiny_pair, tmp_path):
    ours, _ = tiny_pair
    state = {k: v.contiguous() for k, v in ours.state_dict().items()}
    # OpenAI's TorchScript state dicts carry three hyper-parameter entries that are not weights.
    save_state_dict({**state, "input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
                     "vocab_size": torch.tensor(49408)}, tmp_path / "clip.safetensors")
    loaded = load_clip(tmp_path / "clip.safetensors", vision_head_width=32, text_head_width=16)
    assert loaded.config == TINY
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), ours.encode_image(pixels), rtol=0, atol=0)
    save_state_dict({k: v for k, v in state.items() if not k.startswith("visual.")}, tmp_path / "text.safetensors")
    with pytest.raises(CheckpointError, match="visual.conv1.weight"):
        load_clip(tmp_path / "text.safetensors")


def test_preprocess_is_openai_resize_shorter_side_then_centre_crop():
    """A 64x40 image: the shorter side goes to 32 by PIL bicubic (51x32, the longer side truncated), then the centre
    32x32 is cut ((51 - 32) / 2 = 9.5 rounds to 10 on the left), then per-channel normalisation."""
    pixels = np.random.default_rng(3).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    expected = np.asarray(image.resize((51, 32), Image.Resampling.BICUBIC), dtype=np.float32)[:, 10:42] / 255
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    expected = torch.from_numpy(((expected - mean) / std).astype(np.float32)).permute(2, 0, 1)
    torch.testing.assert_close(preprocess([image], 32)[0], expected)
    as_tensor = torch.from_numpy(pixels).permute(2, 0, 1) / 255
    torch.testing.assert_close(preprocess(as_tensor[None], 32)[0], expected)


def test_clip_score_matches_torchmetrics_with_the_same_model(tiny_pair):
    """torchmetrics' clip_score takes a callable returning (model, processor); given transformers' model with our
    weights and a processor that hands over our tokens and pixels, its number is ours (100 · cos, batch mean,
    clipped at 0)."""
    ours, reference = tiny_pair
    reference_clip_score = torchmetrics().functional.multimodal.clip_score  # the function
    prompts = ["a red square", "a blue circle above a green star", "two yellow triangles"]
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(4))

    class Processor:
        def __call__(self, text=None, images=None, return_tensors="pt", padding=True):
            if images is not None:
                return {"pixel_values": preprocess(images, 32)}
            tokens = ours.tokenizer(text)
            return {"input_ids": tokens,
                    "attention_mask": (torch.arange(77) <= tokens.argmax(dim=-1, keepdim=True)).long()}

    class TensorFeatures:
        """transformers 5 returns model outputs where torchmetrics 1.9 expects the feature tensors."""
        config = reference.config

        def to(self, device):
            return self

        def get_image_features(self, *args, **kwargs):
            return features(reference.get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs):
            return features(reference.get_text_features(*args, **kwargs))

    with torch.no_grad():
        expected = reference_clip_score(list(images), prompts, lambda: (TensorFeatures(), Processor()))
    similarities = clip_similarities(ours, images, prompts)
    assert clip_score(images, prompts, ours) == pytest.approx(max(expected.item(), 0.0), abs=1e-4)
    assert clip_score(images, prompts, ours) == pytest.approx(max(similarities.mean().item(), 0.0), abs=1e-6)


def test_clip_score_is_the_batch_mean_clipped_at_zero(tiny_pair):
    ours, _ = tiny_pair
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    prompts = ["a", "b", "c", "d"]
    similarities = clip_similarities(ours, images, prompts)
    flipped = CLIP(TINY).eval()
    flipped.load_state_dict({**ours.state_dict(), "visual.proj": -ours.visual.proj})  # every cosine changes sign
    torch.testing.assert_close(clip_similarities(flipped, images, prompts), -similarities)
    positive, negative = (ours, flipped) if similarities.mean() > 0 else (flipped, ours)
    assert clip_score(images, prompts, positive) == pytest.approx(similarities.mean().abs().item(), abs=1e-6)
    assert clip_score(images, prompts, negative) == 0.0
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_similarities(ours, images, prompts[:3])
