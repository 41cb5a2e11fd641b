"""The FID Inception-v3: TensorFlow's 2015-12-05 ImageNet graph, in the module tree of its PyTorch weight file.

FID (Heusel et al. 2017) and IS (Salimans et al. 2016) are defined by one network: the Inception-v3 (Szegedy et al.
2016, "Rethinking the Inception Architecture for Computer Vision", fig. 5-7 and table 1) that TensorFlow released as
`inception-2015-12-05.tgz`. pytorch-fid and torch-fidelity ship the same port of it,
`pt_inception-2015-12-05-6726825d.pth` (torch-fidelity names it `weights-inception-2015-12-05-6726825d.pth`; the
suffix is the first 8 hex digits of the file's SHA-256). The modules below carry that file's key names
(`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch5x5_1.bn.running_var`, `fc.bias`, ...) so it loads as it is.

The graph differs from torchvision's ImageNet Inception-v3, and the differences change the numbers:
- the average-pool branches of the A, C and E blocks average over the in-image pixels only (TensorFlow's SAME padding
  ignores padded zeros: `count_include_pad=False`);
- the last block (Mixed_7c) pools its fourth branch with a 3x3 *max* pool, where the paper and Mixed_7b use an average;
- the classifier has 1008 outputs (1000 ImageNet classes plus 8 unused), and the IS of Salimans et al. took its logits
  without the bias (their code multiplies pool_3 by the softmax weights only).

Input is [B, 3, 299, 299] scaled to [-1, 1]; `metrics.resize` produces it from images under each common convention.
"""
import hashlib
import os

import torch
import torch.nn.functional as F
from torch import nn

from ldm.checkpoint import CheckpointError, read_state_dict

STANDARD_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
STANDARD_SHA256_PREFIX = "6726825d"
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (TensorFlow's ε = 0.001) and ReLU; keys `conv.weight`, `bn.*`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def tf_average_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average over in-image pixels only, as TensorFlow's SAME-padded AvgPool does at the borders."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (fig. 5): 1x1, 5x5, double 3x3 and pool branches; Mixed_5b/5c/5d."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, 35, 35] -> [B, 224 + pool_features, 35, 35]
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(tf_average_pool_3x3(x)),
        ], dim=1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 grid reduction (fig. 10); Mixed_6a."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, 288, 35, 35] -> [B, 768, 17, 17]
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (fig. 6); Mixed_6b..6e."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, 768, 17, 17] -> [B, 768, 17, 17]
        double = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = conv(double)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(tf_average_pool_3x3(x)),
        ], dim=1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 grid reduction; Mixed_7a."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, 768, 17, 17] -> [B, 1280, 8, 8]
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class InceptionE(nn.Module):
    """8x8 block with expanded 1x3 / 3x1 outputs (fig. 7); Mixed_7b (`pool="avg"`) and Mixed_7c (`pool="max"`)."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, 8, 8] -> [B, 2048, 8, 8]
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = tf_average_pool_3x3(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(single), self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        ], dim=1)


class FIDInceptionV3(nn.Module):
    """The whole network; `forward` returns the 2048-d pool_3 features (FID, KID) and 1008 bias-free logits (IS)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_LOGITS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, 3, 299, 299] in [-1, 1] -> (pool features [B, 2048], logits [B, 1008] without the fc bias)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # [B, 64, 147, 147]
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [B, 64, 73, 73]
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # [B, 192, 71, 71]
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [B, 192, 35, 35]
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,  # -> [B, 768, 17, 17]
                      self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
                      self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):  # -> [B, 2048, 8, 8]
            x = block(x)
        features = x.mean(dim=(2, 3))  # pool_3: global average, [B, 2048]
        return features, features @ self.fc.weight.T


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_standard_digest(sha256: str) -> bool:
    """Whether a file's SHA-256 (hex) is that of the standard FID weight file (it starts with 6726825d)."""
    return sha256.startswith(STANDARD_SHA256_PREFIX)


def is_standard_weights(path: str | os.PathLike) -> bool:
    """Whether the file is byte-for-byte the standard FID weight file."""
    return is_standard_digest(file_sha256(path))


def load_inception(path: str | os.PathLike, device: str | torch.device | None = None) -> FIDInceptionV3:
    """The FID Inception with weights from `path` (pytorch-fid / torch-fidelity key layout), in eval mode.

    Loading is strict, except that BatchNorm's `num_batches_tracked` counters are optional (training bookkeeping that
    some saves include and others do not). Only the file whose hash `is_standard_weights` accepts gives numbers
    comparable with published FIDs; any other file still loads, for internal comparisons.
    """
    source = os.fspath(path)
    state_dict = read_state_dict(source, device=device or "cpu")
    with torch.device("meta"):
        model = FIDInceptionV3()
    expected = model.state_dict().keys()
    optional = {key for key in expected if key.endswith("num_batches_tracked")}
    missing = sorted(expected - state_dict.keys() - optional)
    unexpected = sorted(state_dict.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} is not an FID Inception-v3 weight file in pytorch-fid's layout: {len(missing)} missing key(s) "
            f"{missing[:6]}, {len(unexpected)} unexpected key(s) {unexpected[:6]}. The standard file is "
            f"{STANDARD_WEIGHTS_NAME}.")
    for key in optional - state_dict.keys():
        state_dict[key] = torch.zeros((), dtype=torch.long, device=device or "cpu")
    try:
        model.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()},
                              strict=True, assign=True)
    except RuntimeError as error:  # tensors of the wrong shapes under the right names
        raise CheckpointError(f"{source} does not fit the FID Inception-v3: {error}") from None
    return model.eval().requires_grad_(False)
