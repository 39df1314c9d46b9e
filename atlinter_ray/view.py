"""The view job: serve an output folder to neuroglancer and napari on this machine.

::

    atlinter-ray-view outputs/volumes
      │  one HTTP server on 127.0.0.1 (CORS open, so any viewer page may read it)
      ├─ /data/<experiment>.ome.zarr/...   the output folder, as files
      └─ /neuroglancer/                    the neuroglancer client from its PyPI package
    prints, per image: a neuroglancer link (works offline) and the napari command

The links are pure functions of the images found and the server's address
(:func:`neuroglancer_url`, :func:`napari_command`); the server is a thin layer over
the standard library's ``http.server``.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
import threading
import urllib.parse
from collections.abc import Sequence
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from atlinter_ray.errors import ConfigError

#: URL prefixes of the served output folder and of the neuroglancer client.
DATA_PREFIX = "/data/"
#: The client is the one the ``neuroglancer`` package serves to its Python backend: it
#: reads its state from the link and listens for backend events (held open, silent).
CLIENT_PREFIX = "/neuroglancer/v/view/"
EVENTS_PREFIX = "/neuroglancer/events/"


def find_images(path: Path) -> list[Path]:
    """The OME-Zarr images at ``path``: the folder itself if it is one, else those inside."""
    if not path.is_dir():
        raise ConfigError(f"{path}: no such folder; give an output folder (output.root) or one "
                          "<experiment>.ome.zarr image")
    if path.name.endswith(".ome.zarr"):
        return [path]
    images = sorted(p for p in path.iterdir() if p.is_dir() and p.name.endswith(".ome.zarr"))
    if not images:
        raise ConfigError(f"{path}: holds no <experiment>.ome.zarr image; give the output.root "
                          "of a finished interpolation job")
    return images


def neuroglancer_state(image_urls: Sequence[str]) -> dict[str, Any]:
    """A neuroglancer state showing every image (by its ``zarr3://`` URL) in one 2x2 layout."""
    layers = [{"type": "image", "source": f"zarr3://{url.rstrip('/')}/",
               "name": url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".ome.zarr")}
              for url in image_urls]
    return {"layers": layers, "layout": "4panel",
}


def neuroglancer_url(client_url: str, image_urls: Sequence[str]) -> str:
    """The link that opens ``image_urls`` in the neuroglancer client at ``client_url``."""
    state = json.dumps(neuroglancer_state(image_urls), separators=(",", ":"))
    return f"{client_url}#!{urllib.parse.quote(state, safe='')}"


def napari_command(image: Path) -> str:
    """The napari command that opens ``image`` with its scale and units."""
    return f"napari --plugin napari-ome-zarr {shlex.quote(str(image))}"


def neuroglancer_client() -> Path | None:
    """The folder of the neuroglancer client shipped in its PyPI package, if installed."""
    try:
        import neuroglancer.static
    except ImportError:
        return None
    folder = Path(neuroglancer.static.__file__).parent / "client"
    return folder if (folder / "index.html").is_file() else None


class _Handler(SimpleHTTPRequestHandler):
    """Files of the output folder under /data/, the client under /neuroglancer/, with CORS."""

    def __init__(self, *args: Any, data: Path, client: Path | None, stopping: threading.Event,
                 **kwargs: Any) -> None:
        self._data, self._client, self.server_stopping = data, client, stopping
        super().__init__(*args, directory=str(data), **kwargs)

    def translate_path(self, path: str) -> str:
        """Map /data/... to the output folder and /neuroglancer/... to the client."""
        route = urllib.parse.urlsplit(path).path
        for prefix, root in ((DATA_PREFIX, self._data), (CLIENT_PREFIX, self._client)):
            if root is not None and route.startswith(prefix):
                self.directory = str(root)
                return super().translate_path("/" + path[len(prefix):])
        return str(self._data / "__not_served__" / "none")  # anything else: 404

    def end_headers(self) -> None:
        """Every answer allows any origin: the data can be read by a viewer on another page."""
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Headers", "Range, Content-Type")
        super().end_headers()

    def do_GET(self) -> None:
        """Files; the client's event stream is held open and silent (no Python backend)."""
        if urllib.parse.urlsplit(self.path).path.startswith(EVENTS_PREFIX):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            self.wfile.flush()
            self.server_stopping.wait()
            return
        super().do_GET()

    def do_OPTIONS(self) -> None:
        """Answer CORS preflight requests."""
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: viewers make thousands of requests."""


class ViewServer:
    """An HTTP server on ``host`` serving an output folder and the neuroglancer client."""

    def __init__(self, folder: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.folder = folder.resolve()
        self.client = neuroglancer_client()
        self._stopping = threading.Event()
        handler = functools.partial(_Handler, data=self.folder, client=self.client,
                                    stopping=self._stopping)
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """``http://host:port`` the server answers on."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def image_url(self, image: Path) -> str:
        """The HTTP URL of an image under the served folder."""
        relative = image.resolve().relative_to(self.folder).as_posix()
        return f"{self.base_url}{DATA_PREFIX}{urllib.parse.quote(relative)}/" if relative != "." \
            else f"{self.base_url}{DATA_PREFIX}"

    def start(self) -> ViewServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted."""
        self._httpd.serve_forever()

    def close(self) -> None:
        """Stop serving and free the port."""
        self._stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
        self._httpd.server_close()


def instructions(server: ViewServer, images: Sequence[Path]) -> str:
    """What the job prints: the neuroglancer link and one napari command per image."""
    lines = []
    if server.client is not None:
        link = neuroglancer_url(server.base_url + CLIENT_PREFIX, [server.image_url(i) for i in images])
        lines += ["neuroglancer (open in a browser on this machine):", f"  {link}", ""]
    else:
        lines += ["neuroglancer: the client is not installed (pip install 'atlinter_ray[view]');",
                  "  in a neuroglancer you have, add the layer(s):"]
        lines += [f"  zarr3://{server.image_url(i)}" for i in images]
        lines.append("")
    lines.append("napari (needs: pip install napari napari-ome-zarr):")
    lines += [f"  {napari_command(i)}" for i in images]
    lines += ["", f"serving {server.folder} on {server.base_url} (Ctrl-C stops)"]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line of ``atlinter-ray-view``."""
    parser = argparse.ArgumentParser(
        prog="atlinter-ray-view",
        description="Serve an output folder on this machine and print how to open it in "
                    "neuroglancer and napari.")
    parser.add_argument("path", nargs="?", default="outputs/volumes", type=Path,
                        help="an output folder (output.root) or one <experiment>.ome.zarr "
                             "(default: outputs/volumes)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=0, help="port (default: any free one)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``atlinter-ray-view``: exit 0 when stopped, 2 on a bad path."""
    args = parse_args(argv)
    try:
        images = find_images(args.path)
    except ConfigError as err:
        print(f"atlinter-ray-view: error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_status) from None
    folder = args.path if not args.path.name.endswith(".ome.zarr") else args.path.parent
    server = ViewServer(folder, args.host, args.port)
    print(instructions(server, images), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    main()
