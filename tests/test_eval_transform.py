"""The eval transform against OpenCLIP's own ``image_transform(size, is_train=False)``.

OpenCLIP's transform module and torchvision's transforms are pure Python over PIL, but PyPI's
torchvision cannot be imported beside this torch (its C extension is built for another one). So a
subprocess imports them from where they ship, unmodified: ``torchvision/transforms`` and
``torchvision/utils.py`` from the torchvision wheel that infra/setup.sh downloads into
``.venv/wheels`` (no C extension loaded), and ``open_clip/{transform,constants,utils}.py`` from
the installed open_clip_torch, under empty package ``__init__`` files. The one stand-in is
``torchvision.ops.misc.FrozenBatchNorm2d``, which open_clip's utils imports and no transform uses.
The subprocess writes OpenCLIP's tensors; this test compares ours with them exactly.
"""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data import CLIP_STD, ImageTransform, eval_image, shortest_side_size

REPO_ROOT = Path(__file__).resolve().parent.parent
WHEELS = REPO_ROOT / ".venv" / "wheels"
SIZES = (224, 32)
# Non-square on purpose (both orientations, odd differences, fractional ratios), plus square,
# one side already at the size, and images smaller than the size (upscaled).
SHAPES = [(640, 480), (480, 640), (300, 200), (225, 224), (224, 225), (1000, 333), (333, 1000), (37, 91),
          (91, 37), (257, 129), (129, 257), (500, 377), (377, 500), (20, 30), (31, 17), (224, 224), (64, 64),
          (800, 223), (223, 800), (101, 99)]

_REFERENCE = r'''
import io, sys
import numpy as np
from PIL import Image
root, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
from open_clip.transform import image_transform
data = np.load(out + ".in.npz", allow_pickle=True)
result = {}
for size in (int(s) for s in data["sizes"]):
    transform = image_transform(size, is_train=False)
    result[str(size)] = np.stack([transform(Image.open(io.BytesIO(bytes(b)))).numpy() for b in data["images"]])
np.savez(out, **result)
'''


def _reference_tree(tmp: Path) -> Path:
    """torchvision's transforms (from the wheel) and open_clip's transform module, importable."""
    wheels = sorted(WHEELS.glob("torchvision-*.whl"))
    if not wheels:
        pytest.skip(f"no torchvision wheel in {WHEELS}: infra/setup.sh downloads it (pip download --no-deps)")
    root = tmp / "reference"
    with zipfile.ZipFile(wheels[-1]) as wheel:
        for name in wheel.namelist():
            if name.startswith("torchvision/transforms/") or name == "torchvision/utils.py":
                wheel.extract(name, root)
    (root / "torchvision" / "__init__.py").write_text("")  # the real one loads the C extension
    (root / "torchvision" / "ops").mkdir()
    (root / "torchvision" / "ops" / "__init__.py").write_text("")
    (root / "torchvision" / "ops" / "misc.py").write_text("FrozenBatchNorm2d = None  # unused by transforms\n")
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed (infra/setup.sh installs it --no-deps)")
    installed = Path(list(spec.submodule_search_locations)[0])
    (root / "open_clip").mkdir()
    (root / "open_clip" / "__init__.py").write_text("")
    for name in ("transform.py", "constants.py", "utils.py"):
        (root / "open_clip" / name).write_bytes((installed / name).read_bytes())
    return root


REAL_IMAGES = 40  # non-square drawings of the bundled Openclipart sample, in each mode


def _encoded(pixels: np.ndarray) -> list[tuple[str, bytes]]:
    """The RGB ``pixels`` as RGB and L PNGs and as a CMYK TIFF (K from the red channel)."""
    out = []
    rgb = Image.fromarray(pixels, "RGB")
    for mode, image, fmt in (("RGB", rgb, "PNG"), ("L", rgb.convert("L"), "PNG"),
                             ("CMYK", Image.fromarray(np.concatenate([pixels, pixels[..., :1]], -1), "CMYK"), "TIFF")):
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        out.append((mode, buf.getvalue()))
    return out


def _images(sample_parquet: Path) -> list[tuple[str, bytes]]:
    """(mode, encoded bytes) of every synthetic shape (smooth + noisy) and of real drawings."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    out = []
    for width, height in SHAPES:
        y, x = np.mgrid[0:height, 0:width]
        smooth = np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)),
                           ((x + y) * 127 // max(1, width + height - 2))], axis=-1)
        noise = rng.integers(0, 256, size=(height, width, 3))
        out += _encoded(np.where(rng.random((height, width, 1)) < 0.3, noise, smooth).astype(np.uint8))
    table = pq.read_table(sample_parquet, columns=["image", "width", "height"]).to_pylist()
    real = [r["image"] for r in table if r["width"] != r["height"]][:REAL_IMAGES]
    for data in real:
        out += _encoded(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return out


def test_shortest_side_size_follows_torchvision_rule() -> None:
    assert shortest_side_size(640, 480, 224) == (298, 224)  # int(224 * 640 / 480) = 298
    assert shortest_side_size(480, 640, 224) == (224, 298)
    assert shortest_side_size(1000, 333, 224) == (672, 224)  # truncated, not rounded (672.67)
    assert shortest_side_size(224, 224, 224) == (224, 224)


def test_eval_image_keeps_rgb_l_cmyk_and_composites_alpha_on_white() -> None:
    for mode in ("RGB", "L", "CMYK"):
        buf = io.BytesIO()
        Image.new(mode, (5, 3)).save(buf, format="TIFF")
        assert eval_image(buf.getvalue()).mode == mode
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    decoded = eval_image(buf.getvalue())
    assert decoded.mode == "RGB" and decoded.getpixel((1, 1)) == (255, 255, 255)


def test_eval_transform_equals_openclip_on_rgb_l_cmyk(tmp_path: Path, sample_parquet: Path) -> None:
    root = _reference_tree(tmp_path)
    images = _images(sample_parquet)
    out = tmp_path / "reference"
    np.savez(str(out) + ".in.npz", sizes=np.array(SIZES), images=np.array([b for _, b in images], dtype=object))
    script = tmp_path / "reference.py"
    script.write_text(_REFERENCE)
    subprocess.run([sys.executable, str(script), str(root), str(out)], check=True, timeout=600)
    reference = np.load(str(out) + ".npz")
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    for size in SIZES:
        transform = ImageTransform(size, train=False)
        ours = torch.stack([transform(eval_image(b)) for _, b in images])
        theirs = torch.from_numpy(reference[str(size)])
        assert ours.shape == theirs.shape == (len(images), 3, size, size)
        levels = ((ours - theirs).abs() * std * 255).amax(dim=(1, 2, 3))
        for mode in ("RGB", "L", "CMYK"):
            rows = [i for i, (m, b) in enumerate(images) if m == mode and _is_non_square(b)]
            worst = float(levels[rows].max())
            print(f"eval transform vs OpenCLIP image_transform({size}, is_train=False): {mode}: "
                  f"{len(rows)} non-square images, max difference {worst:.6f} levels")
        assert torch.equal(ours, theirs), f"size {size}: max difference {float(levels.max()):.4f} levels"


def _is_non_square(data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as im:
        return im.width != im.height


def test_eval_transform_differs_from_a_fractional_box_resize() -> None:
    """The old eval path (resample the centred square from a fractional box) is not what OpenCLIP does:
    the test above would catch a regression to it."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8), "RGB")
    side, left = 480, (640 - 480) / 2
    boxed = image.resize((224, 224), Image.Resampling.BICUBIC, box=(left, 0, left + side, side))
    ours = ImageTransform(224, train=False).eval_pixels(image)
    assert np.asarray(ours).shape == np.asarray(boxed).shape
    assert not np.array_equal(np.asarray(ours), np.asarray(boxed))
