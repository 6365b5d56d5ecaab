"""Fixtures and HTML helpers for the report tests."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import pytest
from PIL import Image

from .synthetic import make_dataset


class ReportParser(HTMLParser):
    """Collects headings, image sources, error boxes and all attribute values."""

    def __init__(self):
        super().__init__()
        self.headings: list[tuple[str, str]] = []
        self.images: list[str] = []
        self.errors: list[str] = []
        self.attributes: list[str] = []
        self._heading: str | None = None
        self._in_error = 0
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.attributes.extend(v for v in attrs.values() if v)
        if tag in ("h1", "h2", "h3"):
            self._heading, self._text = tag, []
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "div" and attrs.get("class") == "error":
            self._in_error, self._text = 1, []
        elif self._in_error and tag == "div":
            self._in_error += 1

    def handle_endtag(self, tag):
        if self._heading == tag:
            self.headings.append((tag, "".join(self._text).strip()))
            self._heading = None
        if tag == "div" and self._in_error:
            self._in_error -= 1
            if not self._in_error:
                self.errors.append("".join(self._text))

    def handle_data(self, data):
        if self._heading or self._in_error:
            self._text.append(data)


def parse_report(path) -> ReportParser:
    parser = ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def decode_png(src: str) -> Image.Image:
    """Decode a ``data:image/png;base64,`` source; raises if it is not a valid PNG."""
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    image = Image.open(io.BytesIO(base64.b64decode(src[len(prefix):], validate=True)))
    assert image.format == "PNG"
    image.load()
    return image


@pytest.fixture
def dataset(tmp_path):
    """One participant: raw 3T input and 7T-like derivatives (with an uncertainty map)."""
    return make_dataset(tmp_path)
