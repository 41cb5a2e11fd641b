"""LoRA / LoCon files (kohya format), textual-inversion files (A1111 format) and DreamBooth's prior preservation."""
import json

import pytest
from PIL import Image
import torch

import ldm
from ldm.checkpoint import read_metadata, read_state_dict
from train import apply_lora, load_embedding, train
from train.config import ConfigError
from train.embedding import Conditioner
from train.lora import LoRANetwork, target_layers
from train.sampling import preview_images
from train.trainer import Trainer, build_model
from train_support import fast_config, write_images
from train_support import images, pretrained  # noqa: F401 (module fixtures)


# Tiny tensors: one thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def config_for(images, pretrained, output, **overrides):
    return fast_config(images, output, model=str(pretrained), architecture={}, **overrides)


def base_model(config):
    """The model every run with this config starts from."""
    return build_model(config, torch.device("cpu")).eval()


def unet_output(model, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        cond = model.encode_prompt(["a shape number 1", "a red circle"])
        return model.apply_model(x, torch.tensor([100, 700]), **cond)


def test_lora_file_is_kohya_format_with_alpha_and_locon_keys(images, pretrained, tmp_path):
    config = config_for(images, pretrained, tmp_path, method="lora", lora_name="shapes", lora_rank=4, lora_alpha=2.0,
                         lora_conv_rank=2, lora_conv_alpha=1.0, train_text_encoder=True, max_steps=1)
    result = train(config)
    assert result.weights == tmp_path / "shapes.safetensors"
    state = read_state_dict(result.weights)
    attn = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    assert state[f"{attn}.lora_down.weight"].shape == (4, 32) and state[f"{attn}.lora_up.weight"].shape == (32, 4)
    assert state[f"{attn}.alpha"].item() == 2.0 and state[f"{attn}.alpha"].ndim == 0
    proj = "lora_unet_middle_block_1_proj_in"  # a 1x1 conv in SD1's transformer: rank 4, 1x1 down
    assert state[f"{proj}.lora_down.weight"].shape == (4, 32, 1, 1)
    conv = "lora_unet_input_blocks_1_0_in_layers_2"  # LoCon on a ResBlock 3x3 conv
    assert state[f"{conv}.lora_down.weight"].shape == (2, 32, 3, 3)
    assert state[f"{conv}.lora_up.weight"].shape == (32, 2, 1, 1) and state[f"{conv}.alpha"].item() == 1.0
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert state[f"{te}.lora_down.weight"].shape == (4, 64)
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight" in state
    metadata = read_metadata(result.weights)
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    # Every adapted layer of a module tree is exactly one of ours: names map back one-to-one.
    layers = target_layers(base_model(config), conv=True, text_encoder=True)
    assert {k.rsplit(".", 2)[0] for k in state} == set(layers)


def test_lora_round_trips_into_a_fresh_model_and_changes_its_output(images, pretrained, tmp_path):
    config = config_for(images, pretrained, tmp_path, method="lora", lora_rank=4, lora_alpha=4.0, lora_conv_rank=2,
                         max_steps=3, lr=1e-2)
    trainer = Trainer(config)
    result = trainer.run()
    trained_model = trainer.model.eval()
    trained = unet_output(trained_model)
    # The base weights are untouched by LoRA training.
    fresh = base_model(config)
    for key, value in fresh.state_dict().items():
        assert torch.equal(trained_model.state_dict()[key], value), key
    base = unet_output(fresh)
    network = apply_lora(fresh, result.weights, weight=1.0)
    torch.testing.assert_close(unet_output(fresh), trained, atol=1e-6, rtol=1e-6)
    assert (trained - base).abs().max() > 1e-3
    network.set_multiplier(0.0)
    torch.testing.assert_close(unet_output(fresh), base, atol=0, rtol=0)
    network.remove()
    torch.testing.assert_close(unet_output(fresh), base, atol=0, rtol=0)


def test_lora_scale_is_alpha_over_rank():
    model = ldm.create_model("tiny").eval()
    layer = model.unet.middle_block[1].transformer_blocks[0].attn2.to_v
    network = LoRANetwork({"lora_unet_x": layer}, rank=2, alpha=1.0)
    adapter = network.adapters["lora_unet_x"]
    with torch.no_grad():
        adapter.lora_up.weight.normal_()
    x = torch.randn(1, 3, layer.in_features)
    delta = adapter.lora_up(adapter.lora_down(x))
    torch.testing.assert_close(layer(x) - torch.nn.functional.linear(x, layer.weight, layer.bias), delta * 0.5)


def test_textual_inversion_file_loads_by_name_and_reproduces_the_conditioning(images, pretrained, tmp_path):
    config = config_for(images, pretrained, tmp_path, method="textual-inversion", token="shapetok", num_vectors=2,
                         initializer="circle", caption_template="a photo of {token}, {caption}", max_steps=3,
                         lr=5e-2)
    trainer = Trainer(config)
    result = trainer.run()
    assert result.weights == tmp_path / "shapetok.safetensors"
    state = read_state_dict(result.weights)
    assert list(state) == ["emb_params"] and state["emb_params"].shape == (2, 64)
    assert read_metadata(result.weights)["name"] == "shapetok"
    prompt = ["a photo of shapetok on a table"]
    with torch.no_grad():
        trained = trainer.conditioner(prompt)["context"]
    fresh = base_model(config)
    for key, value in fresh.state_dict().items():  # textual inversion trains nothing but the vectors
        assert torch.equal(trainer.model.state_dict()[key], value), key
    embedding = load_embedding(fresh, result.weights)  # the word comes from the file name
    assert embedding.token == "shapetok" and embedding.num_vectors == 2
    with torch.no_grad():
        loaded = Conditioner(fresh, embedding)(prompt)["context"]
        plain = fresh.encode_prompt(prompt)["context"]
    torch.testing.assert_close(loaded, trained, atol=0, rtol=0)
    assert (loaded - plain).abs().max() > 1e-3
    # The vectors moved away from their initialisation (the token embeddings of "circle").
    circle = fresh.cond_stage_model.tokenizer.encode("circle")
    table = fresh.cond_stage_model.transformer.text_model.embeddings.token_embedding.weight
    assert not torch.equal(state["emb_params"][0], table[circle[0]])


PIVOTAL = dict(method="lora", lora_name="concept", lora_rank=4, lora_alpha=4.0, token="shapetok",
               initializer="circle", caption_template="a photo of {token}, {caption}", lr=1e-2, lr_embedding=5e-2)


def test_pivotal_tuning_bundles_the_trained_vectors_into_the_lora_file(images, pretrained, tmp_path):
    trainer = Trainer(config_for(images, pretrained, tmp_path, max_steps=3, **PIVOTAL))
    result = trainer.run()
    state = read_state_dict(result.weights)
    assert result.weights == tmp_path / "concept.safetensors"
    assert state["bundle_emb.shapetok.emb_params"].shape == (1, 64)
    torch.testing.assert_close(state["bundle_emb.shapetok.emb_params"],
                               trainer.method.embedding.vectors[0][0].detach(), rtol=0, atol=0)
    # Adapters and vectors trained, each in its AdamW group (the vectors at lr_embedding, without weight decay).
    groups = trainer.optimizer.param_groups
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-2, 1e-2), (5e-2, 0.0)]
    assert groups[1]["params"] == list(trainer.method.embedding.parameters())
    circle = trainer.model.cond_stage_model.tokenizer.encode("circle")[0]
    table = trainer.model.cond_stage_model.transformer.text_model.embeddings.token_embedding.weight
    assert not torch.equal(state["bundle_emb.shapetok.emb_params"][0], table[circle])
    # Without text-encoder adapters, a prompt without the word is encoded exactly as the base encodes it.
    fresh = base_model(config_for(images, pretrained, tmp_path, **PIVOTAL))
    with torch.no_grad():
        assert torch.equal(trainer.conditioner(["a red circle"])["context"],
                           fresh.encode_prompt(["a red circle"])["context"])
    # Generation reads the vectors back out of the LoRA file under the word.
    from sample.lora import load_lora
    (embedding,) = load_lora(result.weights).embeddings
    assert embedding.name == "shapetok" and torch.equal(embedding.vectors[0], state["bundle_emb.shapetok.emb_params"])


@pytest.mark.parametrize("token", ["shapetok", "shapetok, colourtok"])
def test_pivotal_tuning_resumes_bitwise_with_ema(images, pretrained, tmp_path, token):
    options = dict(PIVOTAL, ema_decay=0.9, token=token)
    straight = train(config_for(images, pretrained, tmp_path / "a", max_steps=4, **options))
    train(config_for(images, pretrained, tmp_path / "b", max_steps=2, **options))
    resumed = train(config_for(images, pretrained, tmp_path / "b", max_steps=4, resume="latest", **options))
    a, b = read_state_dict(straight.weights), read_state_dict(resumed.weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The file holds the EMA of the vectors, not their last raw value (the checkpoint folder keeps those).
    raw = read_state_dict(tmp_path / "b" / "checkpoint-4" / "concept.safetensors")
    for word in token.split(", "):
        assert not torch.equal(raw[f"bundle_emb.{word}.emb_params"], b[f"bundle_emb.{word}.emb_params"])


def test_pivotal_tuning_learns_one_vector_set_per_word(images, pretrained, tmp_path):
    # Two new words, e.g. a new shape and a new colour: each gets its own vectors, initialised from its own
    # initializer, and its own bundled entry that generation loads under the word.
    options = dict(PIVOTAL, token="shapetok, colourtok", initializer="circle, red", num_vectors=2)
    trainer = Trainer(config_for(images, pretrained, tmp_path, max_steps=3, **options))
    tokenizer = trainer.model.cond_stage_model.tokenizer
    table = trainer.model.cond_stage_model.transformer.text_model.embeddings.token_embedding.weight.detach()
    for per_tower, init in zip(trainer.method.embedding.vectors, ("circle", "red")):
        assert torch.equal(per_tower[0], table[tokenizer.encode(init)[0]].expand(2, -1))
    result = trainer.run()
    state = read_state_dict(result.weights)
    assert sorted(key for key in state if key.startswith("bundle_emb.")) == [
        "bundle_emb.colourtok.emb_params", "bundle_emb.shapetok.emb_params"]
    for word, init in (("shapetok", "circle"), ("colourtok", "red")):
        assert state[f"bundle_emb.{word}.emb_params"].shape == (2, 64)
        assert not torch.equal(state[f"bundle_emb.{word}.emb_params"][0], table[tokenizer.encode(init)[0]])
    from sample.lora import load_lora
    loaded = {e.name: e.vectors[0] for e in load_lora(result.weights).embeddings}
    assert loaded.keys() == {"shapetok", "colourtok"}
    assert all(torch.equal(loaded[w], state[f"bundle_emb.{w}.emb_params"]) for w in loaded)


def test_pivotal_tuning_needs_the_token_in_a_caption(images, pretrained, tmp_path):
    options = dict(PIVOTAL, caption_template="")
    with pytest.raises(ConfigError, match="no training caption contains the token 'shapetok'"):
        Trainer(config_for(images, pretrained, tmp_path, **options))
    # With several words, the one no caption holds is named.
    options = dict(PIVOTAL, token="shapetok, colourtok", caption_template="a photo of shapetok, {caption}")
    with pytest.raises(ConfigError, match="no training caption contains the token 'colourtok',"):
        Trainer(config_for(images, pretrained, tmp_path, **options))
    # Its vectors train, so cached text embeddings cannot stand in; FSDP does not shard them.
    with pytest.raises(ConfigError, match="cache_text .* lora token"):
        config_for(images, pretrained, tmp_path, cache_text=True, **PIVOTAL).validate()
    with pytest.raises(ConfigError, match="pivotal tuning .* FSDP"):
        config_for(images, pretrained, tmp_path, distributed="fsdp", **PIVOTAL).validate()


@pytest.mark.parametrize("options, message", [
    (dict(method="textual-inversion", token="a, b"), "textual inversion learns one word"),
    (dict(token="a, two words"), "each word must be one word without spaces"),
    (dict(token="tok, TOK"), "names a word twice"),
    (dict(token="a, b, c", initializer="x, y"), "2 comma-separated parts for the 3 words"),
])
def test_token_words_are_checked(images, pretrained, tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        config_for(images, pretrained, tmp_path, **dict(PIVOTAL, **options)).validate()


def test_several_words_place_their_own_vectors(tmp_path):
    model = ldm.create_model("tiny").eval()
    from train.embedding import TextualInversion
    embedding = TextualInversion(model, ["tok", "tok-two"], num_vectors=2, initializer=["circle", "red"])
    with torch.no_grad():
        embedding.vectors[0][0].copy_(torch.full((2, 64), 1.0))
        embedding.vectors[1][0].copy_(torch.full((2, 64), 2.0))
    # The longer word is matched whole, not as "tok" followed by "-two"; matching ignores case.
    tokens = embedding.tokenize(0, ["TOK-TWO and tok"])
    rows, positions, words, vectors = embedding._pending[0]
    assert positions.tolist() == [1, 2, 4, 5] and words.tolist() == [1, 1, 0, 0] and vectors.tolist() == [0, 1, 0, 1]
    table = model.cond_stage_model.transformer.text_model.embeddings.token_embedding
    with torch.no_grad():
        placed = table(tokens)[0]
    assert torch.equal(placed[1:3], torch.full((2, 64), 2.0)) and torch.equal(placed[4:6], torch.full((2, 64), 1.0))
    assert torch.equal(placed[3], table.weight[model.cond_stage_model.tokenizer.encode("and")[0]])
    assert embedding.tokens == ["tok", "tok-two"] and set(embedding.file_state("TOK")) == {"emb_params"}
    with pytest.raises(ValueError, match="holds 2 words"):
        embedding.file_state()


def test_embedding_vectors_replace_the_token_span_only(images, tmp_path):
    model = ldm.create_model("tiny").eval()
    from train.embedding import TextualInversion
    embedding = TextualInversion(model, "tok", num_vectors=3)
    tokens = embedding.tokenize(0, ["a tok b", "no match here"])
    tokenizer = model.cond_stage_model.tokenizer
    a, b = tokenizer.encode("a"), tokenizer.encode("b")
    assert tokens[0, :1 + len(a)].tolist() == [49406, *a]
    assert tokens[0, 1 + len(a) + 3: 1 + len(a) + 3 + len(b) + 1].tolist() == [*b, 49407]
    assert torch.equal(tokens[1], tokenizer(["no match here"])[0])
    rows, positions, words, vectors = embedding._pending[0]
    assert rows.tolist() == [0, 0, 0] and positions.tolist() == [2, 3, 4] and vectors.tolist() == [0, 1, 2]
    assert words.tolist() == [0, 0, 0]


def test_dreambooth_generates_class_images_and_weights_the_prior_loss(images, pretrained, tmp_path):
    config = config_for(images, pretrained, tmp_path / "out", method="dreambooth",
                        instance_prompt="a photo of sks shape", class_prompt="a photo of a shape",
                        class_data=str(tmp_path / "class"), num_class_images=3, prior_loss_weight=0.5,
                        class_sample_steps=2, max_steps=1)
    trainer = Trainer(config)
    generated = sorted(p.name for p in (tmp_path / "class").iterdir())
    assert generated == [f"class-{i:05d}.{ext}" for i in range(3) for ext in ("png", "txt")]
    assert (tmp_path / "class" / "class-00000.txt").read_text() == "a photo of a shape"
    items = trainer.data.items
    instance = [i for i in items if i.caption == "a photo of sks shape"]
    prior = [i for i in items if i.caption == "a photo of a shape"]
    assert len(instance) == 4 and len(prior) == 4  # one class slot per instance slot
    assert {i.loss_weight for i in instance} == {1.0} and {i.loss_weight for i in prior} == {0.5}
    batch = next(trainer._batches())[-1]
    assert set(batch["weight"].tolist()) <= {1.0, 0.5}
    trainer.run()
    # A second run finds the class images and generates none.
    Trainer(config)
    assert len(list((tmp_path / "class").glob("*.png"))) == 3


def test_lora_prior_images_keep_their_own_captions(images, pretrained, tmp_path):
    # Regularization images for a LoRA (kohya's reg folders): an imagefolder whose metadata.jsonl gives each image
    # its own caption; no class_prompt, so nothing is generated and no caption is replaced.
    prior = tmp_path / "prior"
    paths = write_images(prior, 3, seed=5, captions=False)
    rows = [{"file_name": path.name, "text": f"an old concept {n}"} for n, path in enumerate(paths)]
    (prior / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = config_for(images, pretrained, tmp_path / "out", method="lora", class_data=str(prior),
                        prior_loss_weight=0.25, max_steps=1)
    trainer = Trainer(config)
    by_caption = {}
    for item in trainer.data.items:
        by_caption.setdefault(item.caption, []).append(item.loss_weight)
    # Four instance slots (their own captions, weight 1), four prior slots cycling through the three prior images.
    assert {c: w for c, w in by_caption.items() if c.startswith("a shape")} == {
        f"a shape number {n}": [1.0] for n in range(4)}
    assert {c: w for c, w in by_caption.items() if c.startswith("an old")} == {
        "an old concept 0": [0.25, 0.25], "an old concept 1": [0.25], "an old concept 2": [0.25]}
    assert sorted(p.name for p in prior.iterdir()) == ["img000.png", "img001.png", "img002.png", "metadata.jsonl"]
    trainer.run()


def test_prior_images_generated_for_class_prompts_keep_each_its_prompt(images, pretrained, tmp_path):
    prompts = ["a red circle", "a blue square"]
    config = config_for(images, pretrained, tmp_path / "out", method="lora", class_data=str(tmp_path / "class"),
                        class_prompts=prompts, num_class_images=3, class_sample_steps=2, max_steps=1)
    trainer = Trainer(config)
    captions = [(tmp_path / "class" / f"class-{i:05d}.txt").read_text() for i in range(3)]
    assert captions == ["a red circle", "a blue square", "a red circle"]
    prior = sorted(i.caption for i in trainer.data.items if i.caption in prompts)
    assert prior == ["a blue square", "a red circle", "a red circle", "a red circle"]  # 4 slots over 3 images
    # Each image is what the base draws for its prompt (the batch of three at the run's seed, drawn again).
    model = base_model(config)
    again = preview_images(model, Conditioner(model), captions, 16, 16, steps=2, cfg_scale=config.validation_cfg,
                           seed=config.seed)
    for i, image in enumerate(again):
        assert image.tobytes() == Image.open(tmp_path / "class" / f"class-{i:05d}.png").convert("RGB").tobytes()
    with pytest.raises(ConfigError, match="class_prompt .* or class_prompts .*, not both"):
        config_for(images, pretrained, tmp_path, class_prompts=prompts, class_prompt="x").validate()


def test_generating_prior_images_needs_a_class_prompt(images, pretrained, tmp_path):
    with pytest.raises(ConfigError, match="num_class_images generates prior images of class_prompt"):
        config_for(images, pretrained, tmp_path, method="lora", class_data=str(tmp_path / "prior"),
                   num_class_images=2).validate()
    with pytest.raises(ConfigError, match="class_data .* needs captions"):
        config_for(images, pretrained, tmp_path, method="vae", class_data=str(tmp_path / "prior")).validate()
    # A prior folder that is not there is named as class_data, not as the training data.
    with pytest.raises(ConfigError, match="class_data .*prior does not exist"):
        Trainer(config_for(images, pretrained, tmp_path / "out", method="lora", class_data=str(tmp_path / "prior")))


def test_a_new_method_is_one_class_and_one_table_entry(images, pretrained, tmp_path, monkeypatch):
    from train.methods import METHODS, Method

    class OutputLayerOnly(Method):
        """Trains the UNet's final convolution alone."""

        def set_trainable(self):
            self.model.unet.out[2].requires_grad_(True)

    monkeypatch.setitem(METHODS, "output-layer", OutputLayerOnly)
    config = config_for(images, pretrained, tmp_path, method="output-layer", max_steps=2, lr=1e-2)
    result = train(config)
    before, after = base_model(config).state_dict(), ldm.load_model(result.weights).state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed == {"model.diffusion_model.out.2.weight", "model.diffusion_model.out.2.bias"}
    with pytest.raises(ConfigError, match="method='nothing' is not one of full, lora, .*output-layer"):
        config_for(images, pretrained, tmp_path, method="nothing").validate()


def test_trained_lora_names_are_the_names_generation_resolves(pretrained):
    from sample.lora import LayerIndex
    model = ldm.load_model(pretrained)
    index = LayerIndex(model)
    layers = target_layers(model, conv=True, text_encoder=True)
    assert any(name.startswith("lora_te_") for name in layers) and any("_out_layers_3" in name for name in layers)
    for name, layer in layers.items():
        target = index.resolve(name)
        assert target is not None and target.module is layer and target.rows is None, name
