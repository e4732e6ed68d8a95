"""Verification of candidate copy pairs for decontamination: geometric alignment, then a structure
score and a colour check (why each piece is there: :mod:`tasks.dedup.copy_detect`).

Kept apart from the features because it runs on torch: only the workers that verify pairs import it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tasks.dedup.align import align, corner_mask, erode, masked_znorm, warp
from tasks.dedup.copy_detect import DEFAULT_MAX_HUE_SHIFT, SIDE, grey

EDGE_BAND = 2  # pixels along the aligned edge left out of the comparison (see align.warp)
MIN_COVERAGE = 0.5  # share of the candidate's pixels the aligned eval image must cover
SCALE_RANGE = (0.85, 1.05)  # sqrt(det) of the alignment's linear part
MAX_ANISOTROPY = 1.3  # ratio of its singular values
_CHROMA_MIN = 0.2  # saturation and value above which a pixel's hue means something
_COLOURED_SHARE = 0.05  # share of coloured pixels above which an image counts as coloured
_SAT_RATIO_MAX = 2.5  # saturation jitter is ×0.6–1.4: a larger ratio is a recolouring
_V_SCALE = 8.0  # grey levels: channel weights ramp up to 1 at this std
_S_SCALE = 0.05
_FG_LEVEL = 24.0  # grey levels from the background: inside the object
_INTERIOR_SCALE = 8.0  # grey levels: the interior term counts fully once its std reaches this
_INTERIOR_MIN_PIXELS = 24


def _hsv(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, 3, P) RGB in [0, 255] → hue (radians), saturation [0, 1], value [0, 1]."""
    r, g, b = rgb[:, 0] / 255.0, rgb[:, 1] / 255.0, rgb[:, 2] / 255.0
    v = torch.maximum(torch.maximum(r, g), b)
    c = v - torch.minimum(torch.minimum(r, g), b)
    s = torch.where(v > 0, c / v.clamp(min=1e-6), torch.zeros_like(v))
    hue = torch.atan2(np.sqrt(3.0) * (g - b), 2 * r - g - b)  # the hexcone's angle, continuous
    return hue, s, v


@dataclass
class Verification:
    """Per pair: the decision's inputs and the decision."""

    score: np.ndarray  # structure after alignment: min(whole-image V/S correlation, interior); −1: not comparable
    whole: np.ndarray  # the V/S correlation over the whole aligned overlap
    interior: np.ndarray  # grey correlation inside the object (1 where its interior is flat)
    hue_shift: np.ndarray  # circular mean hue difference, fraction of the circle (0 when not coloured)
    colour_ok: np.ndarray  # bool: colours consistent with jitter (or too little colour to tell)
    params: np.ndarray  # (N, 6) the alignment


def _common_detail(x: torch.Tensor, sides: np.ndarray | None) -> torch.Tensor:
    """(N, C, S·S) thumbnails reduced to each pair's common detail: area-down to ``side`` px and back."""
    if sides is None:
        return x
    n, c, _ = x.shape
    x = x.reshape(n, c, SIDE, SIDE)
    out = x.clone()
    for side in np.unique(sides[(sides > 0) & (sides < SIDE)]):
        m = torch.as_tensor(sides == side)
        small = F.interpolate(x[m], size=(int(side), int(side)), mode="area")
        out[m] = F.interpolate(small, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    return out.reshape(n, c, -1)


def _ncc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked correlation of rows of a and b, and the smaller of their masked stds."""
    za, sda = masked_znorm(a, mask)
    zb, sdb = masked_znorm(b, mask)
    return (za * zb).sum(-1) / mask.sum(-1).clamp(min=1), torch.minimum(sda, sdb)[:, 0]


def _whole(c_rgb: torch.Tensor, e_rgb: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """V and S correlation, each channel weighted by how much it varies (−1 if neither does)."""
    _, sc, vc = _hsv(c_rgb)
    _, se, ve = _hsv(e_rgb)
    total, weight = torch.zeros(len(inside)), torch.zeros(len(inside))
    for a, b, scale in ((vc, ve, _V_SCALE / 255.0), (sc, se, _S_SCALE)):
        ncc, sd = _ncc(a, b, inside)
        w = (sd / scale).clamp(max=1.0)
        total, weight = total + w * ncc, weight + w
    return torch.where(weight > 0.05, total / weight.clamp(min=1e-6), torch.full_like(total, -1.0))


def _interior(g_c: torch.Tensor, g_e: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Grey correlation over the pixels inside the object in both images (away from its outline):
    the object's own shading, which a copy keeps and a look-alike of the same silhouette does not.
    Weighted towards 1 when that interior is flat (a flat fill says nothing)."""
    ring = torch.ones(SIDE, SIDE, dtype=torch.bool)
    ring[2:-2, 2:-2] = False
    background = g_e[:, ring.reshape(-1)].median(-1).values[:, None]
    fg = (((g_e - background).abs() > _FG_LEVEL) & ((g_c - background).abs() > _FG_LEVEL)).float()
    fg = erode(fg, SIDE, 1) * inside
    ncc, sd = _ncc(g_c, g_e, fg)
    w = (sd / _INTERIOR_SCALE).clamp(max=1.0) * (fg.sum(-1) >= _INTERIOR_MIN_PIXELS).float()
    return w * ncc + (1 - w)


def _colour_ok(c_rgb: torch.Tensor, e_rgb: torch.Tensor, inside: torch.Tensor, max_hue_shift: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(consistent with colour jitter, mean hue shift as a fraction of the circle) per pair."""
    hc, sc, vc = _hsv(c_rgb)
    he, se, ve = _hsv(e_rgb)
    coloured_c = ((sc > _CHROMA_MIN) & (vc > _CHROMA_MIN)).float() * inside
    coloured_e = ((se > _CHROMA_MIN) & (ve > _CHROMA_MIN)).float() * inside
    both = coloured_c * coloured_e
    dh = hc - he
    mean_dh = torch.atan2((torch.sin(dh) * both).sum(-1), (torch.cos(dh) * both).sum(-1))
    hue = torch.where(both.sum(-1) > 0, mean_dh.abs() / (2 * np.pi), torch.zeros(len(inside)))
    cover = inside.sum(-1).clamp(min=1)
    coloured = torch.maximum(coloured_c.sum(-1), coloured_e.sum(-1)) / cover > _COLOURED_SHARE
    sat_c, sat_e = (sc * inside).sum(-1) / cover, (se * inside).sum(-1) / cover
    ratio = torch.maximum(sat_c, sat_e) / torch.minimum(sat_c, sat_e).clamp(min=1e-3)
    return ~coloured | ((ratio <= _SAT_RATIO_MAX) & (hue <= max_hue_shift)), hue


def plausible(params: torch.Tensor) -> torch.Tensor:
    """Whether each alignment is a transform the copy families make: an overall scale of
    ``SCALE_RANGE`` (a crop keeps ≥ 90% of a side) and axes stretched apart by at most
    ``MAX_ANISOTROPY`` (a crop's two sides, or a rotation of a non-square image seen squashed).
    A fit that squeezes one drawing into another's silhouette (a heart into a box) is not."""
    a, b, c, d = 1 + params[:, 2], params[:, 3], params[:, 4], 1 + params[:, 5]
    det = (a * d - b * c).abs()
    frob = a * a + b * b + c * c + d * d
    disc = (frob * frob - 4 * det * det).clamp(min=0).sqrt()
    s_max, s_min = ((frob + disc) / 2).sqrt(), ((frob - disc) / 2).clamp(min=1e-12).sqrt()
    scale = det.sqrt()
    return (scale >= SCALE_RANGE[0]) & (scale <= SCALE_RANGE[1]) & (s_max / s_min <= MAX_ANISOTROPY)


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    return rgb[:, 0] * 0.299 + rgb[:, 1] * 0.587 + rgb[:, 2] * 0.114


def verify(cand: np.ndarray, ev: np.ndarray, *, sides: np.ndarray | None = None,
           max_hue_shift: float = DEFAULT_MAX_HUE_SHIFT) -> Verification:
    """Align each candidate thumbnail (N, S, S, 3) onto its eval thumbnail and score the pair.

    ``sides`` (per pair, the smaller of the two images' shorter sides) reduces both thumbnails to
    the detail the smaller image can hold: a 0.4× copy of a 28-px image keeps 11 px of it."""
    n = len(cand)
    if n == 0:
        z = np.zeros(0, np.float32)
        return Verification(z, z, z, z, np.zeros(0, bool), np.zeros((0, 6), np.float32))
    with torch.no_grad():
        params = align(grey(cand), grey(ev))
        c_rgb = torch.as_tensor(np.ascontiguousarray(cand.transpose(0, 3, 1, 2)), dtype=torch.float32).reshape(n, 3, -1)
        e_full = torch.as_tensor(np.ascontiguousarray(ev.transpose(0, 3, 1, 2)), dtype=torch.float32)
        sides = None if sides is None else np.asarray(sides)
        c_rgb = _common_detail(c_rgb, sides)
        best = None
        # The fit, and the identity: a copy that was never moved (colour jitter, JPEG) must not
        # lose to a fit that drifted on a flat drawing.
        for p in (params, torch.zeros_like(params)):
            e_rgb, inside = warp(e_full, p, SIDE, margin=EDGE_BAND)
            inside = inside * corner_mask(SIDE, SIDE)
            e_rgb = _common_detail(e_rgb, sides)
            whole = _whole(c_rgb, e_rgb, inside)
            interior = _interior(_luma(c_rgb), _luma(e_rgb), inside)
            comparable = (inside.mean(-1) >= MIN_COVERAGE) & plausible(p)
            score = torch.where(comparable & (whole > -1), torch.minimum(whole, interior), torch.full_like(whole, -1.0))
            colour_ok, hue = _colour_ok(c_rgb, e_rgb, inside, max_hue_shift)
            if best is None:
                best = [score, whole, interior, hue, colour_ok, p]
            else:
                better = score > best[0]
                for i, new in enumerate((score, whole, interior, hue, colour_ok, p)):
                    best[i] = torch.where(better[:, None] if new.dim() == 2 else better, new, best[i])
        score, whole, interior, hue, colour_ok, params = best
    return Verification(score.numpy().astype(np.float32), whole.numpy().astype(np.float32),
                        interior.numpy().astype(np.float32), hue.numpy().astype(np.float32),
                        colour_ok.numpy(), params.numpy())
