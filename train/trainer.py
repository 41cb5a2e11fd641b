"""The training loop: full fine-tuning, LoRA/LoCon, DreamBooth, textual inversion, VAE, ControlNet, LCM and CLIP
training on one process or under torchrun (DDP), with exact resume. What differs between the methods is in train.methods; the process group is
train.distributed, the EMA train.ema, the checkpoint folders train.resume.

Randomness, and why resuming is bitwise on CPU:
- the data order and each sample's augmentation are functions of (seed, epoch, position) (see train.buckets), so the
  data position (epoch, batch index) is all the loader needs;
- timesteps and noise come from one CPU generator `noise` seeded by `seed` and drawn for the *global* batch on every
  rank, each rank taking its slice: the same draws as one process with the whole batch, so DDP with N ranks and one
  process with N× the batch see identical noise;
- torch's global RNG (dropout), numpy's and Python's are saved and restored as well;
- the learning rate is a pure function of the step; the optimizer, EMA and loss-scaler states are saved.

Distributed: torchrun sets WORLD_SIZE/RANK; each global batch of batch_size × world_size samples is cut into one
slice per rank, gradients are averaged by DistributedDataParallel, logged losses are averaged over ranks, and rank 0
alone writes files. Global batches that would be incomplete are dropped when world_size > 1 (every rank needs one).
With distributed = "fsdp" the objective is sharded with FSDP2 instead of wrapped in DDP (train.distributed.shard),
every rank writes its shards of the checkpoint (DCP) and rank 0 consolidates the final file on the CPU (train.export).
"""
import dataclasses
import json
import logging
import math
import random
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import ldm
from ldm.checkpoint import read_state_dict, save_state_dict
from ldm.files import atomic_write
from ldm.model import LatentDiffusion, SDXLConditioner
from sample.conditioning import text_towers
from . import export, resume
from .buckets import TrainingData, batch_loader, crop_to_bucket
from .cache import TensorCache, file_identity, fingerprint
from .config import ConfigError, TrainConfig, to_dict
from .data import Item, SkipReport, folder_items, load_rgb, scan, source_items
from .distributed import gradient_sync, init_world, load_sharded, pick_device, save_sharded, shard
from .ema import EMA, swapped
from .embedding import Conditioner
from .methods import Method, method_class
from .objective import zero_terminal_snr
from .regularizers import Context, build_regularizers
from .retention import RetentionMonitor, base_triples
from .streaming import StreamLoader, StreamSpec, stream_shards

log = logging.getLogger("train")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Images encoded at once when caching latents (all of one bucket, so they stack).
LATENT_CACHE_BATCH = 32
# Images per process whose latents set a trained autoencoder's scale factor (CompVis used one batch).
SCALE_FACTOR_IMAGES = 1024


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed NaN/inf); the message says what was seen and what to try."""


@dataclass
class TrainResult:
    step: int
    weights: Path | None          # the method's final file (None when interrupted before the end)
    checkpoint: Path | None       # the last checkpoint written
    interrupted: str | None       # "SIGTERM" / "SIGINT" when a signal stopped the run
    data_report: str
    skipped_nan_steps: int


# ----------------------------------------------------------------------------------------------------------------------
# Model construction


def _apply_overrides(section, overrides: dict, where: str):
    fields = {f.name for f in dataclasses.fields(section)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"architecture.{where}: unknown key(s) {unknown}; valid: {sorted(fields)}")
    return replace(section, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})


def preset_with_architecture(name: str, architecture: dict) -> ldm.Preset:
    """A preset with `architecture` overrides: {unet = {...}, vae = {...}, text = {...} or [{...}, ...], and any
    top-level Preset field (resolution, prediction, scale_factor, ...)}."""
    preset = ldm.get_preset(name)
    top = {}
    for key, value in architecture.items():
        if key in ("unet", "vae"):
            preset = replace(preset, **{key: _apply_overrides(getattr(preset, key), value, key)})
        elif key == "text":
            per_tower = value if isinstance(value, list) else [value] * len(preset.text)
            preset = replace(preset, text=tuple(_apply_overrides(t, o, "text") for t, o in zip(preset.text, per_tower)))
        else:
            top[key] = value
    preset = _apply_overrides(preset, top, "(top level)")
    return replace(preset, name=f"{preset.name}-custom") if architecture else preset


def build_model(config: TrainConfig, device: torch.device) -> LatentDiffusion:
    if config.model.startswith("preset:"):
        preset = preset_with_architecture(config.model[len("preset:"):], config.architecture)
        # Seeded so that every rank, and a resumed run, starts from the same random initialisation.
        torch.manual_seed(config.seed)
        with torch.device(device):
            model = LatentDiffusion(preset)
    else:
        if config.architecture:
            raise ConfigError("architecture overrides apply to training from scratch (model = 'preset:NAME'), not "
                              f"to the checkpoint {config.model}")
        # fp32 master weights whatever the file holds (most shared checkpoints are fp16): optimizer updates far
        # below fp16's resolution would round away; mixed_precision runs the maths in fp16/bf16 under autocast.
        model = ldm.load_model(config.model, device=device, dtype=torch.float32)
    if config.prediction:
        model.preset = replace(model.preset, prediction=config.prediction)
    if config.zero_terminal_snr:
        model.alphas_cumprod = zero_terminal_snr(model.alphas_cumprod)
    if model.preset.unet.in_channels != model.preset.unet.out_channels:
        raise ConfigError(f"{config.model} is an inpainting model ({model.preset.unet.in_channels} input channels); "
                          "training it needs masks, which this engine does not provide")
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Optimisation helpers


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the base learning rate for optimizer step `step` (0-based): linear warmup from 1/warmup to 1,
    then constant, linear decay to 0, or cosine decay to 0 (Loshchilov & Hutter 2017, without restarts)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


# ----------------------------------------------------------------------------------------------------------------------
# Data assembly


def generate_class_images(config: TrainConfig, model: LatentDiffusion, conditioner, batch: int = 4) -> int:
    """Fill class_data up to num_class_images with images of class_prompt sampled from the (untrained) model,
    as DreamBooth's prior preservation prescribes (Ruiz et al. 2023, §4.1), or of class_prompts in turn (image i of
    prompt i mod len), each captioned with its prompt. Returns how many were generated."""
    from .sampling import preview_images
    folder = Path(config.class_data)
    folder.mkdir(parents=True, exist_ok=True)
    existing = len(folder_items(folder, config.caption_extension, SkipReport()))
    missing = max(0, config.num_class_images - existing)
    size = square_size(config)
    prompts = config.class_prompts or [config.class_prompt]
    for start in range(existing, existing + missing, batch):
        indices = range(start, min(start + batch, existing + missing))
        captions = [prompts[i % len(prompts)] for i in indices]
        images = preview_images(model, conditioner, captions, size, size, steps=config.class_sample_steps,
                                cfg_scale=config.validation_cfg, seed=config.seed + start)
        for i, image, caption in zip(indices, images, captions):
            stem = folder / f"class-{i:05d}"
            image.save(stem.with_suffix(".png"))
            stem.with_suffix(config.caption_extension).write_text(caption, encoding="utf-8")
    return missing


def square_size(config: TrainConfig) -> int:
    """The side of the square images generated for validation and as class images: the resolution rounded down to
    the bucket step."""
    return config.preprocessing.resolution // config.preprocessing.bucket_step * config.preprocessing.bucket_step


def collect_items(config: TrainConfig, method: Method, report: SkipReport) -> list[Item]:
    """The checked training items, with the prior-preservation items appended; skips are counted in `report`."""
    max_pixels = config.preprocessing.max_image_pixels
    items = source_items(config.data, config.data_format, report, config.caption_extension, config.caption_column,
                         config.conditioning_column, config.conditioning_field)
    if config.metadata:
        from .laion import join_by_url
        items = join_by_url(items, config.metadata, report)
    items = scan(items, report, config.min_image_size, max_pixels, config.verify_images, method.empty_captions())
    method.prepare_items(items)
    if not config.class_data:
        return items
    # Prior preservation (Ruiz et al. 2023, §4.1): images of what the model should keep drawing train alongside the
    # new ones, weighted by prior_loss_weight, as many prior slots as instance slots (cycling through the prior
    # images). DreamBooth captions every prior image with class_prompt; the other methods keep each image's own
    # caption (a folder with caption files or a metadata.jsonl), like kohya's regularization folders, so the prior
    # can be a sample of the data the base model was trained on.
    try:
        sources = source_items(config.class_data, "auto", report, config.caption_extension, config.caption_column)
    except FileNotFoundError:
        raise ConfigError(f"class_data {config.class_data} does not exist; give the folder of prior images, or set "
                          "num_class_images > 0 (with class_prompt) to generate them there") from None
    class_items = scan(sources, report, config.min_image_size, max_pixels, config.verify_images,
                       "keep" if config.class_prompt else config.empty_captions)
    if not class_items:
        raise ConfigError(f"class_data {config.class_data} has no usable images; set num_class_images > 0 (with "
                          "class_prompt) to generate them")
    slots = sum(item.repeats for item in items)
    cycled = (class_items[i % len(class_items)] for i in range(slots))
    prior = [replace(item, caption=config.class_prompt or item.caption, repeats=1,
                     loss_weight=config.prior_loss_weight) for item in cycled]
    return items + prior


# ----------------------------------------------------------------------------------------------------------------------
# The run


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config.validate()
        self.world = init_world(config.device)
        self.device = pick_device(config.device, self.world)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.output = Path(config.output)
        if self.world.main:
            self.output.mkdir(parents=True, exist_ok=True)
            resume.remove_stale_temporaries(self.output)
        self.world.barrier()
        self._seed_generators()

        method = method_class(config.method)
        self.model = method.build_model(config, self.device)
        self.model.train()
        self.method = method(config, self.model)
        self.conditioner = Conditioner(self.model, self.method.embedding)
        if config.num_class_images:
            self._generate_class_images()
        self.data, self.stream = (None, self._stream_loader()) if config.streaming else (self._training_data(), None)
        # FSDP shards only under torchrun; one process with distributed = "fsdp" trains unsharded but writes and
        # reads the same DCP checkpoints, so a run can move between world sizes.
        self.dcp_checkpoints = config.distributed == "fsdp"
        self.sharded = self.dcp_checkpoints and self.world.size > 1
        if self.sharded and config.validation_every and config.validation_prompts:
            raise ConfigError("validation images need the whole model on one rank, which FSDP never gathers: drop "
                              "validation_prompts and sample from checkpoints (python -m train.export CHECKPOINT)")
        self._build_optimisation()

        self.step, self.position = 0, (0, 0)
        self.skipped_nan, self.consecutive_nan = 0, 0
        self.last_checkpoint = None
        self._stop_signal = None

        self.latent_cache = self._build_latent_cache() if config.cache_latents else None
        self.text_cache = self._build_text_cache() if config.cache_text else None
        if self.data is not None:
            self.data.skip_pixels = self.latent_cache is not None

        # The forgetting monitor's triples come from the base: made (or read back) before a checkpoint is loaded.
        triples = base_triples(config, self.model, self.conditioner, square_size(config), self.output) \
            if config.retention_prompts and self.world.main else None
        self.retention = RetentionMonitor(config, self.model, self.conditioner, square_size(config), triples) \
            if triples is not None else None
        self.regularizers = self._build_regularizers(triples)
        self.penalties: dict[str, list[float]] = {}
        self.loss_parts: dict[str, list[float]] = {}
        folder = resume.resolve_resume(config.resume, self.output)
        if folder is not None:
            self._load_checkpoint(folder)
        elif self.world.main:
            (self.output / "metrics.jsonl").unlink(missing_ok=True)

    # --- setup --------------------------------------------------------------------------------------------------------

    def _seed_generators(self) -> None:
        seed, rank = self.config.seed, self.world.rank
        torch.manual_seed(seed + rank)
        np.random.seed(seed + rank)
        random.seed(seed + rank)
        # The same on every rank: each draws the global batch's noise and takes its slice (see the module docstring).
        self.noise = torch.Generator().manual_seed(seed)

    def _generate_class_images(self) -> None:
        if self.world.main:
            self.model.eval()
            generate_class_images(self.config, self.model, self.conditioner)
            self.model.train()
        self.world.barrier()

    def _training_data(self) -> TrainingData:
        """The checked items, collected once by rank 0 and shared, as a TrainingData."""
        config = self.config
        payload = None
        if self.world.main:
            collected = SkipReport()
            items = collect_items(config, self.method, collected)
            payload = (items, dict(collected.counts), {k: list(v) for k, v in collected.examples.items()})
        items, counts, examples = self.world.broadcast(payload)
        # Every rank, rank 0 included, takes the counts from the payload exactly once.
        report = SkipReport()
        report.counts.update(counts)
        report.examples.update(examples)
        if self.world.main:
            log.info("data: %d usable images; %s", len(items), report.summary())
        self.method.check_items(items)
        data = TrainingData(items, config.preprocessing, report, config.seed, config.token,
                            **self.method.data_options())
        self.global_batch = config.batch_size * self.world.size
        if not data.batches(0, self.global_batch, drop_last=self.world.size > 1):
            raise ConfigError(f"{len(data.slots)} training slots cannot fill one batch of "
                              f"{self.global_batch} per bucket; lower batch_size or add images")
        return data

    def _stream_loader(self, position: dict | None = None) -> StreamLoader:
        """This rank's streaming batches (train.streaming), from `position` (a checkpoint's) or the start."""
        config = self.config
        self.global_batch = config.batch_size * self.world.size
        spec = StreamSpec(stream_shards(config.data), config.preprocessing, config.batch_size, config.seed,
                          config.shuffle_buffer, config.min_image_size, config.token)
        return StreamLoader(spec, self.world.rank, self.world.size, config.num_workers, position)

    def _build_optimisation(self) -> None:
        """The objective (under DDP when distributed), the optimizer, the loss scaler and the EMA."""
        config = self.config
        self.objective = self.method.objective(self.conditioner).to(self.device)
        if not any(p.requires_grad for p in self.objective.parameters()):
            raise ConfigError(f"method {config.method!r} left no parameter to train")
        self.ddp = self.objective
        if self.sharded:
            # FSDP2 turns the objective's parameters into DTensors (this rank's shards) in place; the optimizer, the
            # EMA and gradient clipping then work on the shards, and the objective itself is what runs.
            shard(self.objective, self.model, self.method.text_trained, config.fsdp_param_dtype,
                  config.fsdp_reduce_dtype, config.fsdp_cpu_offload)
        elif self.world.size > 1:
            # A trained text tower has weights the conditioning never reaches (SDXL's CLIP-L uses its penultimate
            # layer, OpenCLIP's logit_scale), and a batch whose captions all lost the textual-inversion token to
            # caption dropout leaves the vectors unused: DDP must then look for unused parameters.
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=self.method.text_trained)
        self.trainable = [(n, p) for n, p in self.objective.named_parameters() if p.requires_grad]
        groups = self.method.param_groups(self.trainable)
        self.base_lrs = [g["lr"] for g in groups]
        self.optimizer = torch.optim.AdamW(groups, betas=(config.adam_beta1, config.adam_beta2),
                                           eps=config.adam_epsilon)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.mixed_precision == "fp16")
        self.ema = EMA(self.trainable, config.ema_decay) if config.ema_decay else None
        self.method.use_ema(self.ema)

    # --- caches -------------------------------------------------------------------------------------------------------

    def _cache_root(self) -> Path:
        return Path(self.config.cache_dir) if self.config.cache_dir else self.output / "cache"

    def _build_latent_cache(self) -> TensorCache:
        """VAE posterior moments of every item at its bucket (center crop, no flip): keys "<item>.mean/.logvar"."""
        data, vae = self.data, self.model.first_stage_model
        key = fingerprint(vae.state_dict(), dataclasses.asdict(data.prep), data.buckets,
                          [file_identity(item) for item in data.items])
        cache = TensorCache(self._cache_root(), "latents", key)
        if self.world.main:
            missing = [i for i in range(len(data.items)) if f"{i}.mean" not in cache]
            by_bucket: dict[tuple[int, int], list[int]] = {}
            for i in missing:
                by_bucket.setdefault(data.buckets[i], []).append(i)
            chunks = [(bucket, indices[start:start + LATENT_CACHE_BATCH]) for bucket, indices in by_bucket.items()
                      for start in range(0, len(indices), LATENT_CACHE_BATCH)]
            computed = {}
            for bucket, chunk in tqdm(chunks, desc="cache latents", disable=not self.config.progress,
                                      dynamic_ncols=True):
                pixels = torch.stack([crop_to_bucket(load_rgb(data.items[i].read_bytes(), data.prep.max_image_pixels),
                                                     bucket, False, False, None)[0] for i in chunk])
                with torch.no_grad():
                    moments = vae.quant_conv(vae.encoder(pixels.to(self.device, self.model.dtype))).float()
                means, logvars = moments.chunk(2, dim=1)
                for i, mean, logvar in zip(chunk, means, logvars.clamp(-30.0, 20.0)):
                    computed[f"{i}.mean"], computed[f"{i}.logvar"] = mean.clone(), logvar.clone()
            if computed:
                cache.write(computed)
        self.world.barrier()
        return TensorCache(self._cache_root(), "latents", key)

    def _caption_of(self, item: Item) -> str:
        return self.data.caption(item, _NoDropout())

    def _build_text_cache(self) -> TensorCache:
        """Conditioning of every caption that can occur (each item's caption, and "" for caption dropout)."""
        captions = sorted({self._caption_of(item) for item in self.data.items} | {""})
        towers = text_towers(self.model)
        # The towers' configs are part of the key, not only their weights: two models can share a tower's weights
        # and read different blocks of it (SD2's penultimate, or `ldm.assemble --text-layer last`).
        key = fingerprint({str(i): t.state_dict() for i, t in enumerate(towers)}, self.model.preset.text, captions)
        cache = TensorCache(self._cache_root(), "text", key)
        if self.world.main:
            computed = {}
            for caption in captions:
                if f"{caption}.context" in cache:
                    continue
                with torch.no_grad():
                    cond = self._text_cond([caption])
                computed[f"{caption}.context"] = cond["context"][0]
                if "pooled" in cond:
                    computed[f"{caption}.pooled"] = cond["pooled"][0]
            if computed:
                cache.write(computed)
        self.world.barrier()
        return TensorCache(self._cache_root(), "text", key)

    def _text_cond(self, captions: list[str]) -> dict:
        """Context (and SDXL's pooled vector) of captions, before the per-sample size conditions."""
        towers = text_towers(self.model)
        if not self.model.is_sdxl:
            return {"context": towers[0].encode_tokens(towers[0].tokenizer(captions).to(self.device))}
        context, pooled = self.model.conditioner.encode_tokens(towers[0].tokenizer(captions).to(self.device),
                                                               towers[1].tokenizer(captions).to(self.device))
        return {"context": context, "pooled": pooled}

    def _cached_cond(self, batch: dict) -> dict:
        context = torch.stack([self.text_cache.get(f"{c}.context") for c in batch["caption"]]).to(self.device)
        if not self.model.is_sdxl:
            return {"context": context}
        y = torch.cat([SDXLConditioner.vector(self.text_cache.get(f"{c}.pooled")[None].to(self.device), o, crop, t)
                       for c, o, crop, t in zip(batch["caption"], batch["original_size"], batch["crop_top_left"],
                                                batch["target_size"])])
        return {"context": context, "y": y}

    # --- batches ------------------------------------------------------------------------------------------------------

    def _batches(self):
        """Endless (epoch, index, batches in epoch, global size, local batch) from the saved position on."""
        epoch, index = self.position
        if self.stream is not None:
            # Readers never run dry (see train.streaming): an epoch has no fixed batch count, so it never "ends" here.
            for k, batch in enumerate(self.stream):
                yield self.stream.epoch, index + k, math.inf, self.global_batch, batch
            return
        bs, rank = self.config.batch_size, self.world.rank
        while True:
            batches = self.data.batches(epoch, self.global_batch, drop_last=self.world.size > 1)
            todo = batches[index:]
            local = [(epoch, b[rank * bs:(rank + 1) * bs]) for b in todo]
            for k, batch in enumerate(batch_loader(self.data, local, self.config.num_workers)):
                yield epoch, index + k, len(batches), len(todo[k]), batch
            epoch, index = epoch + 1, 0

    def _step_batches(self, batches, drawn: list):
        """The gradient_accumulation micro-batches of one optimizer step, as (local batch, global batch size), read
        from `batches` when the method asks for them; records each one's (epoch, global size) in `drawn` and moves
        the data position past it."""
        for _ in range(self.config.gradient_accumulation):
            epoch, index, count, global_size, batch = next(batches)
            self.position = (epoch, index + 1) if index + 1 < count else (epoch + 1, 0)
            drawn.append((epoch, global_size))
            yield batch, global_size

    def autocast(self):
        """The mixed-precision context of forward passes (a no-op with mixed_precision = "no")."""
        if self.config.mixed_precision == "no":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.config.mixed_precision])

    def _draw(self, global_size: int, latent_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """Random draws for one global batch, in a fixed order, from the shared noise generator."""
        g = self.noise
        draws = {"timesteps": torch.randint(0, self.model.alphas_cumprod.shape[0], (global_size,), generator=g),
                 "noise": torch.randn((global_size, *latent_shape), generator=g),
                 "posterior": torch.randn((global_size, *latent_shape), generator=g)}
        if self.config.noise_offset:
            offset = torch.randn((global_size, latent_shape[0], 1, 1), generator=g)
            draws["noise"] = draws["noise"] + self.config.noise_offset * offset
        return draws

    def _latent_shape(self, batch: dict) -> tuple[int, int, int]:
        height, width = batch["target_size"][0]
        factor = self.model.first_stage_model.downscale
        return self.model.preset.vae.embed_dim, height // factor, width // factor

    def _build_regularizers(self, triples) -> dict:
        """train.regularizers' terms, built from the base (before a checkpoint is loaded)."""
        if not self.config.regularizers:
            return {}
        if self.world.size > 1:
            raise ConfigError("regularizers run on one process only for now; train without torchrun, or set "
                              "regularizers = {}")
        context = Context(self.config, self.model, self.conditioner, self.method.anchors(), self.output, triples)
        return build_regularizers(self.config, context)

    def micro_step(self, batch: dict, global_size: int, sync: bool, micro: int = 0) -> tuple[float, bool]:
        """Forward and backward of one micro-batch of the diffusion (or autoencoder) loss; returns (the data loss,
        whether the total loss is finite). The regularizers' penalties are added to the loss and collected in
        self.penalties."""
        config = self.config
        draws = self._draw(global_size, self._latent_shape(batch))
        start = self.world.rank * config.batch_size
        n = len(batch["caption"])
        local = {k: v[start:start + n].to(self.device) for k, v in draws.items()}
        weights = batch["weight"].to(self.device)
        with gradient_sync(self.ddp, sync):
            with self.autocast():
                if self.method.trains_autoencoder:
                    per_sample = self.ddp(batch["pixels"].to(self.device, self.model.dtype), local["posterior"])
                else:
                    latents = self._latents(batch, local["posterior"])
                    inputs = self.method.model_inputs(batch, self.device)
                    if self.text_cache is not None:
                        per_sample = self.ddp(latents, local["noise"], local["timesteps"], self._cached_cond(batch),
                                              **inputs)
                    else:
                        # Captions are encoded inside the objective's forward, so DDP sees the text-side weights.
                        per_sample = self.ddp(latents, local["noise"], local["timesteps"], None, batch["caption"],
                                              batch["original_size"], batch["crop_top_left"], batch["target_size"],
                                              **inputs)
                loss = (per_sample * weights).mean()
            # The objective's own terms (its `parts`, e.g. lcm's consistency loss and reward), logged per step.
            for name, value in getattr(self.objective, "parts", {}).items():
                self.loss_parts.setdefault(name, []).append(value)
            total = loss.float()
            for name, regularizer in self.regularizers.items():
                penalty = regularizer.penalty(self.step, micro)
                self.penalties.setdefault(name, []).append(penalty.detach().item())
                total = total + penalty
            self.scaler.scale(total / config.gradient_accumulation).backward()
        value = loss.detach().float().item()
        return value, math.isfinite(value) and math.isfinite(total.detach().item())

    @torch.no_grad()
    def _latents(self, batch: dict, posterior_noise: torch.Tensor) -> torch.Tensor:
        """Scaled latents z · scale_factor in the model's dtype (see `_posterior_sample`)."""
        return (self._posterior_sample(batch, posterior_noise) * self.model.scale_factor).to(self.model.dtype)

    @torch.no_grad()
    def _posterior_sample(self, batch: dict, posterior_noise: torch.Tensor) -> torch.Tensor:
        """Unscaled latents z = mean + std · n in fp32, from the cache or by encoding the pixels."""
        if self.latent_cache is not None:
            mean = torch.stack([self.latent_cache.get(f"{i}.mean") for i in batch["item"]]).to(self.device)
            logvar = torch.stack([self.latent_cache.get(f"{i}.logvar") for i in batch["item"]]).to(self.device)
        else:
            vae = self.model.first_stage_model
            moments = vae.quant_conv(vae.encoder(batch["pixels"].to(self.device, self.model.dtype)))
            mean, logvar = moments.float().chunk(2, dim=1)
            logvar = logvar.clamp(-30.0, 20.0)
        return mean + (0.5 * logvar).exp() * posterior_noise.float()

    @torch.no_grad()
    def _measure_scale_factor(self) -> float:
        """1 / std of the unscaled latents (posterior samples) of the first SCALE_FACTOR_IMAGES training images per
        process: the factor that gives the diffusion model unit-variance inputs (Rombach et al. 2022, Sec. 4.3.2;
        CompVis's `scale_by_std` measures one batch, SD's 0.18215 came from this)."""
        seen, stats = 0, torch.zeros(3, dtype=torch.float64)  # element count, sum, sum of squares
        for *_, batch in self._batches():
            noise = torch.randn((len(batch["caption"]), *self._latent_shape(batch)), generator=self.noise)
            z = self._posterior_sample(batch, noise).double().cpu()
            stats += torch.stack([torch.tensor(float(z.numel()), dtype=torch.float64), z.sum(), z.square().sum()])
            seen += len(batch["caption"])
            if seen >= SCALE_FACTOR_IMAGES:
                break
        count, total, squares = (self.world.mean(float(v)) for v in stats)
        variance = squares / count - (total / count) ** 2
        if not variance > 0:
            raise TrainingError(f"the trained autoencoder's latents have variance {variance}: it collapsed; lower lr "
                                "or check the data")
        return 1.0 / math.sqrt(variance)

    # --- checkpoints --------------------------------------------------------------------------------------------------

    def _state(self) -> dict:
        return {"step": self.step, "epoch": self.position[0], "batch": self.position[1],
                "skipped_nan": self.skipped_nan, "consecutive_nan": self.consecutive_nan,
                "ema_updates": self.ema.updates if self.ema else 0, "world_size": self.world.size,
                "config": to_dict(self.config)}

    def save_checkpoint(self) -> Path | None:
        rng = self.world.gather(resume.capture_rng(self.noise))
        stream = self.world.gather(self.stream.position()) if self.stream is not None else None
        ema = self.ema.shadow if self.ema else None
        path = None
        if self.world.main:
            def write(folder: Path):
                if self.dcp_checkpoints:
                    # Every rank writes its shards into rank 0's temporary folder (see save_sharded).
                    self.world.broadcast(folder)
                    save_sharded(folder, self.objective, self.optimizer, ema)
                else:
                    self.method.save(folder / self.method.file_name(), self.step)
                    if ema:
                        save_state_dict({k: v.cpu().contiguous() for k, v in ema.items()}, folder / resume.EMA_FILE)
                    torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
                torch.save({"ranks": rng, "scaler": self.scaler.state_dict()}, folder / "rng.pt")
                if stream is not None:
                    resume.save_json(folder / "stream.json", {"ranks": stream})
                resume.save_json(folder / "state.json", self._state())
            path = resume.write_checkpoint(self.output, self.step, write, self.config.keep_checkpoints)
        elif self.dcp_checkpoints:
            save_sharded(self.world.broadcast(None), self.objective, self.optimizer, ema)
        self.world.barrier()
        self.last_checkpoint = self.world.broadcast(path)
        return self.last_checkpoint

    def _load_checkpoint(self, folder: Path) -> None:
        state = resume.load_json(folder / "state.json")
        changed = [key for key in ("method", "seed", "batch_size", "gradient_accumulation")
                   if state["config"][key] != getattr(self.config, key)]
        if changed:
            saved = ", ".join(f"{key}={state['config'][key]!r}" for key in changed)
            raise ConfigError(f"{folder} was trained with different {', '.join(changed)} ({saved}); resume with the "
                              "same values")
        written_with = state["config"].get("distributed", "ddp")
        if written_with != self.config.distributed:
            raise ConfigError(f"{folder} was written with distributed = {written_with!r} (its files differ): resume "
                              f"it with the same setting")
        same_world = state["world_size"] == self.world.size
        # DCP checkpoints are keyed by parameter name and re-cut on load, so FSDP may resume at another world size;
        # a streaming position belongs to the readers of each rank and cannot be re-cut.
        if not same_world and (not self.dcp_checkpoints or self.stream is not None):
            raise ConfigError(f"{folder} was written by {state['world_size']} process(es), this run has "
                              f"{self.world.size}: resume with the same number of processes")
        if self.dcp_checkpoints:
            load_sharded(folder, self.objective, self.optimizer, self.ema.shadow if self.ema else None)
        else:
            self.method.load(folder / self.method.file_name())
            resume.apply_state_file(folder / "optimizer.pt", self.optimizer.load_state_dict)
            if self.ema:
                shadow = read_state_dict(folder / resume.EMA_FILE)
                self.ema.shadow = {k: shadow[k].to(self.device) for k in self.ema.shadow}
        if self.ema:
            self.ema.updates = state["ema_updates"]
        def restore_random_state(extra: dict) -> None:
            if same_world:
                resume.restore_rng(extra["ranks"][self.world.rank], self.noise)
            else:
                # The noise generator is the same on every rank (module docstring); the per-rank generators
                # (dropout) keep this run's seeding: resuming at another world size is not bitwise.
                self.noise.set_state(extra["ranks"][0]["noise"])
            self.scaler.load_state_dict(extra["scaler"])
        resume.apply_state_file(folder / "rng.pt", restore_random_state)
        if self.stream is not None:
            try:
                self.stream = self._stream_loader(resume.load_json(folder / "stream.json")["ranks"][self.world.rank])
            except FileNotFoundError:
                raise ConfigError(f"{folder} holds no streaming data position (it was trained with streaming = "
                                  "false): resume it with the same data settings") from None
            except ValueError as e:  # another num_workers
                raise ConfigError(f"{folder}: {e}") from None
        # The data position counts global batches: at another world size, the same number of samples seen.
        batch = state["batch"] * state["world_size"] // self.world.size
        self.step, self.position = state["step"], (state["epoch"], batch)
        self.skipped_nan, self.consecutive_nan = state["skipped_nan"], state["consecutive_nan"]
        self.last_checkpoint = folder
        if self.world.main:
            self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Drop metric lines past the resumed step (written after the checkpoint by a run that then died)."""
        path = self.output / "metrics.jsonl"
        if path.is_file():
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line)["step"] <= self.step]
            with atomic_write(path, "w", encoding="utf-8") as file:  # a crash here must not lose the log
                file.write("".join(line + "\n" for line in kept))

    # --- validation ---------------------------------------------------------------------------------------------------

    def _validation_images(self) -> None:
        from .sampling import preview_images
        folder = self.output / "samples"
        folder.mkdir(exist_ok=True)
        size = square_size(self.config)
        self.model.eval()
        images = preview_images(self.model, self.conditioner, list(self.config.validation_prompts), size, size,
                                steps=self.config.validation_steps, cfg_scale=self.config.validation_cfg,
                                seed=self.config.seed)
        self.model.train()
        for i, image in enumerate(images):
            image.save(folder / f"step-{self.step:06d}-{i}.png")

    def _log_retention(self, metrics) -> None:
        """One metrics.jsonl line {step, retention_*} (train.retention); it draws from no training random stream."""
        metrics.write(json.dumps({"step": self.step, **self.retention.measure(self.step)}) + "\n")
        metrics.flush()

    # --- the loop -----------------------------------------------------------------------------------------------------

    def _on_signal(self, signum, frame):
        self._stop_signal = signal.Signals(signum).name

    def run(self) -> TrainResult:
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            return self._loop()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _loop(self) -> TrainResult:
        config, world = self.config, self.world
        metrics = open(self.output / "metrics.jsonl", "a") if world.main else None
        bar = tqdm(total=config.max_steps, initial=self.step, disable=not (config.progress and world.main),
                   desc=f"train {config.method}", dynamic_ncols=True)
        batches = self._batches()
        params = [p for _, p in self.trainable]
        interrupted = None
        if self.retention and self.step == 0:  # the base's own values, the reference of the curves
            self._log_retention(metrics)
        try:
            while self.step < config.max_steps:
                started = time.perf_counter()
                drawn = []  # (epoch, global size) of each micro-batch, as the method takes them
                losses, finite = self.method.accumulate(self, self._step_batches(batches, drawn))
                batch_epoch, samples = drawn[-1][0], sum(size for _, size in drawn)
                finite = not world.any(not finite)
                grad_norm = float("nan")
                if finite:
                    for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                        group["lr"] = base * lr_factor(self.step, config.warmup_steps, config.max_steps,
                                                       config.lr_scheduler)
                    self.scaler.unscale_(self.optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        params, config.max_grad_norm if config.max_grad_norm > 0 else float("inf")).item()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    if self.ema:
                        self.ema.update(self.trainable)
                    self.consecutive_nan = 0
                else:
                    self.skipped_nan += 1
                    self.consecutive_nan += 1
                    if self.consecutive_nan >= config.max_nan_steps:
                        raise TrainingError(
                            f"the loss was NaN/inf for {self.consecutive_nan} consecutive steps (at step "
                            f"{self.step + 1}); lower lr, use bf16 instead of fp16, or check the data")
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                penalties, self.penalties = self.penalties, {}
                parts, self.loss_parts = self.loss_parts, {}
                elapsed = time.perf_counter() - started
                loss = world.mean(sum(losses) / len(losses))
                if world.main and self.step % config.log_every == 0:
                    metrics.write(json.dumps({
                        **{name: sum(v) / len(v) for name, v in parts.items()},
                        "step": self.step, "epoch": batch_epoch, "loss": loss,
                        "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                        "img_per_s": samples / elapsed if elapsed > 0 else None,
                        "skipped_nan": self.skipped_nan,
                        **{f"penalty_{name}": sum(v) / len(v) for name, v in penalties.items()}}) + "\n")
                    metrics.flush()
                # ... and at the last step, so a run's end is always measured.
                if self.retention and (self.step % config.retention_every == 0 or self.step == config.max_steps):
                    self._log_retention(metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if world.main and config.validation_every and config.validation_prompts \
                        and self.step % config.validation_every == 0:
                    self._validation_images()
                stop = world.any(self._stop_signal is not None)
                if stop:
                    interrupted = self._stop_signal or "SIGTERM"
                    break
                if config.save_every and self.step % config.save_every == 0 and self.step < config.max_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            if metrics:
                metrics.close()
        self.save_checkpoint()
        weights = None
        if interrupted is None:
            weights = self.output / self.method.file_name()
            ema = self.ema.shadow if self.ema else None
            if self.method.trains_autoencoder:
                # The diffusion model's inputs are the new autoencoder's latents: measure their scale.
                with swapped(self.model, ema, prefix="model."):
                    self.model.scale_factor = self._measure_scale_factor()
                log.info("latent scale factor of the trained autoencoder: %.5f", self.model.scale_factor)
            if self.dcp_checkpoints:
                # Consolidated from the checkpoint just written, on rank 0's CPU: no rank gathers the model.
                if world.main:
                    export.consolidate(self.last_checkpoint, weights)
            elif world.main:
                self.method.save(weights, self.step, ema, DTYPES.get(config.save_precision))
            world.barrier()
        report = self._data_report()
        if world.main:
            resume.save_json(self.output / "data_report.json",
                             {"usable_images": len(self.data.items) if self.data else None,
                              "skipped": dict(report.counts),
                              "examples": {k: list(v) for k, v in report.examples.items()}})
        return TrainResult(self.step, weights, self.last_checkpoint, interrupted, report.summary(), self.skipped_nan)

    def _data_report(self) -> SkipReport:
        """The skips of the indexed data, or those the streaming readers of all ranks met so far."""
        if self.stream is None:
            return self.data.report
        report = SkipReport()
        for counts in self.world.gather(self.stream.skipped()):
            report.counts.update(counts)
        return report


class _NoDropout:
    """A stand-in RNG for computing an item's caption without caption dropout (text cache)."""

    def random(self):
        return 1.0

    def shuffle(self, values):
        pass


def train(config: TrainConfig) -> TrainResult:
    """Run a training as configured; see the module docstring."""
    return Trainer(config).run()

