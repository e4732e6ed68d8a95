"""trainer.loss: symmetric CLIP loss; the 2-process sharded loss equals the 1-process loss."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from trainer.loss import ClipLoss

BATCH, DIM, WORLD = 8, 16, 2


def _features(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(BATCH, DIM, generator=generator), dim=-1)
    text = F.normalize(torch.randn(BATCH, DIM, generator=generator), dim=-1)
    return image, text, torch.tensor([1 / 0.07])


def test_single_process_loss_is_symmetric_cross_entropy():
    image, text, scale = _features()
    logits = scale * image @ text.T
    labels = torch.arange(BATCH)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(ClipLoss()(image, text, scale), expected)
    # Matching pairs give a lower loss than shuffled ones.
    assert ClipLoss()(image, image, scale) < ClipLoss()(image, text, scale)
    with pytest.raises(ValueError, match="gather_with_grad"):
        ClipLoss(local_loss=True, gather_with_grad=False, rank=0, world_size=2)


def _rank_main(rank: int, port: int, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        for local_loss in (True, False):
            image, text, scale = _features()
            rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
            local_image = image[rows].clone().requires_grad_(True)
            local_text = text[rows].clone().requires_grad_(True)
            local_scale = scale.clone().requires_grad_(True)
            loss = ClipLoss(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=WORLD)(
                local_image, local_text, local_scale)
            loss.backward()
            results[(local_loss, rank)] = (loss.item(), local_image.grad, local_text.grad, local_scale.grad)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results() -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.start_processes(_rank_main, args=(port, results), nprocs=WORLD, start_method="spawn")
    return dict(results)


@pytest.mark.parametrize("local_loss", [True, False])
def test_two_process_gloo_loss_and_gradients_equal_single_process(two_process_results, local_loss):
    results = {rank: two_process_results[(local_loss, rank)] for rank in range(WORLD)}
    image, text, scale = _features()
    image.requires_grad_(True)
    text.requires_grad_(True)
    scale.requires_grad_(True)
    full = ClipLoss()(image, text, scale)
    full.backward()
    # Data-parallel training averages the ranks' losses and gradients: check exactly that.
    assert math.isclose(sum(results[r][0] for r in range(WORLD)) / WORLD, full.item(), rel_tol=1e-6)
    if local_loss:  # each rank only has its own rows, so the rank losses differ
        assert results[0][0] != pytest.approx(results[1][0])
    gathered_image = torch.cat([results[r][1] for r in range(WORLD)]) / WORLD
    gathered_text = torch.cat([results[r][2] for r in range(WORLD)]) / WORLD
    assert torch.allclose(gathered_image, image.grad, atol=1e-6)
    assert torch.allclose(gathered_text, text.grad, atol=1e-6)
    assert torch.allclose(sum(results[r][3] for r in range(WORLD)) / WORLD, scale.grad, atol=1e-6)
