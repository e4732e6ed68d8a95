"""Benchmark: images/s through fetch + validate + resize + re-encode from a local HTTP server.

Ours: tasks.gather.gather_images in one process: asyncio fetching, image work (Pillow, JPEG draft
decoding) on ``--workers`` threads as each body arrives; result written to Parquet. The resize filter
is ``box`` (area averaging), the same class as img2dataset's default INTER_AREA; ``--resample
bicubic`` measures witflow's default filter (about half the speed on this machine).
Baseline: img2dataset (pinned, in its own venv at .bench/venv, created on first use) on the same URL
list and server, with ``--workers`` processes (one shard each). Same settings for both: 64
connections per process, longest side 256 without upscaling, JPEG q90, min side 16, aspect <= 5,
sha256, Parquet output. Each side runs ``--reps`` times, alternating; the best run counts.
img2dataset's time is first shard start to last shard end from its own stats (no interpreter or
worker start-up), which flatters it a little. On a shared machine wall-clock rates are noisy, so CPU
time is reported too (images per CPU-second; img2dataset's start-up CPU, measured on a one-URL run,
is subtracted); the headline stays wall-clock.

    .venv/bin/python bench/gather.py [--quick] [--images N] [--reps R]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("WITFLOW_PROGRESS", "0")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from infra.config import GatherConfig, ImageConfig  # noqa: E402
from infra.http_server import serve_files  # noqa: E402
from tasks.gather import gather_images  # noqa: E402

SAMPLE = REPO_ROOT / "infra" / "data" / "openclipart_sample.parquet"
BENCH_VENV = REPO_ROOT / ".bench" / "venv"
IMG2DATASET_PIN = "img2dataset==1.47.0"
CONCURRENCY = 64
LONGEST_SIDE = 256


def make_images(count: int, seed: int = 0) -> dict[str, bytes]:
    """``count`` web-sized JPEGs (longest side 480..1024) made from the bundled sample's clipart."""
    import random

    rng = random.Random(seed)
    if SAMPLE.exists():
        sources = pq.read_table(SAMPLE, columns=["image"]).column("image").to_pylist()
    else:  # the sample is built by another stage; fall back to generated gradients
        sources = []
    files: dict[str, bytes] = {}
    for i in range(count):
        longest = rng.randint(480, 1024)
        if sources:
            art = Image.open(io.BytesIO(sources[i % len(sources)])).convert("RGBA")
            canvas = Image.new("RGB", art.size, (255, 255, 255))
            canvas.paste(art, mask=art.getchannel("A"))
            scale = longest / max(canvas.size)
            im = canvas.resize((max(16, round(canvas.width * scale)), max(16, round(canvas.height * scale))),
                               Image.Resampling.BILINEAR)
        else:
            im = Image.radial_gradient("L").resize((longest, longest * 3 // 4)).convert("RGB")
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        files[f"images/{i:06d}.jpg"] = buf.getvalue()
    return files


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_ours(urls: list[str], out_dir: Path, workers: int, resample: str) -> tuple[float, int, float]:
    """(wall seconds, images kept, CPU seconds of this process)."""
    gather_cfg = GatherConfig(concurrency=CONCURRENCY, per_host_concurrency=CONCURRENCY, allow_loopback=True)
    image_cfg = ImageConfig(resize_longest_side=LONGEST_SIDE, encode_format="JPEG", encode_quality=90,
                            min_side=16, max_aspect_ratio=5.0, resample=resample)
    n = len(urls)
    table = pa.table({"sample_id": [f"{i:06d}" for i in range(n)], "source": ["bench"] * n,
                      "caption": [None] * n, "url": urls, "image": pa.nulls(n, pa.binary()),
                      "meta": pa.nulls(n, pa.string())})
    cpu, start = _cpu_seconds(resource.RUSAGE_SELF), time.perf_counter()
    processed = gather_images(table, gather_cfg, image_cfg, image_threads=workers).table
    pq.write_table(processed, out_dir / "ours.parquet")
    return time.perf_counter() - start, processed.num_rows, _cpu_seconds(resource.RUSAGE_SELF) - cpu


def ensure_img2dataset() -> Path | None:
    """The img2dataset CLI in its own venv (never in the project's), installed on first use."""
    cli = BENCH_VENV / "bin" / "img2dataset"
    if cli.exists():
        return cli
    try:
        BENCH_VENV.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run([str(BENCH_VENV / "bin" / "pip"), "install", "-q", IMG2DATASET_PIN], check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"img2dataset could not be installed ({e}); falling back to the sequential baseline", file=sys.stderr)
        return None
    return cli if cli.exists() else None


def run_img2dataset(cli: Path, url_file: Path, out_dir: Path, count: int,
                    workers: int) -> tuple[float, float, int, float]:
    """(first shard start to last shard end, wall time incl. start-up, successes, CPU seconds)."""
    target = out_dir / "img2dataset"
    shutil.rmtree(target, ignore_errors=True)
    args = [str(cli), "--url_list", str(url_file), "--input_format", "txt", "--output_folder", str(target),
            "--output_format", "parquet", "--processes_count", str(workers), "--thread_count", str(CONCURRENCY),
            "--image_size", str(LONGEST_SIDE), "--resize_mode", "keep_ratio_largest",
            "--resize_only_if_bigger", "True", "--encode_format", "jpg", "--encode_quality", "90",
            "--min_image_size", "16", "--max_aspect_ratio", "5", "--extract_exif", "False",
            "--compute_hash", "sha256", "--timeout", "10", "--retries", "0",
            "--number_sample_per_shard", str(-(-count // workers)), "--enable_wandb", "False"]
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    cpu, start = _cpu_seconds(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    cpu = _cpu_seconds(resource.RUSAGE_CHILDREN) - cpu
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    stats = [json.loads(p.read_text()) for p in sorted(target.glob("*_stats.json"))]
    span = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return span, wall, sum(s["successes"] for s in stats), cpu


def run_sequential(urls: list[str]) -> tuple[float, int]:
    """Fallback baseline when img2dataset is unavailable: urllib one at a time + Pillow thumbnail."""
    import hashlib
    import urllib.request

    start = time.perf_counter()
    done = 0
    for url in urls:
        with urllib.request.urlopen(url, timeout=10) as resp:
            data = resp.read()
        im = Image.open(io.BytesIO(data)).convert("RGB")
        im.thumbnail((LONGEST_SIDE, LONGEST_SIDE), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        hashlib.sha256(buf.getvalue()).hexdigest()
        done += 1
    return time.perf_counter() - start, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 images, one run each")
    parser.add_argument("--images", type=int, default=None, help="number of images (default 2000)")
    parser.add_argument("--reps", type=int, default=None, help="runs per side, alternating (default 2)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="image threads (ours) / processes (img2dataset); default: the CPU count")
    parser.add_argument("--resample", default="box", choices=["box", "bilinear", "bicubic", "lanczos"],
                        help="our resize filter (default box: area averaging, like img2dataset's)")
    args = parser.parse_args()
    count = args.images or (300 if args.quick else 2000)
    reps = args.reps or (1 if args.quick else 2)

    files = make_images(count)
    total_mb = sum(map(len, files.values())) / 1e6
    print(f"images: {count} JPEGs, {total_mb:.1f} MB, from {'the bundled sample' if SAMPLE.exists() else 'gradients'}; "
          f"cpus: {os.cpu_count()}; workers {args.workers}; server in a subprocess; concurrency {CONCURRENCY}; "
          f"longest side {LONGEST_SIDE}; our filter {args.resample}", flush=True)
    cli = ensure_img2dataset()
    with tempfile.TemporaryDirectory(prefix="witflow-bench-") as tmp, serve_files(files, in_subprocess=True) as server:
        out_dir = Path(tmp)
        url_file = out_dir / "urls.txt"
        url_file.write_text("\n".join(server.urls) + "\n")
        ours_best, base_best = 0.0, 0.0  # best rates, images/s
        ours_cpu, base_cpu = 0.0, 0.0  # best images per CPU-second
        startup_cpu = 0.0
        if cli is not None:
            one_url = out_dir / "one_url.txt"
            one_url.write_text(server.urls[0] + "\n")
            startup_cpu = run_img2dataset(cli, one_url, out_dir, 1, args.workers)[3]
        for rep in range(reps):
            seconds, kept, cpu = run_ours(server.urls, out_dir, args.workers, args.resample)
            ours_best, ours_cpu = max(ours_best, kept / seconds), max(ours_cpu, kept / cpu)
            print(f"ours  run {rep + 1}: {kept}/{count} images in {seconds:.2f}s = {kept / seconds:.0f} images/s; "
                  f"{cpu:.1f} CPU-s = {kept / cpu:.0f} images/CPU-s", flush=True)
            if cli is not None:
                duration, wall, ok, cpu = run_img2dataset(cli, url_file, out_dir, count, args.workers)
                cpu = max(cpu - startup_cpu, 1e-9)
                base_best, base_cpu = max(base_best, ok / duration), max(base_cpu, ok / cpu)
                print(f"img2dataset run {rep + 1}: {ok}/{count} images in {duration:.2f}s (shard stats; "
                      f"{wall:.2f}s with start-up) = {ok / duration:.0f} images/s; {cpu:.1f} CPU-s after "
                      f"start-up ({startup_cpu:.1f}) = {ok / cpu:.0f} images/CPU-s", flush=True)
            else:
                duration, ok = run_sequential(server.urls)
                base_best = max(base_best, ok / duration)
                print(f"sequential baseline run {rep + 1}: {ok}/{count} images in {duration:.2f}s = {ok / duration:.0f} images/s", flush=True)
    ours_rate, base_rate = ours_best, base_best
    if cli is not None:
        print(f"CPU efficiency: ours {ours_cpu:.0f} vs img2dataset {base_cpu:.0f} images/CPU-s "
              f"(x{ours_cpu / base_cpu:.2f})")
    baseline = "img2dataset 1.47.0" if cli is not None else "sequential urllib+Pillow (img2dataset unavailable)"
    print(f"gather fetch+validate+resize ({args.resample}): ours {ours_rate:.0f} images/s vs {baseline} {base_rate:.0f} images/s "
          f"ratio={ours_rate / base_rate:.2f}")


if __name__ == "__main__":
    main()
