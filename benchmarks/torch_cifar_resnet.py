"""PyTorch peer of resflax's CIFAR ResNets, for the resflax-vs-PyTorch train-step benchmark.

The same networks as `resflax.build_model(dict(family="cifar_resnet", block=B, depth=D,
width=W))` with the family's defaults (norm 'batch', shortcut 'A', ReLU, residual scale 1, no
bottleneck): given the same weights (`load_resflax_variables`), `CifarResNet` computes the same
function, in training mode (batch statistics) and in eval mode (running statistics);
tests/test_torch_peer.py checks this in float64 to rtol 1e-10. The CIFAR architecture and the
parameter-free option-A shortcut are those of He et al. 2015, "Deep Residual Learning for Image
Recognition", sec. 4.2; `block='v2'` is the pre-activation block of He et al. 2016, "Identity
Mappings in Deep Residual Networks", laid out as resflax lays it out.

Shapes (NCHW here; resflax is NHWC, with the same numbers), depth `D = 6n + 2`:

    input                       [B, 3, H, W]          (CIFAR: 32 x 32)
    stem: 3x3 conv, stride 1, pad 1, no bias -> BN -> ReLU    [B, W, H, W]
          (v2: the bare conv; the first block begins with BN + ReLU)
    stage 0: n blocks, W channels                  [B, W, H, W]
    stage 1: n blocks, 2W channels, first stride 2 [B, 2W, H/2, W/2]
    stage 2: n blocks, 4W channels, first stride 2 [B, 4W, H/4, W/4]
    (v2: BN -> ReLU) -> global average pool -> dense head with bias   [B, num_classes]

Blocks (every conv 3x3, pad 1, no bias; the stride sits on the first conv):

    plain: relu(BN(conv(relu(BN(conv(x))))))
    v1:    relu(s(x) + BN(conv(relu(BN(conv(x))))))
    v2:    s(x) + conv(relu(BN(conv(relu(BN(x))))))

`s` is the identity, or, where the block changes the shape (the first block of stages 1 and 2),
option A: `x[:, :, ::2, ::2]` with zero channels appended at the END of the channel axis. In v2
the first block of every stage applies its BN + ReLU before splitting, so its shortcut (the
identity in stage 0, option A after) carries `relu(BN(x))` (He et al. 2016, appendix: "we adopt
the first activation right after conv1 and before splitting into two paths"; fb.resnet.torch
preresnet.lua, 'both_preact'); every other v2 block's shortcut is the raw `x`.

BatchNorm: epsilon 1e-5; training mode normalizes with the batch mean and the *biased* batch
variance in both frameworks, so outputs agree. The running statistics differ in one detail that
does not matter for a speed benchmark: both update `m <- 0.9 m + 0.1 batch_value`, but resflax
feeds the biased batch variance into the running variance and PyTorch the unbiased one
(`N / (N - 1)` times larger, `N` = batch x height x width).

Parameter names mirror resflax's unrolled variables (`resflax.models.unroll_variables`):
`stages_1/first/block/w_0/kernel` is `stages.1.first.w_0.weight` here, `.../norm_0/scale` is
`...norm_0.weight`, batch_stats `mean`/`var` are `running_mean`/`running_var`; conv kernels HWIO
`[kh, kw, C_in, C_out]` become OIHW, the dense head `[in, out]` becomes `[out, in]`. Stage 0 has
no `first` block in plain/v1 (its blocks keep the stem's shape; v2 has one, see above), and a
stage with n = 1 has no `rest_i`.

For speed runs put the model and the images in `torch.channels_last`; the forward works with
either memory format. This module is optional (only benchmarks import it); nothing runs at import.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BLOCKS = ("plain", "v1", "v2")
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.1  # PyTorch's convention: m <- (1 - 0.1) m + 0.1 batch_value; resflax's 0.9.


def _conv3x3(in_channels: int, out_channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPSILON, momentum=BN_MOMENTUM)


def pad_shortcut(x: torch.Tensor, out_channels: int, stride: int) -> torch.Tensor:
    """Option A on NCHW `x`: `x[:, :, ::s, ::s]`, zero channels appended up to `out_channels`."""
    if stride != 1:
        x = x[:, :, ::stride, ::stride]
    extra = out_channels - x.shape[1]
    if extra < 0:
        raise ValueError(f"option A cannot reduce channels from {x.shape[1]} to {out_channels}")
    if extra:
        # F.pad's pairs run from the last axis backwards: (W lo, W hi, H lo, H hi, C lo, C hi).
        x = F.pad(x, (0, 0, 0, 0, 0, extra))
    return x


class BasicBlock(nn.Module):
    """One plain / v1 / v2 basic block: `[B, C_in, H, W] -> [B, width, H/stride, W/stride]`."""

    def __init__(self, kind: str, in_channels: int, width: int, stride: int,
                 shared_preact: bool = False):
        super().__init__()
        self.shared_preact = shared_preact
        if kind not in BLOCKS:
            raise ValueError(f"block={kind!r} is not supported; allowed values: {list(BLOCKS)}")
        self.kind, self.width, self.stride = kind, width, stride
        self.reshapes = stride != 1 or in_channels != width
        self.w_0 = _conv3x3(in_channels, width, stride)
        # v2 normalizes the block's input (C_in channels) first; plain/v1 each conv's output.
        self.norm_0 = _batch_norm(in_channels if kind == "v2" else width)
        self.w_1 = _conv3x3(width, width, 1)
        self.norm_1 = _batch_norm(width)

    def _skip(self, x: torch.Tensor) -> torch.Tensor:
        return pad_shortcut(x, self.width, self.stride) if self.reshapes else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "v2":
            preact = F.relu(self.norm_0(x))
            h = self.w_0(preact)
            h = self.w_1(F.relu(self.norm_1(h), inplace=True))
            # The first unit of a stage splits after its pre-activation (He et al. 2016,
            # appendix; fb.resnet.torch preresnet.lua 'both_preact'); the others on the raw x.
            return self._skip(preact if self.shared_preact else x) + h
        h = F.relu(self.norm_0(self.w_0(x)), inplace=True)
        h = self.norm_1(self.w_1(h))
        if self.kind == "plain":
            return F.relu(h, inplace=True)
        return F.relu(self._skip(x) + h, inplace=True)


class CifarResNet(nn.Module):
    """He et al. 2015's CIFAR network (sec. 4.2), as resflax builds it; input NCHW float.

    Args:
      block: 'plain', 'v1' or 'v2'.
      depth: number of weight layers, 6n + 2 (8, 14, 20, 32, 44, 56, 110, ...).
      width: channels of the first stage (16 in the paper); stages have W, 2W, 4W.
      num_classes: outputs of the head.
    """

    def __init__(self, block: str, depth: int, width: int = 16, num_classes: int = 10):
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"block={block!r} is not supported; allowed values: {list(BLOCKS)}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"depth={depth!r} is not valid for a CIFAR ResNet: must be 6n+2 with n >= 1 "
                "(8, 14, 20, 32, 44, 56, 110, 1202, ...)"
            )
        for name, value in (("width", width), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        self.block, self.depth, self.width, self.num_classes = block, depth, width, num_classes
        n = (depth - 2) // 6

        self.stem_layer = _conv3x3(3, width, 1)
        # He et al. 2016's pre-activation CIFAR nets (and resflax) have a bare conv stem.
        self.stem_norm = None if block == "v2" else _batch_norm(width)
        stages, in_channels = [], width
        for s in range(3):
            stage_width, stride = width * 2**s, (1 if s == 0 else 2)
            blocks = collections.OrderedDict()
            # resflax keeps a stage's first block apart ('first') from the repeated ones when it
            # changes the shape, or (v2) when its shortcut takes the pre-activation.
            first = stride != 1 or in_channels != stage_width or block == "v2"
            if first:
                blocks["first"] = BasicBlock(block, in_channels, stage_width, stride,
                                             shared_preact=block == "v2")
            for i in range(n - 1 if first else n):
                blocks[f"rest_{i}"] = BasicBlock(block, stage_width, stage_width, 1)
            stages.append(nn.Sequential(blocks))
            in_channels = stage_width
        self.stages = nn.ModuleList(stages)
        self.final_norm = _batch_norm(in_channels) if block == "v2" else None
        self.head = nn.Linear(in_channels, num_classes, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """logits `[B, num_classes]` from images `[B, 3, H, W]`."""
        x = self.stem_layer(x)
        if self.stem_norm is not None:
            x = F.relu(self.stem_norm(x), inplace=True)
        for stage in self.stages:
            x = stage(x)
        if self.final_norm is not None:
            x = F.relu(self.final_norm(x), inplace=True)
        return self.head(x.mean(dim=(2, 3)))


_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, prefix + (str(key),))
        else:
            yield prefix + (str(key),), value


def _torch_name(collection: str, path: tuple[str, ...]) -> str:
    """('stages_1', 'first', 'block', 'w_0', 'kernel') -> 'stages.1.first.w_0.weight'."""
    leaf = _LEAF_NAMES.get((collection, path[-1]))
    if leaf is None:
        raise ValueError(f"unexpected resflax variable {collection}/{'/'.join(path)}")
    if path[0] == "stem":  # resflax's stem module: 'stem/layer', 'stem/norm'.
        path = (f"stem_{path[1]}",) + tuple(path[2:])
    parts = []
    for part in path[:-1]:
        if part == "block":  # resflax's scan-step wrapper; no module of its own here.
            continue
        if part.startswith("stages_"):
            parts += ["stages", part[len("stages_"):]]
        else:
            parts.append(part)
    return ".".join(parts + [leaf])


def _to_torch_layout(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:  # conv kernel HWIO -> OIHW
        return np.transpose(value, (3, 2, 0, 1))
    if value.ndim == 2:  # dense kernel [in, out] -> [out, in]
        return value.T
    return value


def load_resflax_variables(model: CifarResNet, variables: Mapping[str, Any]) -> None:
    """Copies resflax variables into `model`'s parameters and BN buffers, in place.

    `variables`: `{'params': ..., 'batch_stats': ...}` as `model.init` returns them (scanned
    layout, unrolled here with `resflax.models.unroll_variables`; an unrolled tree works too).
    Values are cast to the dtype of the torch tensor they go into (float32 or float64) and keep
    its memory format. Raises ValueError naming every resflax variable without a torch
    counterpart, every torch parameter/buffer left unfilled, and every shape mismatch.
    """
    from resflax.models import unroll_variables  # Lazy: only the loader needs resflax / jax.

    unrolled = unroll_variables(variables)
    extra_collections = sorted(set(unrolled) - {"params", "batch_stats"})
    targets = dict(model.named_parameters())
    targets.update(
        (name, buf)
        for name, buf in model.named_buffers()
        if not name.endswith("num_batches_tracked")  # Unused: BN momentum is set.
    )
    sources: dict[str, np.ndarray] = {}
    unknown, mismatched, seen = [], [], set()
    for collection in ("params", "batch_stats"):
        for path, value in _flatten(unrolled.get(collection, {})):
            label = f"{collection}/{'/'.join(path)}"
            try:
                name = _torch_name(collection, path)
            except ValueError:
                unknown.append(label)
                continue
            if name not in targets:
                unknown.append(f"{label} (-> {name})")
                continue
            seen.add(name)
            array = _to_torch_layout(np.asarray(value))
            if tuple(array.shape) != tuple(targets[name].shape):
                mismatched.append(
                    f"{label}: resflax {tuple(np.shape(value))} -> {tuple(array.shape)}, "
                    f"torch {name} {tuple(targets[name].shape)}"
                )
                continue
            sources[name] = array
    missing = sorted(set(targets) - seen)
    problems = []
    if extra_collections:
        problems.append(f"unexpected variable collections {extra_collections}")
    if unknown:
        problems.append("resflax variables with no torch counterpart: " + ", ".join(unknown))
    if missing:
        problems.append("torch parameters/buffers with no resflax variable: " + ", ".join(missing))
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched))
    if problems:
        raise ValueError(
            "cannot load resflax variables into CifarResNet:\n  " + "\n  ".join(problems)
        )
    with torch.no_grad():
        for name, array in sources.items():
            target = targets[name]
            target.copy_(torch.from_numpy(np.array(array, copy=True)).to(target.dtype))


def make_train_step(
    model: nn.Module, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`step(images_nchw, labels) -> loss`: one SGD step on `model`, in place.

    Forward in training mode (batch statistics, running averages updated), mean cross-entropy,
    backward, `torch.optim.SGD` (momentum, no dampening, no Nesterov; L2 weight decay `g + wd w`
    on every parameter, BN scales/biases and the head's bias included, as He et al. 2015 and
    resflax's `cifar10_he2015` config do), then `zero_grad(set_to_none=True)`. Returns the
    detached loss tensor (no host sync: a benchmark synchronizes the device itself). The
    optimizer is `step.optimizer`. Images and model may be in `torch.channels_last`.
    """
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        model.train()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    step.optimizer = optimizer
    return step
