"""The draw-a-digit page: the files of `serving/static/`, read once when the app is built and served from
memory (`GET /` is `index.html`, `GET /static/<name>` the rest). A handful of small files, no CDN, no
framework: the page works offline against the server that serves it.
"""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
INDEX = "index.html"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


def load_static(folder: Path = STATIC_DIR) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, media type) of every servable file in `folder`: a fixed table, so a request path
    can only ever name one of these files (nothing is looked up on disk per request)."""
    if not folder.is_dir():
        return {}
    return {
        path.name: (path.read_bytes(), MEDIA_TYPES[path.suffix])
        for path in sorted(folder.iterdir())
        if path.is_file() and path.suffix in MEDIA_TYPES
    }
