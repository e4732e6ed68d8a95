"""Two shortcuts in DeepSpeed's ZeRO stage 1/2 optimizer, set on one engine's optimizer instance.

What ZeRO-2 adds to a CPU step over a plain PyTorch loop (bench/train.py, profiled) is mostly two
pieces of DeepSpeed's ``DeepSpeedZeroOptimizer`` that cost far more than the maths they do:

* **The gradient norm** (``get_grad_norm_direct``): a Python loop that copies every gradient to
  fp64 and takes its norm, one tensor at a time (130 ``.to()`` and 65 norms a step for the tiny
  model). The shortcut takes the per-tensor norms as ``torch.nn.utils.clip_grad_norm_`` does, in one
  ``torch._foreach_norm`` in fp32, and sums their squares in fp64. The norm moves by float rounding
  (about 1e-6 of it; tests/test_train.py) and only where clipping bites does that reach the weights.
  Any world size; model-parallel or pipeline-replicated parameters keep DeepSpeed's own loop.
* **The reduction over one rank** (``allreduce_and_copy``): flatten the bucket, divide it by 1,
  all-reduce it over a group of one, copy it back into every gradient: the identity, paid in full.
  The shortcut skips it when the group has one rank, the bucket is already in the communication
  dtype and there is no overlap stream or sequence parallelism; the gradients are bit for bit the
  ones DeepSpeed would leave. Otherwise DeepSpeed's own code runs.

Each shortcut wraps the bound method it replaces and calls it for any case it does not cover. They
are set only on the DeepSpeed versions they were checked against (:data:`CHECKED_DEEPSPEED`), and
only when the methods still have the signatures checked; otherwise DeepSpeed runs as it is and
:func:`speed_up_zero_optimizer` says why. ``train.zero_shortcuts: false`` turns both off.
"""

from __future__ import annotations

import inspect
import types
from typing import Any, Callable

import torch

# DeepSpeed releases whose stage_1_and_2.py these shortcuts were read against and tested with.
CHECKED_DEEPSPEED = ("0.19.",)
NORM, REDUCTION = "grad_norm", "one_rank_reduction"
_NORM_ARGS = ("gradients", "params", "norm_type")
_REDUCTION_ARGS = ("small_bucket", "communication_data_type", "rank", "log", "divide", "process_group",
                   "output_bucket")


def speed_up_zero_optimizer(optimizer: Any, deepspeed_version: str, *, norm: bool = True,
                            reduction: bool = True) -> tuple[tuple[str, ...], str | None]:
    """Set the shortcuts on ``optimizer`` (a ``DeepSpeedZeroOptimizer``, ZeRO stage 1 or 2).

    Returns the shortcuts set and, when one asked for was not set, the reason (one line)."""
    if not deepspeed_version.startswith(CHECKED_DEEPSPEED):
        return (), f"DeepSpeed {deepspeed_version} is not a checked version ({', '.join(CHECKED_DEEPSPEED)}x)"
    wanted = {NORM: (norm, "get_grad_norm_direct", _NORM_ARGS, _foreach_grad_norm),
              REDUCTION: (reduction, "allreduce_and_copy", _REDUCTION_ARGS, _skip_one_rank_reduction)}
    done, refused = [], []
    for name, (asked, method, args, shortcut) in wanted.items():
        if not asked:
            continue
        original = getattr(optimizer, method, None)
        if original is None or tuple(inspect.signature(original).parameters) != args:
            refused.append(f"{type(optimizer).__name__}.{method} is not the method checked")
            continue
        setattr(optimizer, method, types.MethodType(_wrap(shortcut, original), optimizer))
        done.append(name)
    return tuple(done), "; ".join(refused) or None


def _wrap(shortcut: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return shortcut(self, original, *args, **kwargs)
    method.__doc__ = f"{shortcut.__doc__} (falls back to DeepSpeed's {original.__name__})"
    return method


def _foreach_grad_norm(self: Any, original: Callable[..., Any], gradients: list[torch.Tensor],
                       params: list[torch.Tensor], norm_type: float = 2) -> torch.Tensor:
    """The L2 norm of ``gradients`` over the data-parallel group, per-tensor norms in one foreach call."""
    from deepspeed import comm as dist
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace

    if (float(norm_type) != 2.0 or self.model_parallel_group is not None
            or any(getattr(p, "ds_pipe_replicated", False) for p in params)):
        return original(gradients, params, norm_type)
    grads = [g.detach() for g in gradients if not getattr(g, "_zero_padding", False)]
    if grads:
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
        total = torch.stack(norms).double().pow(2).sum().float()
    else:
        total = torch.zeros((), dtype=torch.float32, device=self.device)
    if dist.get_world_size(group=self.dp_process_group) > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    total = total.sqrt()
    mask_nan_or_inf_with_val_inplace(total, device=self.device)
    return total


def _skip_one_rank_reduction(self: Any, original: Callable[..., Any], small_bucket: list[torch.Tensor],
                             communication_data_type: torch.dtype, rank: int | None = None, log: Any = None,
                             divide: bool = True, process_group: Any = None, output_bucket: list | None = None) -> None:
    """Reduce a bucket of gradients: nothing to do over a group of one rank."""
    from deepspeed import comm as dist
    from deepspeed.runtime.zero import stage_1_and_2

    group = self.dp_process_group if process_group is None else process_group
    if (dist.get_world_size(group=group) != 1 or self.overlap_comm or self.sequence_parallel_size > 1
            or stage_1_and_2.pg_correctness_test or any(t.dtype != communication_data_type for t in small_bucket)):
        return original(small_bucket, communication_data_type, rank=rank, log=log, divide=divide,
                        process_group=process_group, output_bucket=output_bucket)
    for grad, output in zip(small_bucket, output_bucket or [None] * len(small_bucket)):
        self._add_to_grad_partition_buffer(output, grad)  # what DeepSpeed does with the reduced copy
    return None
