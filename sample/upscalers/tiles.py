"""Tiled inference: run an image-to-image model on overlapping tiles and blend them, so memory stays bounded by the
tile size whatever the image size (A1111's ESRGAN tile 192, overlap 8 are the defaults)."""
import torch

DEFAULT_TILE = 192
DEFAULT_OVERLAP = 16


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis: stride tile - overlap, the last tile flush with the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]


def _ramp(length: int, overlap: int, before: bool, after: bool) -> torch.Tensor:
    """[length] blending weight: rises linearly over the first `overlap` pixels when a tile precedes, falls over the
    last `overlap` when one follows, 1 elsewhere (always > 0, so every pixel has weight)."""
    weight = torch.ones(length)
    ramp = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
    if before and overlap:
        weight[:overlap] = ramp
    if after and overlap:
        weight[-overlap:] = torch.minimum(weight[-overlap:], ramp.flip(0))
    return weight


@torch.no_grad()
def run_tiled(model, x: torch.Tensor, scale: int, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP
              ) -> torch.Tensor:
    """model(x) for x: [B, C, H, W] -> [B, C_out, H·scale, W·scale], computed tile by tile (tile × tile inputs that
    overlap by `overlap` pixels) and blended linearly across the overlaps. Exact for models whose receptive field
    is pointwise; for convolutional ones the seams differ from a whole-image pass by the missing context."""
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"tile must be positive and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    height, width = x.shape[-2:]
    if height <= tile and width <= tile:
        return model(x)
    rows, cols = _starts(height, tile, overlap), _starts(width, tile, overlap)
    out = weights = None
    for top in rows:
        for left in cols:
            piece = model(x[..., top: top + tile, left: left + tile])  # [B, C_out, h·s, w·s]
            th, tw = piece.shape[-2] // scale, piece.shape[-1] // scale
            weight = torch.outer(_ramp(th, overlap, top > 0, top + th < height),
                                 _ramp(tw, overlap, left > 0, left + tw < width))
            weight = weight.repeat_interleave(scale, 0).repeat_interleave(scale, 1).to(piece)
            if out is None:
                out = piece.new_zeros(*piece.shape[:2], height * scale, width * scale)
                weights = piece.new_zeros(height * scale, width * scale)
            rows_out = slice(top * scale, (top + th) * scale)
            cols_out = slice(left * scale, (left + tw) * scale)
            out[..., rows_out, cols_out] += piece * weight
            weights[rows_out, cols_out] += weight
    return out / weights
