"""Affine alignment of thumbnail pairs: Gauss–Newton (Lucas–Kanade) on a coarse-to-fine pyramid.

Why: a crop + zoom, a small rotation or an aspect change moves every pixel of a copy, so a pixel
check without alignment rejects most such copies (the old NCC ≥ 0.98 check found 10% of 3–10%
crops). The copy families are near the identity (≤10% scale and shift, ≤8° rotation), so
Gauss–Newton from the identity converges on a blurred pyramid (8 → 16 → 32 px). Thumbnails are
square (aspect is squashed away before), so the warp is a full 6-parameter affine map.

The residual is between zero-mean, unit-variance views over the pixels both images cover (an
ECC-style photometric normalisation: brightness and contrast changes do not move the fit).
Batched in torch (``grid_sample``): thousands of pairs per call, one thread.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# (downsampling factor, blur sigma at that level, Gauss–Newton iterations)
SCHEDULE: tuple[tuple[int, float, int], ...] = ((4, 1.0, 6), (2, 0.7, 4), (1, 0.0, 2))
CORNER_LEG = 6.0  # px at the full side: an 8° rotation of a square leaves corner legs of ~4.5 of 32
ROTATION_STARTS: tuple[float, ...] = (6.0,)  # degrees, tried both ways beside the identity
_ROBUST_SCALE = 1.0  # z-scored residual at which a pixel's weight halves
_UNRELATED = float(np.log1p(2.0))  # robust cost of a pixel with nothing to compare to
_MAX_SHIFT = 0.25  # of the side: farther than any copy family moves
_MAX_LINEAR = 0.2  # |a_ij - δ_ij|: rotations ≤ ~11°, scales 0.8–1.2 (the families: ≤ 8°, ≥ 0.9)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if not sigma:
        return x
    r = int(np.ceil(2.5 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _centred_grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return (xs - (w - 1) / 2).reshape(1, -1), (ys - (h - 1) / 2).reshape(1, -1)


_BASE: dict[tuple[int, int], torch.Tensor] = {}


def _base_grid(h: int, w: int) -> torch.Tensor:
    """(h·w, 3) homogeneous normalised coordinates (align_corners=True), cached per size."""
    if (h, w) not in _BASE:
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        _BASE[(h, w)] = torch.stack([xs.reshape(-1), ys.reshape(-1), torch.ones(h * w)], 1)
    return _BASE[(h, w)]


def warp(images: torch.Tensor, params: torch.Tensor, full_side: int, margin: float = 0.0
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``images`` (N, C, h, w) at the warped grid: x_eval = A·x_cand + t (centred pixel
    coordinates; ``params`` = (tx, ty) in full-resolution pixels, then A − I row-major).
    Returns the samples (N, C, h·w) and which of them fall at least ``margin`` pixels (at this
    level) inside the image (N, h·w): the band along the edge is interpolated with whatever filled
    it (a rotation's corners), so callers leave it out."""
    n, c, h, w = images.shape
    f = full_side / w
    cx, cy = (w - 1) / 2, (h - 1) / 2
    p = params
    theta = torch.stack([
        torch.stack([1 + p[:, 2], p[:, 3] * cy / cx, p[:, 0] / f / cx], 1),
        torch.stack([p[:, 4] * cx / cy, 1 + p[:, 5], p[:, 1] / f / cy], 1)], 1)
    grid = (_base_grid(h, w) @ theta.transpose(1, 2)).reshape(n, h, w, 2)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    limit = torch.tensor([1.0 - margin / cx, 1.0 - margin / cy])
    inside = (grid.abs() <= limit).all(-1).reshape(n, -1).to(torch.float32)
    return out.reshape(n, c, -1), inside


def masked_znorm(v: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v − mean) / std over the masked pixels of each row (zero outside); and the std."""
    n = mask.sum(-1, keepdim=True).clamp(min=1)
    mu = (v * mask).sum(-1, keepdim=True) / n
    d = (v - mu) * mask
    sd = ((d * d).sum(-1, keepdim=True) / n).sqrt()
    return d / sd.clamp(min=1e-3), sd


def erode(mask: torch.Tensor, side: int, pixels: int) -> torch.Tensor:
    """(N, side²) 0/1 mask shrunk by ``pixels``: the band along a copy's edge is interpolated with
    whatever filled it (a rotation's corners), so it is left out of every comparison."""
    if pixels <= 0:
        return mask
    m = mask.reshape(-1, 1, side, side)
    k = 2 * pixels + 1
    return (-F.max_pool2d(-m, k, stride=1, padding=pixels)).reshape(mask.shape)


def corner_mask(side: int, full_side: int) -> torch.Tensor:
    """(1, side²) 0/1: 0 in the four corner triangles a rotated copy fills with a constant colour
    (legs ``CORNER_LEG`` px at the full side), which carry nothing to compare."""
    leg = CORNER_LEG * side / full_side
    xs, ys = _centred_grid(side, side)
    half = (side - 1) / 2
    return (((half - xs.abs()) + (half - ys.abs())) >= leg).to(torch.float32)


def _rotation_init(n: int, degrees: float) -> torch.Tensor:
    a = np.deg2rad(degrees)
    p = torch.zeros(n, 6)
    p[:, 2], p[:, 3], p[:, 4], p[:, 5] = np.cos(a) - 1, -np.sin(a), np.sin(a), np.cos(a) - 1
    return p


def _level(c_full: torch.Tensor, e_full: torch.Tensor, factor: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    c = _blur(F.avg_pool2d(c_full, factor) if factor > 1 else c_full, sigma)
    e = _blur(F.avg_pool2d(e_full, factor) if factor > 1 else e_full, sigma)
    return c, e


def _gauss_newton(c: torch.Tensor, e: torch.Tensor, p: torch.Tensor, factor: int, side: int, iters: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``iters`` Gauss–Newton steps at one pyramid level; the parameters and the last residual energy."""
    n = c.shape[0]
    gy, gx = torch.gradient(e[:, 0], dim=(1, 2))
    stack = torch.cat([e, gx[:, None], gy[:, None]], 1)
    xs, ys = _centred_grid(*c.shape[2:])
    corners = corner_mask(c.shape[-1], side)
    c_flat = c.reshape(n, -1)
    damping = 1e-3 * torch.eye(6)[None]
    energy = torch.full((n,), float("inf"))
    for _ in range(iters):
        sampled, inside = warp(stack, p, side, margin=1.0)
        inside = inside * corners
        ew, gxw, gyw = sampled[:, 0], sampled[:, 1], sampled[:, 2]
        cn, _ = masked_znorm(c_flat, inside)
        en, sd = masked_znorm(ew, inside)
        residual = (en - cn) * inside
        # Cauchy (IRLS) weights: a rotated copy's filled corners are gross outliers that would drag
        # a least-squares fit; pixels the eval image does not cover count as unrelated (otherwise a
        # warp that zooms into a flat corner would fit "best").
        r2 = (residual / _ROBUST_SCALE) ** 2
        energy = (torch.log1p(r2).sum(-1) + _UNRELATED * (1.0 - inside).sum(-1)) / inside.shape[-1]
        w = inside / (1.0 + r2)
        s = (inside / sd.clamp(min=1e-3))[..., None]
        jac = torch.stack([gxw / factor, gyw / factor, gxw * xs, gxw * ys, gyw * xs, gyw * ys], -1) * s
        jt = (jac * w[..., None]).transpose(1, 2)
        hess = jt @ jac
        hess = hess + damping * (1.0 + hess.diagonal(dim1=1, dim2=2).mean(-1))[:, None, None]
        step, info = torch.linalg.solve_ex(hess, jt @ residual[..., None])
        step = torch.where((info == 0)[:, None], torch.nan_to_num(step[..., 0]), torch.zeros_like(p))
        p = p - step
        p[:, :2] = p[:, :2].clamp(-_MAX_SHIFT * side, _MAX_SHIFT * side)
        p[:, 2:] = p[:, 2:].clamp(-_MAX_LINEAR, _MAX_LINEAR)
    return p, energy


def align(cand: np.ndarray, ev: np.ndarray) -> torch.Tensor:
    """Affine parameters (N, 6) mapping each candidate thumbnail onto its eval thumbnail.

    ``cand`` and ``ev`` are (N, S, S) grey thumbnails (S divisible by 4). The coarsest level starts
    from the identity and from ±``ROTATION_STARTS`` degrees and keeps the start that fits best:
    flat clip art with a rotated copy's filled corners can pull a single start the wrong way."""
    c_full = torch.as_tensor(np.ascontiguousarray(cand), dtype=torch.float32)[:, None]
    e_full = torch.as_tensor(np.ascontiguousarray(ev), dtype=torch.float32)[:, None]
    n, _, _, side = c_full.shape
    if n == 0:
        return torch.zeros(0, 6)
    (factor, sigma, iters), rest = SCHEDULE[0], SCHEDULE[1:]
    c, e = _level(c_full, e_full, factor, sigma)
    best_p, best_energy = None, None
    for degrees in (0.0, *ROTATION_STARTS, *(-d for d in ROTATION_STARTS)):
        p, energy = _gauss_newton(c, e, _rotation_init(n, degrees), factor, side, iters)
        if best_p is None:
            best_p, best_energy = p, energy
        else:
            better = energy < best_energy
            best_p = torch.where(better[:, None], p, best_p)
            best_energy = torch.where(better, energy, best_energy)
    p = best_p
    for factor, sigma, iters in rest:
        c, e = _level(c_full, e_full, factor, sigma)
        p, _ = _gauss_newton(c, e, p, factor, side, iters)
    return p
