"""tasks/images.py on hostile and awkward payloads: every drop has its reason, nothing crashes."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from infra.config import ConfigError, GatherConfig, ImageConfig
from tasks.gather import FAILED, gather_images
from tasks.images import ImageRejected, process_image
from tasks.step import StepOutput


def _encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header declares ``width`` x ``height`` RGB pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


def _gradient(size: tuple[int, int]) -> Image.Image:
    w, h = size
    return Image.frombytes("RGB", size, bytes((x * 7 + y * 3) % 256 for y in range(h) for x in range(w) for _ in range(3)))


JPEG_640 = _encode(_gradient((640, 480)), "JPEG", quality=90)


def _table(images: dict[str, bytes | None]) -> pa.Table:
    return pa.table({"sample_id": list(images), "caption": ["c"] * len(images),
                     "image": pa.array(list(images.values()), pa.binary())})


def _process(table: pa.Table, cfg: ImageConfig) -> StepOutput:
    """The production step on rows that carry their images inline (nothing is fetched)."""
    return gather_images(table, GatherConfig(), cfg)


def _stage(result: StepOutput, name: str = "images") -> dict:
    return next(s for s in result.funnel.to_dict()["stages"] if s["stage"] == name)


def _reason(data: bytes | None, cfg: ImageConfig | None = None) -> str:
    with pytest.raises(ImageRejected) as info:
        process_image(data, cfg or ImageConfig())
    return info.value.reason


def test_hostile_payloads_are_dropped_with_reasons():
    cases = {
        "null": (None, "no_image"),
        "zero_bytes": (b"", "empty_image"),
        "html": (b"<!DOCTYPE html>\n<html><head><title>404</title></head></html>", "not_image"),
        "json": (b'{"error": "rate limited"}', "not_image"),
        "eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not_image"),
        "bomb_header": (_png_declaring(100_000, 100_000), "decompression_bomb"),
        "bomb_over_limit": (_png_declaring(20_000, 20_000), "decompression_bomb"),
        "truncated_jpeg": (JPEG_640[: len(JPEG_640) // 2], "truncated_image"),
        "jpeg_header_only": (JPEG_640[:200], "corrupt_image"),
        "garbage_png": (b"\x89PNG\r\n\x1a\n" + b"\xff" * 64, "corrupt_image"),
        "tiny": (_encode(Image.new("RGB", (10, 40)), "PNG"), "too_small"),
        "banner": (_encode(Image.new("RGB", (600, 100)), "PNG"), "bad_aspect_ratio"),
        "good": (JPEG_640, None),
    }
    assert _reason(None) == "no_image"
    payloads = {k: v for k, (v, _) in cases.items() if v is not None}  # a null image is gathering's no_url
    result = _process(_table(payloads), ImageConfig())
    assert result.table.column("sample_id").to_pylist() == ["good"]
    expected = {k: r for k, (v, r) in cases.items() if r and v is not None}
    rejects = result.side[FAILED]
    assert dict(zip(rejects.column("sample_id").to_pylist(), rejects.column("reason").to_pylist())) == expected
    assert "HTML" in rejects.filter(pa.compute.equal(rejects["sample_id"], "html"))["error"][0].as_py()
    assert rejects.column("image").null_count == rejects.num_rows  # rejects carry no image bytes
    stage = _stage(result)
    assert (stage["in"], stage["out"]) == (len(payloads), 1)
    assert sum(stage["dropped"].values()) == len(expected)


def test_pixel_limit_is_checked_from_the_header():
    cfg = ImageConfig(max_pixels=640 * 480 - 1)
    assert _reason(JPEG_640, cfg) == "decompression_bomb"
    assert process_image(JPEG_640, ImageConfig(max_pixels=640 * 480)).width == 256


def test_resize_keeps_aspect_and_records_measurements():
    out = process_image(JPEG_640, ImageConfig(resize_longest_side=256, encode_format="JPEG", encode_quality=80))
    assert (out.width, out.height, out.image_format) == (256, 192, "JPEG")
    assert out.sha256 == hashlib.sha256(out.data).hexdigest()
    decoded = Image.open(io.BytesIO(out.data))
    assert (decoded.format, decoded.mode, decoded.size) == ("JPEG", "RGB", (256, 192))


def test_draft_decoding_matches_a_full_decode():
    reference = _gradient((640, 480)).resize((160, 120), Image.Resampling.BICUBIC)
    out = process_image(JPEG_640, ImageConfig(resize_longest_side=160, encode_format="PNG"))
    got = Image.open(io.BytesIO(out.data)).convert("RGB")
    assert got.size == (160, 120)
    diff = sum(abs(a - b) for a, b in zip(got.tobytes(), reference.tobytes())) / (160 * 120 * 3)
    assert diff < 12  # mean absolute error per channel: JPEG at quality 90 plus 1/4-scale DCT


@pytest.mark.parametrize("resample", ["bicubic", "bilinear", "lanczos", "box"])
def test_every_resample_filter_gives_the_target_size(resample):
    out = process_image(_encode(_gradient((300, 120)), "PNG"), ImageConfig(resize_longest_side=100, resample=resample))
    assert (out.width, out.height) == (100, 40)
    assert Image.open(io.BytesIO(out.data)).size == (100, 40)


def test_small_images_are_not_upscaled():
    out = process_image(_encode(_gradient((50, 40)), "PNG"), ImageConfig(resize_longest_side=256, encode_format="PNG"))
    assert (out.width, out.height) == (50, 40)


@pytest.mark.parametrize("mode, color, expected", [
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("LA", (0, 0), (255, 255, 255)),  # fully transparent: white background
    ("RGBA", (0, 0, 255, 255), (0, 0, 255)),
    ("L", 128, (128, 128, 128)),
    ("1", 1, (255, 255, 255)),
])
def test_modes_become_rgb(mode, color, expected):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = process_image(_encode(Image.new(mode, (32, 32), color), fmt), ImageConfig(encode_format="PNG"))
    decoded = Image.open(io.BytesIO(out.data))
    assert decoded.mode == "RGB"
    assert all(abs(a - b) <= 3 for a, b in zip(decoded.getpixel((16, 16)), expected))


def test_palette_with_transparency_is_composited_on_white():
    im = Image.new("P", (32, 32), 0)
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.paste(1, (0, 0, 16, 32))
    out = process_image(_encode(im, "PNG", transparency=0), ImageConfig(encode_format="PNG"))
    decoded = Image.open(io.BytesIO(out.data))
    assert decoded.getpixel((8, 8)) == (0, 255, 0)
    assert decoded.getpixel((24, 8)) == (255, 255, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    out = process_image(_encode(Image.new("I;16", (32, 32), 40_000), "PNG"), ImageConfig(encode_format="PNG"))
    assert Image.open(io.BytesIO(out.data)).getpixel((0, 0)) == (156, 156, 156)


def test_exif_orientation_is_applied_and_metadata_dropped():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    exif[0x010F] = "CameraMaker"
    data = _encode(_gradient((400, 200)), "JPEG", exif=exif.tobytes())
    out = process_image(data, ImageConfig(resize_longest_side=100))
    assert (out.width, out.height) == (50, 100)
    decoded = Image.open(io.BytesIO(out.data))
    assert decoded.size == (50, 100)
    assert dict(decoded.getexif()) == {}


def test_truncated_png_and_png_orientation():
    noisy = Image.frombytes("RGB", (120, 80), bytes((i * 7919) % 251 for i in range(120 * 80 * 3)))
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90° counter-clockwise on display
    png = _encode(noisy, "PNG", exif=exif.tobytes())
    assert _reason(png[: len(png) // 2]) == "truncated_image"
    out = process_image(png, ImageConfig(resize_longest_side=None, encode_format="PNG"))
    assert (out.width, out.height) == (80, 120)
    assert Image.open(io.BytesIO(out.data)).tobytes() == noisy.transpose(Image.Transpose.ROTATE_90).tobytes()


def test_keep_returns_original_bytes_only_when_nothing_changes():
    png = _encode(_gradient((60, 40)), "PNG")
    kept = process_image(png, ImageConfig(encode_format="keep", resize_longest_side=128))
    assert kept.data == png and kept.image_format == "PNG"
    resized = process_image(JPEG_640, ImageConfig(encode_format="keep", resize_longest_side=128))
    assert resized.image_format == "JPEG" and resized.data != JPEG_640 and (resized.width, resized.height) == (128, 96)
    rgba = _encode(Image.new("RGBA", (60, 40), (0, 0, 0, 0)), "PNG")
    flattened = process_image(rgba, ImageConfig(encode_format="keep"))
    assert flattened.data != rgba and Image.open(io.BytesIO(flattened.data)).mode == "RGB"
    # What cannot be kept is stored as JPEG (bench/image_formats.py), whatever it came as.
    big_png = process_image(_encode(_gradient((300, 200)), "PNG"), ImageConfig(encode_format="keep",
                                                                               resize_longest_side=128))
    assert big_png.image_format == "JPEG" and Image.open(io.BytesIO(big_png.data)).format == "JPEG"
    assert flattened.image_format == "JPEG"
    assert _reason(JPEG_640[:-4000], ImageConfig(encode_format="keep", resize_longest_side=None)) == "truncated_image"


def test_webp_and_gif_inputs():
    for fmt in ("WEBP", "GIF"):
        out = process_image(_encode(_gradient((64, 48)), fmt), ImageConfig(encode_format="WEBP"))
        assert (out.image_format, out.width, out.height) == ("WEBP", 64, 48)
        assert Image.open(io.BytesIO(out.data)).format == "WEBP"


def test_disallowed_format_is_not_decoded():
    bmp = _encode(_gradient((32, 32)), "BMP")
    assert process_image(bmp, ImageConfig()).width == 32
    assert _reason(bmp, ImageConfig(allowed_formats=("JPEG", "PNG"))) == "disallowed_format"


def test_table_columns_and_other_columns_preserved():
    table = _table({"a": JPEG_640, "b": b"", "c": _encode(_gradient((100, 80)), "PNG")})
    result = _process(table, ImageConfig(resize_longest_side=64, encode_format="PNG"))
    out = result.table
    assert out.column("sample_id").to_pylist() == ["a", "c"]
    assert out.column("caption").to_pylist() == ["c", "c"]
    assert out.column("image_format").to_pylist() == ["PNG", "PNG"]
    assert out.column("width").to_pylist() == [64, 64] and out.column("height").to_pylist() == [48, 51]
    assert out.schema.field("width").type == pa.int32() and out.schema.field("image_bytes").type == pa.int64()
    assert out.column("image_bytes").to_pylist() == [len(b) for b in out.column("image").to_pylist()]
    assert out.column("sha256").to_pylist() == [hashlib.sha256(b).hexdigest() for b in out.column("image").to_pylist()]
    assert _stage(result)["dropped"] == {"empty_image": 1}


def test_bundled_sample_images_pass(sample_parquet):
    table = pq.read_table(sample_parquet, columns=["id", "image"]).slice(0, 50)
    result = _process(table, ImageConfig(resize_longest_side=128, encode_format="PNG", min_side=1,
                                         max_aspect_ratio=100.0))
    out, stage = result.table, _stage(result)
    assert stage["in"] == 50 and stage["dropped"] == {} and out.num_rows == 50
    assert max(max(w, h) for w, h in zip(out["width"].to_pylist(), out["height"].to_pylist())) <= 128


def test_config_rejects_nonsense():
    with pytest.raises(ConfigError):
        ImageConfig(encode_quality=0)
    with pytest.raises(ConfigError):
        ImageConfig(resize_longest_side=0)


def _counting_opens(monkeypatch) -> list:
    """Every Image.open the image stage makes (decodes), as a list of calls."""
    import tasks.dedup.hashing
    import tasks.images

    calls, real = [], Image.open

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(tasks.images.Image, "open", counting)
    monkeypatch.setattr(tasks.dedup.hashing.Image, "open", counting)
    return calls


@pytest.mark.parametrize("encode_format", ["PNG", "keep", "JPEG"])
def test_hashes_come_from_the_pixels_decoded_once(monkeypatch, encode_format):
    from tasks.dedup.hashing import HashFeatures, features_of_image, hash_table

    sources = {"a": _encode(_gradient((300, 200)), "PNG"), "b": JPEG_640, "c": _encode(_gradient((90, 60)), "PNG"),
               "bad": b"<html>nope</html>"}
    cfg = ImageConfig(resize_longest_side=128, encode_format=encode_format, encode_quality=95)
    calls = _counting_opens(monkeypatch)
    out = gather_images(_table(sources), GatherConfig(), cfg, features=HashFeatures("phash")).table
    assert len(calls) == len(sources)  # one decode per image, hashing included
    monkeypatch.undo()
    assert out.column("sample_id").to_pylist() == ["a", "b", "c"]
    for name in ("phash", "low_info", "thumb", "min_side", "pixels_sha256"):
        assert out.column(name).null_count == 0
    again = hash_table(out.drop_columns(["phash", "low_info", "thumb", "min_side", "pixels_sha256"]))
    lossless = ImageConfig(resize_longest_side=128, encode_format="PNG")
    for i, (sid, fmt) in enumerate(zip(out.column("sample_id").to_pylist(), out.column("image_format").to_pylist())):
        if fmt == "PNG" or out.column("image")[i].as_py() == sources[sid]:
            # Lossless or kept: the stored image decodes to exactly the pixels that were hashed.
            for name in ("phash", "thumb", "min_side", "pixels_sha256"):
                assert out.column(name)[i] == again.column(name)[i], (sid, name)
        else:  # lossy: the hashes are those of the pixels before encoding, a few bits from the JPEG's
            with Image.open(io.BytesIO(process_image(sources[sid], lossless).data)) as pixels:
                assert out.column("phash")[i].as_py() == features_of_image(pixels).code
            assert bin(out.column("phash")[i].as_py() ^ again.column("phash")[i].as_py()).count("1") <= 6
