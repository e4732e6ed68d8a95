"""A tiny local HTTP image server on 127.0.0.1 (free port) for tests, the demo and benchmarks.

    with serve_parquet("infra/data/openclipart_sample.parquet") as server:
        server.urls            # one URL per row, in row order
    with serve_directory("some/dir") as server:
        server.url("a/b.png")
    with serve_table_images(candidates) as (server, to_fetch):   # the demo's HTTP path
        gather_images(to_fetch, GatherConfig(allow_loopback=True), image_cfg)

It serves from memory with aiohttp.web, in a background thread (default: ``hits`` counts requests
per path, extra aiohttp ``routes`` may be added, e.g. hostile ones in tests) or, with
``in_subprocess=True``, in a child process so a benchmark's client does not share its GIL.
Command line: ``python -m infra.http_server DIR_OR_PARQUET [--port N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import mimetypes
import os
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

from aiohttp import web

if TYPE_CHECKING:
    import pyarrow as pa

HOST = "127.0.0.1"
_REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LocalServer:
    """A running server: ``base_url`` like ``http://127.0.0.1:PORT``; ``paths`` it serves."""

    base_url: str
    paths: list[str]
    hits: collections.Counter = field(default_factory=collections.Counter)  # thread mode only

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    @property
    def urls(self) -> list[str]:
        return [self.url(p) for p in self.paths]

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])


def _content_type(path: str) -> str:
    return mimetypes.guess_type(path)[0] or "application/octet-stream"


def _image_extension(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:3] == b"GIF":
        return "gif"
    return "bin"


def build_app(files: Mapping[str, bytes], routes: Sequence[web.RouteDef] = (),
              hits: collections.Counter | None = None) -> web.Application:
    """An aiohttp app serving ``files`` (path -> bytes) at ``/<path>``, plus extra ``routes``."""
    table = {p.lstrip("/"): (data, _content_type(p)) for p, data in files.items()}

    @web.middleware
    async def count_hits(request: web.Request, handler):  # type: ignore[no-untyped-def]
        if hits is not None:
            hits[request.path] += 1
        return await handler(request)

    async def serve_file(request: web.Request) -> web.Response:
        item = table.get(request.match_info["path"])
        if item is None:
            raise web.HTTPNotFound()
        data, content_type = item
        # Byte ranges, as S3 and file servers answer them (remote sources are read that way).
        wanted = request.http_range
        if request.headers.get("Range") and wanted.start is not None:
            start, stop = wanted.start, min(len(data), wanted.stop if wanted.stop is not None else len(data))
            if start >= len(data):
                raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{len(data)}"})
            return web.Response(status=206, body=data[start:stop], content_type=content_type,
                                headers={"Content-Range": f"bytes {start}-{stop - 1}/{len(data)}",
                                         "Accept-Ranges": "bytes"})
        return web.Response(body=data, content_type=content_type, headers={"Accept-Ranges": "bytes"})

    app = web.Application(middlewares=[count_hits])
    app.add_routes(list(routes))
    app.router.add_get("/{path:.+}", serve_file)
    return app


def _free_socket(host: str = HOST, port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


@contextlib.contextmanager
def _serve_in_thread(app: web.Application, server: LocalServer, sock: socket.socket) -> Iterator[LocalServer]:
    loop = asyncio.new_event_loop()
    # Short shutdown and cancelled handlers: a test's deliberately slow route must not hold up teardown.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0, handler_cancellation=True)
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.SockSite(runner, sock).start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, name="witflow-http-server", daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("local HTTP server did not start within 10 s")
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        sock.close()


@contextlib.contextmanager
def _serve_in_subprocess(directory: Path, paths: list[str]) -> Iterator[LocalServer]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "infra.http_server", str(directory), "--port", "0"],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=_REPO_ROOT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # "serving N files at http://127.0.0.1:PORT"
        if "http://" not in line:
            raise RuntimeError(f"local HTTP server failed to start (exit code {proc.poll()}): {line!r}")
        yield LocalServer(line[line.index("http://"):], paths)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _read_directory(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _parquet_files(path: str | os.PathLike, image_column: str) -> dict[str, bytes]:
    import pyarrow.parquet as pq

    images = pq.read_table(path, columns=[image_column]).column(image_column).to_pylist()
    return {f"images/{i:06d}.{_image_extension(b or b'')}": b for i, b in enumerate(images) if b is not None}


@contextlib.contextmanager
def serve_files(files: Mapping[str, bytes], *, routes: Sequence[web.RouteDef] = (),
                in_subprocess: bool = False) -> Iterator[LocalServer]:
    """Serve ``{path: bytes}`` at ``http://127.0.0.1:<free port>/<path>``."""
    paths = list(files)
    if in_subprocess:
        if routes:
            raise ValueError("extra routes are only available in thread mode")
        with tempfile.TemporaryDirectory(prefix="witflow-http-") as tmp:
            for rel, data in files.items():
                target = Path(tmp) / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            with _serve_in_subprocess(Path(tmp), paths) as server:
                yield server
        return
    hits: collections.Counter = collections.Counter()
    sock = _free_socket()
    server = LocalServer(f"http://{HOST}:{sock.getsockname()[1]}", paths, hits)
    with _serve_in_thread(build_app(files, routes, hits), server, sock) as running:
        yield running


@contextlib.contextmanager
def serve_directory(directory: str | os.PathLike, *, routes: Sequence[web.RouteDef] = (),
                    in_subprocess: bool = False) -> Iterator[LocalServer]:
    """Serve every file under ``directory`` at its relative path."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NotADirectoryError(f"not a directory: {directory}")
    if in_subprocess:
        if routes:
            raise ValueError("extra routes are only available in thread mode")
        paths = [p.relative_to(directory).as_posix() for p in sorted(directory.rglob("*")) if p.is_file()]
        with _serve_in_subprocess(directory, paths) as server:
            yield server
        return
    with serve_files(_read_directory(directory), routes=routes) as server:
        yield server


@contextlib.contextmanager
def serve_parquet(path: str | os.PathLike, *, image_column: str = "image",
                  in_subprocess: bool = False) -> Iterator[LocalServer]:
    """Serve row i's ``image_column`` bytes at ``/images/{i:06d}.<ext>``; ``server.urls`` in row order."""
    with serve_files(_parquet_files(path, image_column), in_subprocess=in_subprocess) as server:
        yield server


@contextlib.contextmanager
def serve_table_images(table: "pa.Table", *, image_column: str = "image", url_column: str = "url",
                       in_subprocess: bool = False) -> Iterator[tuple[LocalServer, "pa.Table"]]:
    """Serve a table's inline images and yield ``(server, table rewritten to fetch them)``.

    The demo's way through the HTTP path: rows with image bytes get ``url`` = their image on the
    local server and a null image; rows without an image are left as they are.
    """
    import pyarrow as pa

    images = table.column(image_column).to_pylist()
    files = {f"images/{i:06d}.{_image_extension(b)}": b for i, b in enumerate(images) if b is not None}
    path_of_row = {int(p[7:13]): p for p in files}
    with serve_files(files, in_subprocess=in_subprocess) as server:
        old_urls = table.column(url_column).to_pylist() if url_column in table.column_names else [None] * len(images)
        urls = [server.url(path_of_row[i]) if i in path_of_row else old for i, old in enumerate(old_urls)]
        out = table.set_column(table.column_names.index(image_column), image_column,
                               pa.nulls(table.num_rows, table.schema.field(image_column).type))
        url_array = pa.array(urls, pa.string())
        if url_column in out.column_names:
            out = out.set_column(out.column_names.index(url_column), url_column, url_array)
        else:
            out = out.append_column(url_column, url_array)
        yield server, out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve images on 127.0.0.1 (tests, demo, benchmarks).")
    parser.add_argument("source", help="a directory, or a Parquet file with an image column")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--image-column", default="image")
    args = parser.parse_args(argv)
    source = Path(args.source)
    files = _read_directory(source) if source.is_dir() else _parquet_files(source, args.image_column)
    sock = _free_socket(HOST, args.port)
    print(f"serving {len(files)} files at http://{HOST}:{sock.getsockname()[1]}", flush=True)
    web.run_app(build_app(files), sock=sock, print=None, access_log=None)


if __name__ == "__main__":
    main()
