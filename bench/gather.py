"""Benchmark: fetch + validate + hash + store images from a local HTTP server, per core and wall-clock.

Three pipelines on the same URL list and server, interleaved (``--reps`` times, best counts):

- **ours**: tasks.gather.gather_images as the build runs it now: ``--workers`` processes (one per
  core, as Ray runs the build's shard tasks), each fetching its share of the URLs with asyncio and
  doing the image work on one thread as each body arrives (the build's ``image_threads=1``: image
  threads in one process contend for the GIL, ~20% more CPU an image at two threads), one decode
  per image, the dedup hashes computed from
  the decoded pixels (``features=HashFeatures``), stored as the default ``keep`` (original bytes
  when they satisfy the size rules, else JPEG q95);
- **previous**: the path the build had before, in the same processes: the same fetching, the image re-encoded (photos:
  JPEG q90, the old default; clip art: PNG, the demo's old format), then ``hash_table`` decoding
  the stored image again to hash it;
- **img2dataset** (pinned, in its own venv at .bench/venv, created on first use) with
  ``--workers`` processes: fetch + resize + encode, no hashes (it computes no perceptual hash).

Two image sets: **web photos** (JPEGs 480–1024 px made from the bundled sample, resized to 256)
and **clip art** (the bundled Openclipart sample's ≤128 px PNGs as they are, the set the issue's
profile came from; longest side 128). Same settings otherwise: 64 connections per process, no
upscaling, min side 16, aspect ≤ 5, sha256, Parquet output. Resize filter ``box`` (area
averaging, img2dataset's INTER_AREA class). img2dataset's time is first shard start to last shard
end from its own stats (no interpreter start-up), which flatters it a little. Rates per CPU-second
(img2dataset's start-up CPU, measured on a one-URL run, subtracted) are robust to a busy machine;
the last line is wall-clock on the photos: ours ÷ img2dataset, ``ratio=``. Peak RSS is printed.

    .venv/bin/python bench/gather.py [--quick] [--images N] [--reps R]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
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
from tasks.dedup.hashing import HashFeatures, hash_table  # noqa: E402
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


def _candidates(urls: list[str]) -> pa.Table:
    n = len(urls)
    return pa.table({"sample_id": [f"{i:06d}" for i in range(n)], "source": ["bench"] * n,
                     "caption": [None] * n, "url": urls, "image": pa.nulls(n, pa.binary()),
                     "meta": pa.nulls(n, pa.string())})


def _worker_pipeline(urls: list[str], out_dir: str, image_cfg: ImageConfig, previous: bool) -> tuple[float, int, float]:
    """One worker process's share of one pipeline, with one image thread (the build's setting):
    (wall seconds, images kept with hashes, CPU seconds of this process)."""
    gather_cfg = GatherConfig(concurrency=CONCURRENCY, per_host_concurrency=CONCURRENCY, allow_loopback=True)
    table = _candidates(urls)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    cpu, start = _cpu_seconds(resource.RUSAGE_SELF), time.perf_counter()
    if previous:  # store, then decode the stored image again to hash it
        processed = hash_table(gather_images(table, gather_cfg, image_cfg).table)
    else:
        processed = gather_images(table, gather_cfg, image_cfg, features=HashFeatures()).table
    pq.write_table(processed, Path(out_dir) / "ours.parquet")
    hashed = processed.num_rows - processed.column("phash").null_count
    return time.perf_counter() - start, hashed, _cpu_seconds(resource.RUSAGE_SELF) - cpu


def run_in_processes(pool, urls: list[str], out_dir: Path, workers: int, image_cfg: ImageConfig, previous: bool
                     ) -> tuple[float, int, float]:
    """(wall seconds, images kept with hashes, CPU seconds of all workers): the URLs dealt into
    ``workers`` interleaved shares, one per process of ``pool`` (started before, as Ray's workers
    are; img2dataset's start-up is likewise left out)."""
    shares = [urls[i::workers] for i in range(workers)]
    start = time.perf_counter()
    results = pool.starmap(_worker_pipeline, [(share, str(out_dir / f"w{i}"), image_cfg, previous)
                                              for i, share in enumerate(shares)])
    return time.perf_counter() - start, sum(r[1] for r in results), sum(r[2] for r in results)


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


def run_img2dataset(cli: Path, url_file: Path, out_dir: Path, count: int, workers: int,
                    longest: int = LONGEST_SIDE) -> tuple[float, float, int, float]:
    """(first shard start to last shard end, wall time incl. start-up, successes, CPU seconds)."""
    target = out_dir / "img2dataset"
    shutil.rmtree(target, ignore_errors=True)
    args = [str(cli), "--url_list", str(url_file), "--input_format", "txt", "--output_folder", str(target),
            "--output_format", "parquet", "--processes_count", str(workers), "--thread_count", str(CONCURRENCY),
            "--image_size", str(longest), "--resize_mode", "keep_ratio_largest",
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


def clip_art(count: int) -> dict[str, bytes]:
    """The bundled sample's images as they are (≤ 128 px PNGs)."""
    images = pq.read_table(SAMPLE, columns=["image"]).column("image").to_pylist()
    return {f"clipart/{i:06d}.png": images[i % len(images)] for i in range(count)}


SETS = {  # name: (images, longest side, our settings, the previous path's settings)
    "web photos": (make_images, LONGEST_SIDE, "JPEG", 90),
    "clip art": (clip_art, 128, "PNG", 90),
}


def bench_set(name: str, count: int, reps: int, workers: int, cli: Path | None) -> dict:
    make, longest, previous_format, previous_quality = SETS[name]
    files = make(count)
    ours_cfg = ImageConfig(resize_longest_side=longest, min_side=16, max_aspect_ratio=5.0, resample="box")
    previous_cfg = ImageConfig(resize_longest_side=longest, encode_format=previous_format,
                               encode_quality=previous_quality, min_side=16, max_aspect_ratio=5.0, resample="box")
    print(f"{name}: {count} images, {sum(map(len, files.values())) / 1e6:.1f} MB; longest side {longest}; "
          f"ours: {ours_cfg.encode_format} (JPEG q{ours_cfg.encode_quality} where resized) + hashes from the decoded "
          f"pixels; previous: {previous_format} + hash_table", flush=True)
    pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        return _bench_set_in(pool, name, files, longest, count, reps, workers, cli, ours_cfg, previous_cfg)
    finally:  # close + join (not the context manager's terminate): the workers exit cleanly
        pool.close()
        pool.join()


def _bench_set_in(pool, name: str, files: dict[str, bytes], longest: int, count: int, reps: int, workers: int,
                  cli: Path | None, ours_cfg: ImageConfig, previous_cfg: ImageConfig) -> dict:
    best = {k: {"wall": 0.0, "cpu": 0.0} for k in ("ours", "previous", "img2dataset")}
    with tempfile.TemporaryDirectory(prefix="witflow-bench-") as tmp, serve_files(files, in_subprocess=True) as server:
        out_dir = Path(tmp)
        # Warm-up (not timed): every worker imports and runs each pipeline once.
        for warm_cfg, warm_previous in ((ours_cfg, False), (previous_cfg, True)):
            run_in_processes(pool, server.urls[: 4 * workers], out_dir / "warm", workers, warm_cfg, warm_previous)
        url_file = out_dir / "urls.txt"
        url_file.write_text("\n".join(server.urls) + "\n")
        startup_cpu = 0.0
        if cli is not None:
            one_url = out_dir / "one_url.txt"
            one_url.write_text(server.urls[0] + "\n")
            startup_cpu = run_img2dataset(cli, one_url, out_dir, 1, workers, longest)[3]
        for rep in range(reps):
            for label, cfg, previous in (("ours", ours_cfg, False), ("previous", previous_cfg, True)):
                seconds, kept, cpu = run_in_processes(pool, server.urls, out_dir, workers, cfg, previous)
                best[label]["wall"] = max(best[label]["wall"], kept / seconds)
                best[label]["cpu"] = max(best[label]["cpu"], kept / cpu)
                print(f"  {label:<8} run {rep + 1}: {kept}/{count} images hashed in {seconds:.2f}s = "
                      f"{kept / seconds:.0f} images/s; {cpu:.1f} CPU-s = {kept / cpu:.0f} images/CPU-s", flush=True)
            if cli is not None:
                duration, wall, ok, cpu = run_img2dataset(cli, url_file, out_dir, count, workers, longest)
                cpu = max(cpu - startup_cpu, 1e-9)
                best["img2dataset"]["wall"] = max(best["img2dataset"]["wall"], ok / duration)
                best["img2dataset"]["cpu"] = max(best["img2dataset"]["cpu"], ok / cpu)
                print(f"  img2dataset run {rep + 1}: {ok}/{count} images in {duration:.2f}s (shard stats; "
                      f"{wall:.2f}s with start-up) = {ok / duration:.0f} images/s; {cpu:.1f} CPU-s after start-up "
                      f"({startup_cpu:.1f}) = {ok / cpu:.0f} images/CPU-s", flush=True)
    ours, prev, i2d = best["ours"], best["previous"], best["img2dataset"]
    line = (f"{name}: ours {ours['cpu']:.0f} images/CPU-s vs previous path {prev['cpu']:.0f} (x{ours['cpu'] / prev['cpu']:.2f})")
    if cli is not None:
        line += f" vs img2dataset {i2d['cpu']:.0f} (x{ours['cpu'] / i2d['cpu']:.2f}); wall: ours {ours['wall']:.0f} " \
                f"images/s, previous {prev['wall']:.0f}, img2dataset {i2d['wall']:.0f}"
    print(line, flush=True)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 images a set, one run each")
    parser.add_argument("--images", type=int, default=None, help="images per set (default 2000)")
    parser.add_argument("--reps", type=int, default=None, help="runs per pipeline, interleaved (default 2)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes of every pipeline; default: the CPU count")
    parser.add_argument("--sets", default=",".join(SETS), help=f"image sets (default {','.join(SETS)})")
    parser.add_argument("--no-rates", action="store_true", help="do not update bench/rates.json")
    args = parser.parse_args()
    count = args.images or (300 if args.quick else 2000)
    reps = args.reps or (1 if args.quick else 2)
    print(f"cpus: {os.cpu_count()} (load {os.getloadavg()[0]:.1f}); workers {args.workers}; server in a subprocess; "
          f"concurrency {CONCURRENCY}", flush=True)
    cli = ensure_img2dataset()
    results = {name: bench_set(name, count, reps, args.workers, cli) for name in args.sets.split(",")}
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MB (the largest worker process "
          f"of ours and previous, or of img2dataset)")
    headline = "web photos" if "web photos" in results else next(iter(results))
    photos = results[headline]
    if not args.no_rates and not args.quick and "web photos" in results:
        sys.path.insert(0, str(REPO_ROOT / "bench"))
        from rates import record

        record("fetch_images_hash", photos["ours"]["cpu"], "images/s/core",
               f"bench/gather.py web photos: fetch + validate + resize to {LONGEST_SIDE} + hashes + JPEG q95 over "
               f"loopback HTTP, {args.workers} processes of one image thread")
    if cli is None:
        print(f"gather fetch+validate+hash: ours {photos['ours']['wall']:.0f} images/s vs previous path "
              f"{photos['previous']['wall']:.0f} images/s (img2dataset unavailable) "
              f"ratio={photos['ours']['wall'] / photos['previous']['wall']:.2f}")
        return
    print(f"gather fetch+validate+hash ({headline}): ours {photos['ours']['wall']:.0f} images/s vs img2dataset "
          f"1.47.0 {photos['img2dataset']['wall']:.0f} images/s (fetch+resize, no hashes) "
          f"ratio={photos['ours']['wall'] / photos['img2dataset']['wall']:.2f}")


if __name__ == "__main__":
    main()
