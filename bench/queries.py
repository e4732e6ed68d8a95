"""Dump-counting throughput: the unigram/bigram map-reduce on 1 and 2 Ray workers.

Generates a synthetic multistream enwiki dump (wikitext with links, templates, references and
tables over a Zipf vocabulary; 100 pages per bz2 stream, as the real multistream dumps) into
.bench/ — at least 50 MB compressed by default, reused when it exists — then times
``tasks.queries.dump_counts.count_dump`` (map: strip + tokenize + count + spill; reduce: merge partitions) in a
fresh local Ray with 1 CPU (the baseline) and with 2 CPUs (ours). The last line is the headline:
tokens/s with 2 workers ÷ tokens/s with 1 worker.

    .venv/bin/python bench/queries.py [--quick] [--mb 50]
"""

from __future__ import annotations

import argparse
import bz2
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from xml.sax.saxutils import escape

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tasks.queries.dump_counts import CountSettings, count_dump  # noqa: E402
from tasks.queries.dumps import find_bz2_streams, plan_dump_blocks  # noqa: E402

BENCH_DIR = REPO / ".bench"
PAGES_PER_STREAM = 100
HEADER = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" xml:lang="en">\n'
          "  <siteinfo>\n    <sitename>Wikipedia</sitename>\n  </siteinfo>\n")


def _vocabulary(size: int, rng: random.Random) -> list[str]:
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [13, 9, 8, 8, 7, 7, 6, 6, 6, 4, 3, 3, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1]
    words = set()
    while len(words) < size:
        words.add("".join(rng.choices(letters, weights, k=rng.randint(2, 10))))
    return sorted(words)


def _page_text(rng: random.Random, vocab: list[str], cum: list[float], sentences: int) -> str:
    out = []
    for _ in range(sentences):
        words = rng.choices(vocab, cum_weights=cum, k=rng.randint(6, 24))
        r = rng.random()
        if r < 0.3:
            words[1] = f"[[{words[1]}|{words[2]}]]"
        elif r < 0.4:
            words[0] = f"'''{words[0]}'''"
        sentence = " ".join(words).capitalize() + ". "
        if r > 0.9:
            sentence += f"<ref>{words[3]} {words[4]}, p. 12</ref>"
        if r > 0.95:
            sentence += "{{cite web|title=" + " ".join(words[:3]) + "|url=https://example.org/x}}"
        out.append(sentence)
        if rng.random() < 0.1:
            out.append("\n\n== " + " ".join(words[:2]) + " ==\n")
    return "".join(out)


def _stream(args: tuple[int, int, int]) -> bytes:
    seed, first_page, vocab_size = args
    rng = random.Random(seed)
    vocab = _vocabulary(vocab_size, random.Random(0))
    cum, acc = [], 0.0
    for rank in range(1, len(vocab) + 1):  # Zipf: p(rank) ~ 1/rank
        acc += 1.0 / rank
        cum.append(acc)
    parts = []
    for i in range(PAGES_PER_STREAM):
        text = _page_text(rng, vocab, cum, rng.randint(20, 80))
        parts.append(f"  <page>\n    <title>Page {first_page + i}</title>\n    <ns>0</ns>\n    <id>{first_page + i}</id>\n"
                     f'    <revision>\n      <text xml:space="preserve">{escape(text)}</text>\n    </revision>\n  </page>\n')
    return bz2.compress("".join(parts).encode(), 9)


def generate_dump(path: Path, min_bytes: int, workers: int = 2) -> None:
    """Write streams until the compressed file reaches ``min_bytes`` (parallel compression)."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f, ProcessPoolExecutor(workers) as pool:
        f.write(bz2.compress(HEADER.encode()))
        batch = 0
        while f.tell() < min_bytes:
            jobs = [(batch * 64 + j, (batch * 64 + j) * PAGES_PER_STREAM, 50_000) for j in range(64)]
            for data in pool.map(_stream, jobs):
                f.write(data)
            batch += 1
            print(f"  generated {f.tell() / 1e6:.0f} MB", file=sys.stderr)
        f.write(bz2.compress(b"</mediawiki>\n"))
    os.replace(tmp, path)


def time_counting(dump: Path, num_cpus: int, block_bytes: int) -> tuple[float, dict]:
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    work = Path(tempfile.mkdtemp(prefix="witflow-bench-counts-", dir=BENCH_DIR))
    try:
        # warm the workers (process start, imports) outside the timing
        ray.get([ray.remote(num_cpus=1)(lambda: __import__("tasks.queries.dump_counts")).remote() for _ in range(num_cpus)])
        settings = CountSettings(work_dir=str(work), num_partitions=8, min_unigram_keep=5, min_bigram_keep=5)
        t0 = time.perf_counter()
        counts = count_dump([str(dump)], settings, use_ray=True, target_block_bytes=block_bytes)
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    if counts.failed_blocks:
        raise RuntimeError(f"blocks failed: {counts.failed_blocks}")
    return seconds, counts.stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=50.0, help="compressed dump size in MB (default 50)")
    ap.add_argument("--quick", action="store_true", help="a 10 MB dump, for a smoke run")
    args = ap.parse_args()
    mb = 10.0 if args.quick else args.mb
    BENCH_DIR.mkdir(exist_ok=True)
    dump = BENCH_DIR / f"enwiki-synthetic-{mb:g}MB-pages-articles-multistream.xml.bz2"
    if not dump.exists():
        print(f"generating {dump.name} ...", file=sys.stderr)
        generate_dump(dump, int(mb * 1e6))
    size = dump.stat().st_size
    streams = len(find_bz2_streams(str(dump)))
    block_bytes = max(1 << 20, size // 24)  # ~24 blocks: both workers stay busy to the end
    print(f"dump: {dump.name}  {size / 1e6:.1f} MB compressed, {streams} bz2 streams, "
          f"{len(plan_dump_blocks(str(dump), block_bytes))} blocks")
    results = {}
    for cpus in (1, 2):
        seconds, stats = time_counting(dump, cpus, block_bytes)
        rate = stats["tokens"] / seconds
        results[cpus] = rate
        print(f"{cpus} Ray worker{'s' if cpus > 1 else ''}: {stats['tokens']:,} tokens, {stats['pages']:,} pages, "
              f"{stats['distinct_bigrams']:,} distinct bigrams in {seconds:.1f}s -> {rate:,.0f} tokens/s "
              f"({size / 1e6 / seconds:.2f} MB/s compressed)")
    print(f"baseline (1 worker) {results[1]:,.0f} tokens/s, ours (2 workers) {results[2]:,.0f} tokens/s, "
          f"cores {os.cpu_count()}, ratio={results[2] / results[1]:.2f}")


if __name__ == "__main__":
    main()
