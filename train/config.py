"""The training configuration: one typed dataclass, read from TOML (`tomllib`) and overridden on the command line.

Precedence is defaults < TOML file < command line. `[preprocessing]` is a nested dataclass (`Preprocessing`): its keys
are `preprocessing.<key>` (`--preprocessing.random-crop`), each also accepted without the prefix (`random_crop = true`,
`--random-crop`). Any other TOML table groups keys by prefix: `[lora] rank = 8` is the key `lora_rank`;
`[architecture]` is itself a key (a table of preset overrides for training from scratch). On the command line every key
is `--key-with-dashes VALUE`; booleans are `--flag` / `--no-flag`; lists and tables are written as TOML values
(`--validation-prompts '["a cat", "a dog"]'`, `--architecture '{unet = {model_channels = 64}}'`).
"""
import argparse
import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

LR_SCHEDULERS = ("constant", "linear", "cosine")
RECONSTRUCTION_LOSSES = ("l1", "mse")
SAVE_PRECISIONS = ("fp32", "fp16", "bf16")
MIXED_PRECISION = ("no", "fp16", "bf16")
DISTRIBUTED = ("ddp", "fsdp")
FSDP_DTYPES = ("fp32", "bf16", "fp16")
# Methods FSDP shards: those whose trained weights are the UNet (and text towers) or a LoRA network on them.
FSDP_METHODS = ("full", "dreambooth", "lora")
DATA_FORMATS = ("auto", "folder", "imagefolder", "webdataset")
TRAIN_SCOPES = ("all", "cross_attention_kv")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or inconsistent; the message names the key."""


@dataclass
class Preprocessing:
    """How images become training samples: buckets, crops, flips, caption augmentation (see train.buckets)."""
    resolution: int = 512
    bucket: bool = True
    bucket_step: int = 64
    bucket_min_size: int = 256
    bucket_max_size: int = 1024
    bucket_no_upscale: bool = False
    random_crop: bool = False
    flip: bool = False
    caption_shuffle: bool = False
    keep_tokens: int = 0
    caption_dropout: float = 0.0
    # Applied to every caption: `{caption}` is the caption, `{token}` the textual-inversion token.
    caption_template: str = ""
    max_image_pixels: int = 8192 * 8192


@dataclass
class TrainConfig:
    # --- what to train ------------------------------------------------------------------------------------------------
    # A checkpoint file, or `preset:NAME` (e.g. preset:tiny) for a randomly initialised model trained from scratch.
    model: str = ""
    # Overrides of the preset's fields for from-scratch training: {unet = {...}, vae = {...}, text = [{...}],
    # resolution = 64, prediction = "v", scale_factor = 1.0}.
    architecture: dict = field(default_factory=dict)
    method: str = "full"
    # Prediction target override ("eps" or "v"); empty keeps the model's own.
    prediction: str = ""
    train_text_encoder: bool = False
    # Which UNet weights train (full, dreambooth) or get adapters (lora): "all", or "cross_attention_kv", only the
    # cross-attention key and value projections (attn2.to_k / to_v), as Custom Diffusion (Kumari et al. 2023, §3.2).
    train_scope: str = "all"
    # Loss terms keeping the model near its base (train.regularizers): {name = weight}, e.g. {l2_sp = 0.01}.
    regularizers: dict = field(default_factory=dict)
    # --- data ---------------------------------------------------------------------------------------------------------
    data: str = ""
    data_format: str = "auto"
    # Optional filtered LAION parquet: only shard samples whose URL (or key) it lists are used.
    metadata: str = ""
    caption_extension: str = ".txt"
    caption_column: str = "text"
    empty_captions: str = "keep"  # "keep" (train unconditionally on them) or "skip"
    min_image_size: int = 64
    verify_images: bool = True
    # Stream webdataset shards instead of indexing them (train.streaming): `data` is a brace range, a shard list
    # file or a folder; the shuffle buffer holds `shuffle_buffer` samples per reader (rank × data worker).
    streaming: bool = False
    shuffle_buffer: int = 1000
    # --- preprocessing ------------------------------------------------------------------------------------------------
    # TOML table [preprocessing]; each of its keys is also accepted at the top level (`resolution = 512`).
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    cache_latents: bool = False
    cache_text: bool = False
    cache_dir: str = ""
    num_workers: int = 0
    # --- optimisation -------------------------------------------------------------------------------------------------
    max_steps: int = 1000
    batch_size: int = 1
    gradient_accumulation: int = 1
    lr: float = 1e-5
    lr_text_encoder: float = 0.0  # 0: same as lr
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0: no clipping
    ema_decay: float = 0.0  # 0: no EMA
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0  # 0: plain MSE
    zero_terminal_snr: bool = False
    max_nan_steps: int = 10
    seed: int = 0
    # --- output -------------------------------------------------------------------------------------------------------
    output: str = ""
    # The trained model's name, stored in its file so generation's infotext says "Model: <name>" (default: the
    # output folder's name).
    output_name: str = ""
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    # dtype of the final weights file (checkpoint folders stay fp32 so a resume is exact)
    save_precision: str = "fp32"
    resume: str = ""  # a checkpoint-<step> folder, or "latest" (the newest one in output)
    log_every: int = 1
    progress: bool = True
    validation_prompts: list = field(default_factory=list)
    validation_every: int = 0
    validation_steps: int = 20
    validation_cfg: float = 7.0
    # The forgetting monitor (train.retention): prompts standing for what the base knew; every retention_every steps
    # (and at the last) the denoising loss on the base's own generations for them, vs the base's, goes to
    # metrics.jsonl.
    retention_prompts: list = field(default_factory=list)
    retention_every: int = 50
    retention_images: int = 2  # base generations per prompt
    retention_timesteps: int = 4  # (t, noise) draws per generation
    retention_judge: bool = True  # also judge the current model's images when a judge applies (shapes world)
    retention_warn: float = 0.1  # warn when the loss rose by more than this fraction of the base's
    device: str = "auto"
    # --- several processes (torchrun) ---------------------------------------------------------------------------------
    # "ddp": every rank holds the whole model and optimizer; "fsdp": FSDP2 shards them per UNet block / text
    # transformer block (train.distributed.shard), checkpoints are DCP folders (python -m train.export consolidates).
    distributed: str = "ddp"
    # FSDP mixed precision: the dtype the gathered parameters compute in, and the dtype gradients are reduced in.
    fsdp_param_dtype: str = "fp32"
    fsdp_reduce_dtype: str = "fp32"
    # FSDP keeps the sharded parameters, gradients and optimizer state in CPU memory (needs CUDA devices).
    fsdp_cpu_offload: bool = False
    # --- LoRA / LoCon -------------------------------------------------------------------------------------------------
    lora_name: str = "lora"
    lora_rank: int = 4
    lora_alpha: float = 1.0
    lora_conv_rank: int = 0  # > 0 adds LoCon on the 3x3 convolutions
    lora_conv_alpha: float = 1.0
    # --- latent consistency distillation (method lcm, train.methods.lcm) ---------------------------------------------
    # Method clip: hard negative captions from train.negatives.NEGATIVES by name, e.g. ["spatial", "colours"].
    clip_negatives: list = field(default_factory=list)
    lcm_student: str = "lora"  # "lora" (an LCM-LoRA, kohya file) or "full" (the whole UNet, a model file)
    lcm_skip: int = 20  # DDPM steps per teacher DDIM step (t_{n+k} -> t_n), LCM's skipping-step k
    lcm_guidance: float = 7.0  # the teacher's CFG scale, distilled into the student (sample it with CFG 1)
    lcm_loss: str = "huber"  # "huber" (pseudo-Huber) or "l2"
    lcm_huber_c: float = 0.001
    # Reward-guided LCD (train.rewards): a reward name of train.rewards.REWARDS ("" off), the file it reads (the
    # "clip" reward: a CLIP file), and β, the reward's weight against the consistency loss.
    lcm_reward: str = ""
    lcm_reward_model: str = ""
    lcm_reward_weight: float = 0.1
    # "consistency" (LCD) or "dmd": distribution matching of a full student against the teacher, with a fake score
    # trained beside it (DMD2); lcm_teacher: the teacher's model file ("": the model the student starts from), so a
    # distilled student can be refined against its base; lcm_fake_lr: the fake score's learning rate (0: lr).
    lcm_objective: str = "consistency"
    lcm_teacher: str = ""
    lcm_fake_lr: float = 0.0
    # --- DreamBooth ---------------------------------------------------------------------------------------------------
    instance_prompt: str = ""
    class_prompt: str = ""
    # Instead of class_prompt: the prompts missing prior images are generated for, in turn, each image captioned with
    # its own prompt — a replay of the base's own generations of what it knew, which needs none of its training data.
    class_prompts: list = field(default_factory=list)
    class_data: str = ""
    num_class_images: int = 0
    prior_loss_weight: float = 1.0
    class_sample_steps: int = 20
    # --- textual inversion (and pivotal tuning: with method lora, the token's vectors train with the adapters) -------
    # One word; for pivotal tuning also several, comma-separated ("star, purple"), each with vectors of its own.
    token: str = ""
    # The text whose token embeddings start every word's vectors, or one per word, comma-separated ("star, purple").
    initializer: str = "*"
    num_vectors: int = 1
    lr_embedding: float = 0.0  # pivotal tuning's learning rate for the token's vectors (0: lr)
    # --- VAE ----------------------------------------------------------------------------------------------------------
    kl_weight: float = 1e-6
    reconstruction_loss: str = "l1"  # "l1" (CompVis) or "mse"
    # --- ControlNet ---------------------------------------------------------------------------------------------------
    # Imagefolder metadata column naming each image's control image file (diffusers' ControlNet convention).
    conditioning_column: str = "conditioning_image"
    # The webdataset field of each sample's control image: the member `<key>.conditioning.png` beside `<key>.jpg`.
    conditioning_field: str = "conditioning.png"
    # A function of train.conditioning.CONDITIONING_FUNCTIONS computing the control image from the (cropped) training
    # image instead of reading files; empty: the column's files.
    conditioning_function: str = ""
    # Zhang et al.'s `sd_locked`: true trains the ControlNet alone; false also trains the UNet's decoder
    # (output_blocks, out), which is then saved beside the ControlNet file.
    sd_locked: bool = True
    # A ControlNet file (ldm.controlnet's original layout) to start from instead of the UNet's encoder copy
    # (`from_unet`): fine-tuning a trained ControlNet on another control map or recipe. Empty: the original start.
    controlnet_init: str = ""

    def run_name(self) -> str:
        """The name generation shows for the trained model: output_name, else the output folder's name."""
        return self.output_name or Path(self.output).resolve().name

    @property
    def tokens(self) -> list[str]:
        """The words of `token`: one, or several separated by commas."""
        return [word.strip() for word in self.token.split(",")] if self.token.strip() else []

    @property
    def initializers(self) -> list[str]:
        """One initializer text per word of `token`: `initializer` for each, or its comma-separated parts in turn
        when there are several words and it names one per word."""
        parts = [part.strip() for part in self.initializer.split(",")]
        return parts if len(self.tokens) > 1 and len(parts) > 1 else [self.initializer] * len(self.tokens)

    def validate(self) -> "TrainConfig":
        """Check value ranges and combinations; raises ConfigError naming the key and what to do."""
        from .methods import method_class

        def need(condition: bool, message: str):
            if not condition:
                raise ConfigError(message)

        prep = self.preprocessing
        need(bool(self.model), "model is not set: give a checkpoint path or preset:NAME (e.g. --model preset:tiny)")
        need(bool(self.data),
             "data is not set: give an image folder, an imagefolder with metadata.jsonl/csv, or .tar shards (--data)")
        need(bool(self.output), "output is not set: give a folder for the results (--output)")
        for key, allowed in (("lr_scheduler", LR_SCHEDULERS),
                             ("mixed_precision", MIXED_PRECISION), ("data_format", DATA_FORMATS),
                             ("empty_captions", ("keep", "skip")), ("prediction", ("", "eps", "v")),
                             ("reconstruction_loss", RECONSTRUCTION_LOSSES), ("save_precision", SAVE_PRECISIONS),
                             ("train_scope", TRAIN_SCOPES), ("distributed", DISTRIBUTED),
                             ("fsdp_param_dtype", FSDP_DTYPES), ("fsdp_reduce_dtype", FSDP_DTYPES)):
            need(getattr(self, key) in allowed, f"{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        for key in ("max_steps", "batch_size", "gradient_accumulation", "log_every", "max_nan_steps", "num_vectors",
                    "validation_steps", "retention_every", "retention_images", "retention_timesteps"):
            need(getattr(self, key) >= 1, f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("resolution", "bucket_step"):
            need(getattr(prep, key) >= 1, f"{key} must be >= 1, got {getattr(prep, key)}")
        for key in ("save_every", "warmup_steps", "lora_conv_rank", "num_class_images", "num_workers",
                    "validation_every", "min_image_size", "lr_embedding"):
            need(getattr(self, key) >= 0, f"{key} must be >= 0, got {getattr(self, key)}")
        need(prep.keep_tokens >= 0, f"keep_tokens must be >= 0, got {prep.keep_tokens}")
        problem = token_words_problem(self.tokens)
        need(not problem, f"token={self.token!r}: {problem}")
        need(len(self.initializers) == len(self.tokens),
             f"initializer={self.initializer!r} has {self.initializer.count(',') + 1} comma-separated parts for the "
             f"{len(self.tokens)} words of token={self.token!r}: give one text for all of them or one per word")
        need(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        need(0.0 <= prep.caption_dropout <= 1.0, f"caption_dropout must be in [0, 1], got {prep.caption_dropout}")
        need(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.retention_warn >= 0, f"retention_warn must be >= 0, got {self.retention_warn}")
        need(all(isinstance(p, str) and p for p in self.retention_prompts),
             "retention_prompts must be a list of non-empty prompts, e.g. --retention-prompts '[\"a red circle\"]'")
        need(self.lora_rank >= 1, f"lora_rank must be >= 1, got {self.lora_rank}")
        need(prep.bucket_min_size <= prep.bucket_max_size,
             f"bucket_min_size={prep.bucket_min_size} is larger than bucket_max_size={prep.bucket_max_size}")
        need(all(isinstance(p, str) and p for p in self.class_prompts),
             "class_prompts must be a list of non-empty prompts, e.g. --class-prompts '[\"a red circle\"]'")
        need(not (self.class_prompt and self.class_prompts),
             "set class_prompt (one caption for every prior image) or class_prompts (each image its own), not both")
        if self.num_class_images:
            need(bool(self.class_data) and bool(self.class_prompt or self.class_prompts),
                 "num_class_images generates prior images of class_prompt (or class_prompts) into class_data: set "
                 "both, or set num_class_images = 0 and give class_data images with their own captions")
        if self.streaming:
            need(self.method in ("full", "lora"),
                 f"streaming trains the methods full and lora; {self.method} checks every image before training: "
                 "set streaming = false")
            for key in ("cache_latents", "cache_text", "class_data", "metadata"):
                need(not getattr(self, key), f"{key} needs every image indexed before training, so it cannot be "
                                             f"combined with streaming; turn one of them off")
            need(self.shuffle_buffer >= 1, f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.distributed == "fsdp":
            need(self.method in FSDP_METHODS, f"distributed = 'fsdp' shards the methods {', '.join(FSDP_METHODS)}; "
                                              f"train {self.method} with distributed = 'ddp'")
            need(self.mixed_precision != "fp16", "fp16 loss scaling is not wired for FSDP's sharded gradients: use "
                                                 "mixed_precision = 'bf16' or fsdp_param_dtype = 'bf16'")
            need(not self.retention_prompts, "the forgetting monitor (retention_prompts) runs the model on one rank, "
                                             "which FSDP's shards cannot do: drop retention_prompts or use "
                                             "distributed = 'ddp'")
        if self.cache_latents:
            need(not (prep.random_crop or prep.flip),
                 "cache_latents stores one latent per image, so it cannot be combined with random_crop or flip; "
                 "turn one of them off")
        if self.cache_text:
            need(not (self.train_text_encoder or prep.caption_shuffle),
                 "cache_text needs fixed text embeddings: it cannot be combined with train_text_encoder or "
                 "caption_shuffle")
        from .regularizers import REGULARIZERS
        unknown = sorted(set(self.regularizers) - set(REGULARIZERS))
        need(not unknown, f"regularizers: unknown {', '.join(unknown)}; known: {', '.join(REGULARIZERS)}")
        need(all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0
                 for w in self.regularizers.values()),
             f"regularizers: each weight must be a number >= 0, got {self.regularizers}")
        need(not (self.regularizers and self.method == "vae"),
             "regularizers keep a denoiser near its base; method vae trains none: leave them empty")
        need(not (self.retention_prompts and self.method == "vae"),
             "retention_prompts measure the denoiser's drift; method vae trains no denoiser: leave them empty")
        from .negatives import NEGATIVES
        need(isinstance(self.clip_negatives, list) and set(self.clip_negatives) <= set(NEGATIVES),
             f"clip_negatives: {self.clip_negatives!r}; expected a list of names from {', '.join(NEGATIVES)}, "
             "e.g. --clip-negatives '[\"spatial\"]'")
        need(not (self.clip_negatives and self.method != "clip"),
             f"clip_negatives are hard negative captions for contrastive training (method clip); method "
             f"{self.method!r} has no use for them: leave them empty")
        method_class(self.method).check_config(self)
        return self


def token_words_problem(words: list[str]) -> str:
    """Why `words` cannot name sets of embedding vectors, or "" when they can: each must be one word, given once
    (A1111 matches an embedding's name as a whole word, ignoring case)."""
    if any(not word or any(c.isspace() for c in word) for word in words):
        return "each word must be one word without spaces, several separated by commas (e.g. 'star, purple')"
    if len({word.lower() for word in words}) != len(words):
        return "it names a word twice (case-insensitive): give each word once"
    return ""


# One label per key for --help.
HELP = {
    "model": "Checkpoint file to fine-tune, or preset:NAME to train from scratch",
    "architecture": "Preset overrides for training from scratch (TOML table)",
    "method": "Training method",
    "prediction": "Prediction target override: eps or v (empty: the model's)",
    "train_text_encoder": "Also train the text encoder (full, dreambooth, lora)",
    "train_scope": "UNet weights that train: all, or cross_attention_kv (Custom Diffusion)",
    "regularizers": "Loss terms toward the base: TOML table {l2_sp = W, ewc = W, distillation = W}",
    "data": "Image folder, imagefolder with metadata.jsonl/csv, or .tar shards",
    "data_format": "Data format: " + ", ".join(DATA_FORMATS),
    "metadata": "Filtered LAION parquet: keep only shard samples whose URL it lists",
    "caption_extension": "Caption file extension",
    "caption_column": "Caption column of an imagefolder's metadata",
    "empty_captions": "Images with an empty caption: keep (unconditional) or skip",
    "min_image_size": "Skip images whose shorter side is smaller (px)",
    "verify_images": "Decode every image once before training",
    "preprocessing.resolution": "Training resolution (bucket area = resolution squared)",
    "preprocessing.bucket": "Aspect-ratio bucketing",
    "preprocessing.bucket_step": "Bucket side step (px)",
    "preprocessing.bucket_min_size": "Smallest bucket side (px)",
    "preprocessing.bucket_max_size": "Largest bucket side (px)",
    "preprocessing.bucket_no_upscale": "Never upscale: small images get a bucket of their own size",
    "preprocessing.random_crop": "Random instead of center crop",
    "preprocessing.flip": "Random horizontal flip",
    "preprocessing.caption_shuffle": "Shuffle comma-separated caption tags",
    "preprocessing.keep_tokens": "Tags at the start of a caption that are never shuffled",
    "preprocessing.caption_dropout": "Probability of training on the empty caption",
    "preprocessing.caption_template": "Caption template with {caption} and {token}",
    "preprocessing.max_image_pixels": "Refuse images with more pixels (decompression bombs)",
    "cache_latents": "Cache VAE latents on disk",
    "cache_text": "Cache text embeddings on disk",
    "cache_dir": "Cache folder (default OUTPUT/cache)",
    "num_workers": "Data loader worker processes",
    "streaming": "Stream webdataset shards (brace range, shard list file or folder) instead of indexing them",
    "shuffle_buffer": "Samples in each streaming reader's shuffle buffer",
    "max_steps": "Optimizer steps to train to",
    "batch_size": "Batch size per process",
    "gradient_accumulation": "Micro-batches per optimizer step",
    "lr": "Learning rate",
    "lr_text_encoder": "Text encoder learning rate (0: lr)",
    "lr_scheduler": "Learning rate schedule: " + ", ".join(LR_SCHEDULERS),
    "warmup_steps": "Linear warmup steps",
    "weight_decay": "AdamW weight decay",
    "adam_beta1": "AdamW beta1",
    "adam_beta2": "AdamW beta2",
    "adam_epsilon": "AdamW epsilon",
    "max_grad_norm": "Gradient clipping norm (0: off)",
    "ema_decay": "EMA decay (0: off)",
    "mixed_precision": "Mixed precision: " + ", ".join(MIXED_PRECISION),
    "distributed": "Multi-process training under torchrun: " + ", ".join(DISTRIBUTED),
    "fsdp_param_dtype": "FSDP: dtype of the gathered parameters in forward/backward: " + ", ".join(FSDP_DTYPES),
    "fsdp_reduce_dtype": "FSDP: dtype gradients are reduce-scattered in: " + ", ".join(FSDP_DTYPES),
    "fsdp_cpu_offload": "FSDP: keep sharded parameters, gradients and optimizer state in CPU memory (CUDA only)",
    "gradient_checkpointing": "Gradient checkpointing (less memory, more compute)",
    "noise_offset": "Noise offset",
    "min_snr_gamma": "Min-SNR gamma (0: off)",
    "zero_terminal_snr": "Rescale the schedule to zero terminal SNR",
    "max_nan_steps": "Abort after this many consecutive NaN/inf steps",
    "seed": "Seed",
    "output": "Output folder",
    "output_name": "Name of the trained model in infotexts (default: the output folder's name)",
    "save_every": "Checkpoint every N steps (0: only at the end)",
    "keep_checkpoints": "Checkpoints to keep",
    "save_precision": "dtype of the final weights file: fp32, fp16 or bf16 (checkpoints stay fp32)",
    "resume": "Resume from a checkpoint folder, or latest",
    "log_every": "Write metrics every N steps",
    "progress": "Show a progress bar",
    "validation_prompts": "Validation prompts (TOML list)",
    "validation_every": "Validation images every N steps (0: off)",
    "validation_steps": "Sampling steps of validation images",
    "validation_cfg": "CFG scale of validation and class images",
    "retention_prompts": "Forgetting monitor: prompts of what the base knew (TOML list)",
    "retention_every": "Forgetting monitor: measure every N steps",
    "retention_images": "Forgetting monitor: base generations per retention prompt",
    "retention_timesteps": "Forgetting monitor: (timestep, noise) draws per base generation",
    "retention_judge": "Forgetting monitor: also judge the model's images (when a judge applies, e.g. shapes)",
    "retention_warn": "Forgetting monitor: warn when the retention loss rose by more than this fraction",
    "device": "Device: auto, cpu, cuda, cuda:N",
    "lora_name": "LoRA file name (used as <lora:name:weight>)",
    "lora_rank": "LoRA rank",
    "lora_alpha": "LoRA alpha (scale = alpha / rank)",
    "lora_conv_rank": "LoCon rank for 3x3 convolutions (0: off)",
    "lora_conv_alpha": "LoCon alpha",
    "clip_negatives": "CLIP: hard negative captions by name from train.negatives (TOML list: spatial, colours)",
    "lcm_student": "LCM: the student, lora (an LCM-LoRA) or full (the whole UNet)",
    "lcm_skip": "LCM: DDPM steps per teacher DDIM step (skipping-step k)",
    "lcm_guidance": "LCM: the teacher's CFG scale, distilled into the student",
    "lcm_loss": "LCM: consistency loss, huber (pseudo-Huber) or l2",
    "lcm_huber_c": "LCM: the pseudo-Huber constant c",
    "lcm_reward": "LCM: reward-guided distillation with this reward of train.rewards (clip; empty: off)",
    "lcm_reward_model": "LCM: the file the reward reads (clip: a CLIP .safetensors)",
    "lcm_reward_weight": "LCM: the reward's weight β against the consistency loss",
    "lcm_objective": "LCM: consistency (LCD) or dmd (distribution matching of a full student, DMD2)",
    "lcm_teacher": "LCM: the teacher's model file (empty: the model the student starts from)",
    "lcm_fake_lr": "LCM dmd: the fake score's learning rate (0: lr)",
    "instance_prompt": "DreamBooth instance prompt",
    "class_prompt": "Caption of every prior image (DreamBooth class prompt); empty: each keeps its own caption",
    "class_prompts": "Prompts prior images are generated for in turn, each keeping its prompt as caption (TOML list)",
    "class_data": "Prior-preservation images: DreamBooth's class images, or for any method images with captions",
    "num_class_images": "Class images to have (missing ones are generated)",
    "prior_loss_weight": "Prior-preservation loss weight",
    "class_sample_steps": "Sampling steps for class images",
    "token": "Textual inversion word (and file name); with lora: words (comma-separated) whose vectors train too "
             "(pivotal tuning)",
    "initializer": "Text whose token embeddings initialise the vectors; one per token word, comma-separated",
    "num_vectors": "Vectors per token",
    "lr_embedding": "Pivotal tuning (lora with token): learning rate of the token's vectors (0: lr)",
    "kl_weight": "VAE KL weight",
    "reconstruction_loss": "VAE reconstruction loss: l1 (CompVis) or mse (learns colour on mostly-blank images)",
    "conditioning_column": "ControlNet: imagefolder metadata column with each image's control image file",
    "conditioning_field": "ControlNet: webdataset field of each sample's control image (member <key>.FIELD)",
    "conditioning_function": "ControlNet: compute control images from the training images with this function",
    "sd_locked": "ControlNet: keep the UNet frozen (no: also train its decoder)",
    "controlnet_init": "ControlNet: start from this ControlNet file instead of the UNet's encoder",
}


PREPROCESSING = "preprocessing"


def _types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def option_types() -> dict[str, type]:
    """Every settable key and its type: TrainConfig's fields, with `preprocessing.<key>` in place of the table."""
    options = {name: kind for name, kind in _types(TrainConfig).items() if name != PREPROCESSING}
    options.update({f"{PREPROCESSING}.{name}": kind for name, kind in _types(Preprocessing).items()})
    return options


def option_value(config: TrainConfig, name: str):
    """The value of an `option_types` key (`lr`, `preprocessing.flip`) in `config`."""
    section, _, key = name.rpartition(".")
    return getattr(getattr(config, section) if section else config, key)


def _check_type(key: str, value, expected: type):
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{key} must be a {expected.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _dotted(table: dict, types_: dict[str, type], prefix: str = "") -> dict:
    """Settable keys of a TOML document: `[preprocessing] flip` -> `preprocessing.flip`, other tables become key
    prefixes (`[lora] rank` -> `lora_rank`) except tables that are themselves keys (`architecture`); a preprocessing
    key given at the top level (`flip`) is its alias."""
    keys = {}
    for name, value in table.items():
        key = f"{prefix}{name}".replace("-", "_")
        if key == PREPROCESSING and isinstance(value, dict):
            keys.update({f"{PREPROCESSING}.{k.replace('-', '_')}": v for k, v in value.items()})
        elif isinstance(value, dict) and types_.get(key) is not dict:
            keys.update(_dotted(value, types_, key + "_"))
        elif f"{PREPROCESSING}.{key}" in types_:
            keys[f"{PREPROCESSING}.{key}"] = value
        else:
            keys[key] = value
    return keys


def config_from_dict(values: dict, base: TrainConfig | None = None) -> TrainConfig:
    """A TrainConfig from `values` (flat keys, `preprocessing.<key>` keys or TOML tables) over `base` (defaults if
    None); not yet validated."""
    types_ = option_types()
    updates, prep_updates = {}, {}
    for key, value in _dotted(values, types_).items():
        if key not in types_:
            raise ConfigError(f"unknown config key {key!r}; see `python -m train --help` for the keys")
        value = _check_type(key, value, types_[key])
        if key.startswith(PREPROCESSING + "."):
            prep_updates[key[len(PREPROCESSING) + 1:]] = value
        else:
            updates[key] = value
    base = base or TrainConfig()
    preprocessing = dataclasses.replace(base.preprocessing, **prep_updates)
    return dataclasses.replace(base, **updates, preprocessing=preprocessing)


def load_toml(path: str | Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def _parse_cli_value(key: str, text: str, expected: type):
    if expected is str:
        return text
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"--{key.replace('_', '-')}: {text!r} is not a valid {expected.__name__} "
                          "(lists and tables are written as TOML values)") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--key` option per setting (`--preprocessing.key`, also `--key`); values stay unset (None) unless given."""
    from .methods import METHODS
    parser.add_argument("--config", help="TOML file with the configuration (command-line options override it)")
    defaults = TrainConfig()
    for name, kind in option_types().items():
        flags = ["--" + name.replace("_", "-")]
        if name.startswith(PREPROCESSING + "."):
            flags.append("--" + name[len(PREPROCESSING) + 1:].replace("_", "-"))
        label = HELP[name] + (f": {', '.join(METHODS)}" if name == "method" else "")
        label = f"{label} (default: {option_value(defaults, name)!r})"
        if kind is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None, help=label)
        else:
            parser.add_argument(*flags, dest=name, default=None, metavar=kind.__name__.upper(), help=label)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the --config TOML file, then every option given on the command line; validated."""
    config = config_from_dict(load_toml(args.config)) if args.config else TrainConfig()
    overrides = {}
    for name, kind in option_types().items():
        value = getattr(args, name, None)
        if value is None:
            continue
        overrides[name] = value if kind is bool else _parse_cli_value(name, value, kind)
    return config_from_dict(overrides, config).validate()


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)
