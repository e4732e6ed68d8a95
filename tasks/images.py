"""Images: decode, validate, convert to RGB, resize and re-encode; one row at a time, never fatal.

Drop reasons (funnel stage ``images``): ``no_image`` (null), ``empty_image`` (zero bytes),
``not_image`` (unidentifiable, e.g. HTML served as an image), ``disallowed_format`` (an image format
outside ``allowed_formats``), ``decompression_bomb`` (declared pixels above ``max_pixels``, checked
from the header before any pixel is decoded), ``truncated_image``, ``corrupt_image``, ``too_small``
(shorter side below ``min_side``), ``bad_aspect_ratio``, ``unsupported_mode``, ``image_error``
(anything else). ``assemble_image_results`` returns the rejected rows too; tasks/gather.py's
``gather_images`` is the step that runs this module on every row.

Kept rows get ``image`` (final bytes), ``image_format``, ``width``, ``height`` (after EXIF
orientation and resizing), ``image_bytes`` and ``sha256`` (hex, of the final bytes). Re-encoded
images carry no metadata (EXIF, incl. GPS, is dropped once its orientation has been applied).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageOps, UnidentifiedImageError

from infra.config import ImageConfig
from infra.funnel import Funnel
from infra.imaging import to_rgb
from infra.log import get_logger, log_event

STAGE = "images"
_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that transpose width and height
_KEEPABLE_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
# Magic numbers: a payload that starts like an image but will not parse is corrupt, not "not an image".
_IMAGE_SIGNATURES = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF", b"GIF89a": "GIF", b"BM": "BMP",
                     b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"RIFF": "WEBP"}
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}
_log = get_logger(__name__)


class ImageRejected(Exception):
    """Why one image was dropped: ``reason`` is the funnel key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ProcessedImage:
    data: bytes
    image_format: str
    width: int
    height: int
    sha256: str
    features: Any = None  # what ``features`` made of the final pixels (None: not asked, or it failed)


def _describe_payload(data: bytes) -> str:
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head:
        return "HTML, not an image"
    if head.startswith((b"{", b"[")):
        return "JSON, not an image"
    return f"unidentifiable payload starting {data[:8]!r}"


def _target_size(width: int, height: int, longest: int | None) -> tuple[int, int] | None:
    """Size after downscaling so the longest side is ``longest``; None if no resize is needed."""
    if longest is None or max(width, height) <= longest:
        return None
    scale = longest / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(im: Image.Image) -> Image.Image:
    try:
        return to_rgb(im)
    except ValueError as e:
        raise ImageRejected("unsupported_mode", str(e)) from None


def _decoders(allowed: tuple[str, ...]) -> list[str]:
    Image.init()  # registers every plugin once; an explicit formats= list skips Pillow's lazy init
    return [f for f in (a.upper() for a in allowed) if f in Image.OPEN]


def _open(data: bytes, cfg: ImageConfig) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data), formats=_decoders(cfg.allowed_formats))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected("decompression_bomb", str(e)) from None
    except UnidentifiedImageError:
        claimed = next((f for sig, f in _IMAGE_SIGNATURES.items() if data.startswith(sig)), None)
        if claimed and claimed not in {a.upper() for a in cfg.allowed_formats}:
            raise ImageRejected("disallowed_format", f"{claimed} is not in allowed_formats") from None
        if claimed:
            raise ImageRejected("corrupt_image", f"{claimed} signature but no decodable header") from None
        raise ImageRejected("not_image", _describe_payload(data)) from None
    except Exception as e:  # noqa: BLE001 - header parsers raise many kinds (SyntaxError, struct.error, ...)
        raise ImageRejected("corrupt_image", f"bad header: {type(e).__name__}: {e}") from None
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageRejected("corrupt_image", f"declared size {width}x{height}")
    if width * height > cfg.max_pixels:
        raise ImageRejected("decompression_bomb", f"{width}x{height} = {width * height} pixels > {cfg.max_pixels}")
    return im


def _encode(im: Image.Image, image_format: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if image_format == "JPEG":
        im.save(buf, "JPEG", quality=quality)
    elif image_format == "WEBP":
        im.save(buf, "WEBP", quality=quality)
    else:
        im.save(buf, "PNG")
    return buf.getvalue()


def _features(features: Callable[[Image.Image], Any] | None, im: Image.Image) -> Any:
    if features is None:
        return None
    try:
        return features(im)
    except (OSError, ValueError, SyntaxError):  # an unhashable image keeps its row, with null features
        return None


def process_image(data: bytes | None, cfg: ImageConfig,
                  features: Callable[[Image.Image], Any] | None = None) -> ProcessedImage:
    """Validate and normalise one encoded image; raises ImageRejected with the drop reason.

    Decodes once: ``features`` (e.g. the dedup hashes) runs on the final pixels, the ones that are
    then encoded (or kept), so no later step has to decode the image again."""
    if data is None:
        raise ImageRejected("no_image", "the row has no image bytes")
    if len(data) == 0:
        raise ImageRejected("empty_image", "zero bytes")
    # Pillow only warns between MAX_IMAGE_PIXELS and twice that; ``_open`` enforces ``max_pixels``
    # itself from the header. (No warnings.catch_warnings here: it is not thread-safe.)
    im = _open(data, cfg)
    source_format = im.format or "unknown"
    width, height = im.size
    if min(width, height) < cfg.min_side:
        raise ImageRejected("too_small", f"{width}x{height}, shorter side < {cfg.min_side}")
    if max(width, height) / min(width, height) > cfg.max_aspect_ratio:
        raise ImageRejected("bad_aspect_ratio", f"{width}x{height} exceeds {cfg.max_aspect_ratio}:1")
    stored_target = _target_size(width, height, cfg.resize_longest_side)
    if stored_target is not None and source_format in ("JPEG", "MPO"):
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale, never below the target size.
        im.draft(None, stored_target)
    _load(im)  # before EXIF: PNG's getexif() would load (and hide a truncation) on its own
    orientation = _orientation(im)
    if (cfg.encode_format == "keep" and stored_target is None and orientation == 1
            and im.mode in ("RGB", "L") and source_format in _KEEPABLE_FORMATS):
        return ProcessedImage(data, source_format, width, height, hashlib.sha256(data).hexdigest(), _features(features, im))
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
    im = _to_rgb(im)
    target = _target_size(*((height, width) if orientation in _SWAPS_AXES else (width, height)),
                          cfg.resize_longest_side)
    if target is not None and im.size != target:
        im = im.resize(target, _RESAMPLE[cfg.resample], reducing_gap=3.0)
    # keep: what cannot be kept is stored as JPEG, the format the training reader decodes fastest and
    # the cheapest to encode (bench/image_formats.py: PNG costs ~3x the encode and ~1.4x the read).
    out_format = "JPEG" if cfg.encode_format == "keep" else cfg.encode_format
    made = _features(features, im)
    encoded = _encode(im, out_format, cfg.encode_quality)
    return ProcessedImage(encoded, out_format, im.width, im.height, hashlib.sha256(encoded).hexdigest(), made)


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block only loses the orientation
        return 1
    return value if 1 <= value <= 8 else 1


def _load(im: Image.Image) -> None:
    try:
        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected("decompression_bomb", str(e)) from None
    except OSError as e:
        reason = "truncated_image" if "truncated" in str(e).lower() else "corrupt_image"
        raise ImageRejected(reason, f"{type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001 - decoders raise ValueError, SyntaxError, struct.error, ...
        raise ImageRejected("corrupt_image", f"{type(e).__name__}: {e}") from None


def try_process_image(data: bytes | None, cfg: ImageConfig, features: Callable[[Image.Image], Any] | None = None
                      ) -> tuple[ProcessedImage | None, ImageRejected | None]:
    """``process_image`` that returns its rejection instead of raising; never raises."""
    try:
        return process_image(data, cfg, features), None
    except ImageRejected as e:
        return None, e
    except Exception as e:  # noqa: BLE001 - one bad image costs one row, never the batch
        return None, ImageRejected("image_error", f"{type(e).__name__}: {e}")


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


@dataclass
class ImageResult:
    table: pa.Table  # kept rows with normalised images and their measurements
    funnel: Funnel
    rejects: pa.Table  # dropped rows (image bytes removed) + status, reason, error


def _with_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def assemble_image_results(table: pa.Table, results: list[ProcessedImage | None],
                           rejections: list[ImageRejected | None], stage: str = STAGE) -> ImageResult:
    """Build the kept/rejects tables and funnel from one (result, rejection) pair per row."""
    keep = pa.array([r is not None for r in results], pa.bool_())
    kept_results = [r for r in results if r is not None]
    kept = table.filter(keep)
    kept = _with_column(kept, "image", pa.array([r.data for r in kept_results], pa.binary()))
    kept = _with_column(kept, "image_format", pa.array([r.image_format for r in kept_results], pa.string()))
    kept = _with_column(kept, "width", pa.array([r.width for r in kept_results], pa.int32()))
    kept = _with_column(kept, "height", pa.array([r.height for r in kept_results], pa.int32()))
    kept = _with_column(kept, "image_bytes", pa.array([len(r.data) for r in kept_results], pa.int64()))
    kept = _with_column(kept, "sha256", pa.array([r.sha256 for r in kept_results], pa.string()))

    dropped = [e for e in rejections if e is not None]
    rejects = table.filter(pc.invert(keep))
    if "image" in rejects.column_names:
        rejects = rejects.drop_columns(["image"])
    rejects = _with_column(rejects, "status", pa.array(["failed_permanent"] * len(dropped), pa.string()))
    rejects = _with_column(rejects, "reason", pa.array([e.reason for e in dropped], pa.string()))
    rejects = _with_column(rejects, "error", pa.array([str(e)[:500] for e in dropped], pa.string()))

    funnel = Funnel()
    funnel.record(stage, table.num_rows, kept.num_rows, (e.reason for e in dropped))
    log_event(_log, "images processed", rows=table.num_rows, kept=kept.num_rows, dropped=len(dropped))
    return ImageResult(kept, funnel, rejects)
