"""Write throughput of ObjectStore: local disk and a local SeaweedFS S3 server, each against a plain baseline.

Baselines, measured in the same run on the same data: ``open().write()`` for local disk (no fsync,
no rename: what atomicity costs) and one plain boto3 ``put_object`` per object for S3. The headline
(last line) is S3 MB/s of ObjectStore ÷ boto3 put_object, higher is better.

    .venv/bin/python bench/storage.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.s3server import local_s3_server  # noqa: E402
from infra.storage import ObjectStore  # noqa: E402


def _mb_per_s(ours: Callable[[str, bytes], None], baseline: Callable[[str, bytes], None], objects: list[bytes],
              repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` MB/s of each writer, alternating them so both see the same machine load."""
    best = {"ours": 0.0, "baseline": 0.0}
    writers = [("ours", ours), ("baseline", baseline)]
    for r in range(repeats):
        for name, write in writers if r % 2 == 0 else writers[::-1]:
            start = time.perf_counter()
            for i, data in enumerate(objects):
                write(f"bench/r{r}/obj-{i:04d}.bin", data)
            best[name] = max(best[name], sum(map(len, objects)) / (time.perf_counter() - start) / 1e6)
    return best["ours"], best["baseline"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer, smaller objects")
    args = parser.parse_args()
    count, size_mb, repeats = (8, 4, 2) if args.quick else (12, 16, 4)
    objects = [os.urandom(size_mb * 1024 * 1024) for _ in range(count)]
    print(f"writing {count} objects x {size_mb} MiB, best of {repeats}")

    with tempfile.TemporaryDirectory(prefix="witflow-bench-storage-") as tmp:
        local = ObjectStore(os.path.join(tmp, "local"))

        def plain_write(key: str, data: bytes) -> None:
            path = os.path.join(tmp, "plain", key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)

        ours_local, base_local = _mb_per_s(local.write_bytes, plain_write, objects, repeats)
        print(f"local write: ours (temp+fsync+rename) {ours_local:.0f} MB/s, plain open().write {base_local:.0f} MB/s "
              f"local_ratio={ours_local / base_local:.2f}")

        with local_s3_server(os.path.join(tmp, "seaweedfs")) as info:
            store = ObjectStore(info.uri("ours"), info.storage_config())
            client = store.s3_client

            def boto3_put(key: str, data: bytes) -> None:
                client.put_object(Bucket=info.bucket, Key=f"baseline/{key}", Body=data)

            store.write_bytes("warmup.bin", objects[0])  # the first write grows a volume on the server
            ours_s3, base_s3 = _mb_per_s(store.write_bytes, boto3_put, objects, repeats)
            print(f"s3 write: ours {ours_s3:.0f} MB/s, boto3 put_object {base_s3:.0f} MB/s; "
                  f"local/s3 (ours) {ours_local / ours_s3:.1f}x")
            print(f"storage write throughput (SeaweedFS S3 on loopback): ObjectStore {ours_s3:.0f} MB/s vs "
                  f"boto3 put_object {base_s3:.0f} MB/s ratio={ours_s3 / base_s3:.2f}")


if __name__ == "__main__":
    main()
