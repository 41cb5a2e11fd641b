"""Contrastive image–text pre-training (CLIP; Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision"): the loss, the all-gather of embeddings across ranks, and the large-batch step.

Loss (the paper's Fig. 3): for a batch of N image–caption pairs with L2-normalised embeddings I_i, T_j and the learnt
log inverse temperature τ (`logit_scale`),
    logits_ij = exp(τ) · I_i · T_j,   loss = ½ (CE over rows of logits + CE over its columns), labels i = j,
i.e. the symmetric InfoNCE of van den Oord et al. 2018: each image must pick its own caption out of the N, and each
caption its own image. Hard negative captions (train.negatives; NegCLIP, Yuksekgonul et al. 2023) are M extra
columns of the image-to-text half only: image i picks caption i out of the N + M. τ starts at log(1 / 0.07) and the
scale exp(τ) is clipped at 100 (§2.5); the clip is applied where τ is used (`τ.clamp(max=log 100)`), so above it the
gradient on τ is zero and weight decay alone moves it.

Large batches (§2.5 trains with 32,768 pairs): the loss of a batch is not the sum of its parts' losses — every pair's
term depends on every other embedding in the batch — so gradient accumulation cannot run each micro-batch's loss on
its own. `gradient_cache_step` implements GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size
under Memory Limited Setup", §3.2): (1) embed every micro-batch without building a graph, (2) compute the whole
batch's loss on these cached embeddings and its gradient with respect to them (cheap: N × D numbers), (3) run each
micro-batch again with a graph and back-propagate the cached gradient of its embeddings into the towers. The
gradients equal those of one forward/backward over the whole batch (the towers are deterministic: CLIP has no
dropout), while only one micro-batch's activations are alive at a time. This was chosen over a cache of features
from earlier steps (as in MoCo's queue) because it is exact: the stale features of such a cache come from older
weights and get no gradient.

Distributed: each rank embeds its slice of the global batch; `gather` concatenates every rank's embeddings in rank
order with a backward that sums the gradients of all ranks' losses and hands each rank its own slice. Each rank
computes the loss of its own rows against all the columns (open_clip's "local loss"), and the mean of the ranks'
losses is the global batch's loss; DistributedDataParallel's averaging of the ranks' gradients then gives exactly its
gradient.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

INITIAL_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGradient(torch.autograd.Function):
    """[b, D] on each of R ranks -> [R·b, D] in rank order on every rank; the backward all-reduces (sums) the
    gradient of the gathered tensor over ranks and returns this rank's b rows of it."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        ctx.rows = local.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(every rank's rows concatenated [R·b, D], the index of this rank's first row); one process: (local, 0).
    Every rank must hold the same number of rows."""
    if not distributed():
        return local, 0
    return _GatherWithGradient.apply(local), dist.get_rank() * local.shape[0]


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              negative_features: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's pairs against the whole (gathered) batch; see the module docstring.

    image_features, text_features: [b, D] this rank's embeddings (unnormalised; pair i is row i of both);
    logit_scale: [] the log inverse temperature τ; negative_features: [m, D] this rank's hard negative captions or
    None (not gathered: each rank's images see the negatives of its own captions) -> the mean loss over this rank's
    b rows, [] float.
    """
    images, texts = F.normalize(image_features.float(), dim=-1), F.normalize(text_features.float(), dim=-1)
    all_images, first = gather(images)
    all_texts, _ = gather(texts)
    if negative_features is not None:
        all_texts = torch.cat([all_texts, F.normalize(negative_features.float(), dim=-1)])
    scale = logit_scale.float().clamp(max=MAX_LOGIT_SCALE).exp()
    labels = torch.arange(first, first + images.shape[0], device=images.device)
    per_image = scale * images @ all_texts.T  # [b, N (+ m)]: row i holds image i's logits over every caption
    per_text = scale * texts @ all_images.T  # [b, N]: caption i's logits over every image
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


class ContrastiveObjective(nn.Module):
    """Holds the CLIP as `model` (so the trained weights' names are "model." + the CLIP file's keys) and runs both
    towers: forward(pixels [B, 3, R, R] normalised as CLIP's preprocessing, tokens [B, 77], negative_tokens [M, 77]
    or None) -> (image embeddings [B, D], text embeddings [B, D], logit_scale [], negative embeddings [M, D] or
    None). The loss is taken outside, on the gathered batch."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor, negative_tokens: torch.Tensor | None = None):
        negatives = None if negative_tokens is None else self.model.encode_text(negative_tokens)
        return self.model.encode_image(pixels), self.model.encode_text(tokens), self.model.logit_scale, negatives


def gradient_cache_step(embed, train, count: int) -> float:
    """One optimizer step's forward and backward over `count` micro-batches by GradCache (see the module docstring).

    embed(i) -> (image embeddings [b_i, D], text embeddings [b_i, D], logit_scale [], hard negative embeddings
    [m_i, D] or None) of micro-batch i, run without a graph (step 1); train(i, loss) runs micro-batch i again with a
    graph (as training runs it: DDP, autocast), back-propagates loss(image, text, logit_scale, negatives) -> [] and
    returns that value (step 3). Returns the batch's loss (of this rank's rows; see `clip_loss`). One micro-batch is
    the whole batch: it runs once, with its loss.
    """
    if count == 1:
        return train(0, clip_loss).detach().item()
    with torch.no_grad():
        cached = [embed(i) for i in range(count)]
    images = torch.cat([c[0] for c in cached]).float().requires_grad_()
    texts = torch.cat([c[1] for c in cached]).float().requires_grad_()
    logit_scale = cached[0][2].detach().float().requires_grad_()
    negative_parts = [c[3] for c in cached if c[3] is not None]
    negatives = torch.cat(negative_parts).float().requires_grad_() if negative_parts else None
    loss = clip_loss(images, texts, logit_scale, negatives)
    image_grads, text_grads, scale_grad, *negative_grads = torch.autograd.grad(
        loss, (images, texts, logit_scale) + ((negatives,) if negatives is not None else ()))
    start = negative_start = 0
    for i, (image_rows, _, _, negative_rows) in enumerate(cached):
        rows = slice(start, start + image_rows.shape[0])
        start = rows.stop
        negative_slice = None
        if negative_rows is not None:
            negative_slice = slice(negative_start, negative_start + negative_rows.shape[0])
            negative_start = negative_slice.stop

        def surrogate(image_features, text_features, scale, negative_features=None, rows=rows,
                      negative_slice=negative_slice, last=i == count - 1):
            # Its gradient with respect to the embeddings is the cached one, so its backward is the whole batch
            # loss's; τ's gradient enters once, with the last micro-batch.
            value = (image_features.float() * image_grads[rows]).sum() + \
                (text_features.float() * text_grads[rows]).sum()
            if negative_features is not None:
                value = value + (negative_features.float() * negative_grads[0][negative_slice]).sum()
            return value + scale.float() * scale_grad if last else value

        train(i, surrogate)
    return loss.detach().item()
