"""CLIP's symmetric contrastive loss, with the similarity matrix sharded across ranks.

Each rank gathers every rank's features (gradients flow back to the local ones) and, with
``local_loss=True``, computes only its own rows of the global similarity matrix: memory O(B_local x
B_global) instead of O(B_global^2), as the paper does. Arguments are explicit (open_clip's shape);
nothing here reads global distributed state except through the process group it is handed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient for this rank's slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, world_size: int, rank: int, group) -> torch.Tensor:  # type: ignore[override]
        ctx.world_size, ctx.rank, ctx.group = world_size, rank, group
        out = torch.empty((world_size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        dist.all_gather_into_tensor(out, tensor.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        local = grad.shape[0] // ctx.world_size
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = torch.empty((local, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
        else:  # gloo has no reduce_scatter: all_reduce the (small) feature gradient and slice
            dist.all_reduce(grad, group=ctx.group)
            out = grad[ctx.rank * local:(ctx.rank + 1) * local].clone()
        return out, None, None, None


def gather_features(features: torch.Tensor, rank: int, world_size: int, with_grad: bool = True,
                    group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate ``features`` from all ranks in rank order.

    ``with_grad=False`` gathers without a backward collective; the local slice is put back in
    so gradients still reach this rank's own features (open_clip's non-grad gather).
    """
    if world_size == 1:
        return features
    if with_grad:
        return _GatherWithGrad.apply(features, world_size, rank, group)
    gathered = [torch.empty_like(features) for _ in range(world_size)]
    dist.all_gather(gathered, features.contiguous(), group=group)
    gathered[rank] = features
    return torch.cat(gathered, dim=0)


class ClipLoss(nn.Module):
    """Symmetric cross-entropy over ``logit_scale * cos(image, text)``, image->text and text->image."""

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True, rank: int = 0,
                 world_size: int = 1, group: dist.ProcessGroup | None = None):
        super().__init__()
        if world_size > 1 and local_loss and not gather_with_grad:
            # Without gradients through the gather, local rows miss the other ranks' terms.
            raise ValueError("local_loss=True needs gather_with_grad=True for correct gradients")
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.rank, self.world_size, self.group = rank, world_size, group

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor,
               logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image, logits_per_text): this rank's rows, or all rows without local_loss."""
        if self.world_size == 1:
            per_image = logit_scale * image_features @ text_features.T
            return per_image, per_image.T
        all_image = gather_features(image_features, self.rank, self.world_size, self.gather_with_grad, self.group)
        all_text = gather_features(text_features, self.rank, self.world_size, self.gather_with_grad, self.group)
        if self.local_loss:
            return logit_scale * image_features @ all_text.T, logit_scale * text_features @ all_image.T
        per_image = logit_scale * all_image @ all_text.T
        return per_image, per_image.T

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        per_image, per_text = self.logits(image_features, text_features, logit_scale)
        labels = torch.arange(per_image.shape[0], device=per_image.device)
        if self.world_size > 1 and self.local_loss:
            labels = labels + per_image.shape[0] * self.rank  # the positives sit in this rank's block
        return (F.cross_entropy(per_image.float(), labels) + F.cross_entropy(per_text.float(), labels)) / 2
