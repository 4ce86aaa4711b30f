"""One image from any input form -> an upright RGB `PIL.Image.Image`, decoded with Pillow; bad inputs get clear errors.

    load_image("cat.jpg")                     # a local path (str or Path)
    load_image(jpeg_bytes)                    # the file's bytes (a Ray Dataset binary column, an HTTP body)
    load_image("data:image/png;base64,...")   # a data URI, or a bare base64 string
    load_image(pil_image)                     # a PIL image in any mode
    load_image(array)                         # numpy (H, W, C) or (H, W): uint8, or float in [0, 1]
    load_image(tensor)                        # torch (C, H, W) or (H, W): uint8, or float in [0, 1]

As transformers' `load_image` does, the EXIF orientation is applied (`PIL.ImageOps.exif_transpose`). Modes become RGB
as transformers' PIL image processors convert them (`image_transforms.convert_to_rgb`): an image with an alpha band or
a transparency key is composited onto white, every other mode goes through Pillow's `convert("RGB")`, which *clips*
16-bit and 32-bit values (modes I;16, I, F) at 255 rather than scaling them. (transformers' pipelines call
`convert("RGB")` before the processor, which drops alpha instead of compositing: the two differ only on transparent
pixels; we follow the processor.)

Safety: URLs (http, https) are refused unless `allow_urls=True` (server-side fetching is an SSRF risk; Serve keeps it
off). Pillow's decompression-bomb guard stays on: an image of more than `max_pixels` (default Pillow's
`Image.MAX_IMAGE_PIXELS`, 89,478,485) is refused from its header, before any pixel is decoded. Every input that is
not a readable image raises `ImageInputError` (a ValueError) naming the input (its path, or "bytes input of N bytes")
and the problem, never Pillow's raw exception; a value of the wrong type raises TypeError naming the allowed forms.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default of Image.MAX_IMAGE_PIXELS, used when a caller set it to None
MAX_URL_BYTES = 64 * 1024 * 1024  # with allow_urls=True, a response larger than this is refused
URL_TIMEOUT_S = 10.0
_SCHEMES = ("http://", "https://")
# What Pillow's decoders raise on data they cannot read (plugins differ: truncated, bad headers, bad zlib streams).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)
FORMS = (
    "a local path (str or Path), bytes, a base64 string or data:image/...;base64 URI, a PIL.Image.Image, "
    "a numpy array (H, W, C) or a torch tensor (C, H, W) of uint8 or floats in [0, 1]"
)


class ImageInputError(ValueError):
    """An input that is not a readable image: missing file, empty or corrupt data, too many pixels, a URL refused."""


def load_image(image, *, allow_urls: bool = False, max_pixels: int | None = None) -> Image.Image:
    """`image` in any supported form as an upright RGB PIL image, fully decoded (see the module docstring)."""
    limit = max_pixels or Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_PIXELS
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image))
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return _decode(data, f"bytes input of {len(data)} bytes", limit)
    if isinstance(image, Path):
        return _open_file(image, limit)
    if isinstance(image, str):
        return _from_string(image, allow_urls, limit)
    if isinstance(image, torch.Tensor):
        return _from_array(_chw_to_hwc(image.detach().cpu()).numpy(), "torch tensor", limit)
    if isinstance(image, np.ndarray):
        return _from_array(image, "numpy array", limit)
    raise TypeError(f"cannot read an image from a {type(image).__name__}; an image is {FORMS}")


def image_bytes(text: str) -> bytes:
    """The encoded image a server's request carries as text: a `data:image/<type>;base64,` URI or bare base64.
    A path or a URL is refused, whatever exists at it: a server reading either for a client would open its own
    files or fetch for it (SSRF). The bytes are decoded later, by `load_image`, like any other bytes."""
    if text.startswith("data:"):
        return _data_uri_bytes(text)
    if _looks_like_base64(text):
        return _b64decode(text, "base64 string")
    what = "a URL" if is_url(text) else "not base64"
    raise ImageInputError(
        f"{_clip(text)} is {what}: a server reads an image as base64 data or a 'data:image/<type>;base64,' URI "
        "(or a raw image/* body), never a path or a URL"
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as an RGB image, as transformers' `convert_to_rgb` does it: alpha (an "A" band or a transparency key)
    composited onto white, every other mode through Pillow's convert("RGB"). Always a new image."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _data_uri_bytes(text: str) -> bytes:
    """The payload of a `data:image/<type>;base64,<data>` URI; any other data URI is refused naming its header."""
    header, sep, payload = text.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ImageInputError(
            f"data URI {_clip(text)}: expected 'data:image/<type>;base64,<data>', got the header {header[:60]!r}"
        )
    return _b64decode(payload, "data URI")


def _from_string(text: str, allow_urls: bool, limit: int) -> Image.Image:
    if is_url(text):
        if not allow_urls:
            raise ImageInputError(
                f"URL {_clip(text)}: fetching URLs is not enabled (pass allow_urls=True to fetch it, or pass the "
                "image's bytes, a path or a base64 string)"
            )
        return _fetch(text, limit)
    if text.startswith("data:"):
        return _decode(_data_uri_bytes(text), f"data URI of {len(text)} characters", limit)
    if os.path.isfile(text):
        return _open_file(Path(text), limit)
    if _looks_like_base64(text):
        return _decode(_b64decode(text, "base64 string"), f"base64 string of {len(text)} characters", limit)
    raise ImageInputError(f"{_clip(text)} is not an existing file, a data URI nor a base64 string; an image is {FORMS}")


def _open_file(path: Path, limit: int) -> Image.Image:
    name = f"file {str(path)!r}"
    if not path.is_file():
        raise ImageInputError(f"{name}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise ImageInputError(f"{name}: the file is empty (0 bytes)")
    return _decode(path, f"{name} ({size} bytes)", limit)


def _decode(source: bytes | Path, name: str, limit: int) -> Image.Image:
    """Open, check the pixel count from the header, decode, apply EXIF orientation, convert to RGB."""
    if isinstance(source, bytes) and not source:
        raise ImageInputError(f"{name}: no image data")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            pixels = im.width * im.height
            if pixels > limit:
                raise ImageInputError(_too_large(name, f"{im.width} x {im.height} = {pixels:,} pixels", limit))  # W x H
            im.load()
            return to_rgb(ImageOps.exif_transpose(im))
    except Image.DecompressionBombError as e:  # over twice Image.MAX_IMAGE_PIXELS: Pillow refuses at open
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise ImageInputError(_too_large(name, f"{int(found[1]):,} pixels" if found else str(e), limit)) from None
    except UnidentifiedImageError:
        head = source[:16] if isinstance(source, bytes) else _head(source)
        raise ImageInputError(f"{name}: not an image format Pillow can read (the data starts with {head!r})") from None
    except ImageInputError:
        raise
    except _DECODE_ERRORS as e:
        raise ImageInputError(f"{name}: the image data is corrupt or truncated ({type(e).__name__}: {e})") from None


def _too_large(name: str, found: str, limit: int) -> str:
    return (
        f"{name}: the image is too large ({found}); the limit is {limit:,} pixels (Pillow's decompression-bomb guard, "
        "PIL.Image.MAX_IMAGE_PIXELS, or max_pixels=)"
    )


def _from_array(array: np.ndarray, kind: str, limit: int) -> Image.Image:
    """An HWC / HW array as an RGB image: uint8 as is, floats in [0, 1] scaled by 255 and rounded."""
    shape = tuple(array.shape)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        layout = "(C, H, W) or (H, W)" if kind == "torch tensor" else "(H, W, C) or (H, W)"
        raise ImageInputError(f"{kind} of shape {shape}: an image array is {layout} with C in 1, 3 or 4")
    if array.shape[0] * array.shape[1] > limit:
        raise ImageInputError(
            _too_large(f"{kind} of shape {shape}", f"{array.shape[0] * array.shape[1]:,} pixels", limit)
        )
    if np.issubdtype(array.dtype, np.floating):
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if not (0.0 <= low and high <= 1.0):  # also refuses NaN
            raise ImageInputError(f"{kind} of shape {shape}: float pixels must lie in [0, 1], got [{low}, {high}]")
        array = np.rint(array.astype(np.float64) * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ImageInputError(f"{kind} of shape {shape} has dtype {array.dtype}; allowed: uint8, or floats in [0, 1]")
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)))


def _chw_to_hwc(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.ndim == 3 and tensor.shape[0] in (1, 3, 4):
        return tensor.permute(1, 2, 0)
    if tensor.ndim == 2:
        return tensor
    raise ImageInputError(
        f"torch tensor of shape {tuple(tensor.shape)}: an image tensor is (C, H, W) with C in 1, 3 or 4"
    )


def _b64decode(text: str, kind: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageInputError(f"{kind} of {len(text)} characters is not valid base64 ({e})") from None


def _looks_like_base64(text: str) -> bool:
    """Long enough to hold an image and made only of base64 characters (paths have '/' too, but also '.' or none of
    the padding and length rules base64 obeys)."""
    compact = "".join(text.split())
    if len(compact) < 16 or len(compact) % 4:
        return False
    try:
        base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _fetch(url: str, limit: int) -> Image.Image:
    """GET `url` (only with allow_urls=True), at most MAX_URL_BYTES, then decode as any bytes input."""
    data = fetch_image_bytes(url)
    return _decode(data, f"URL {_clip(url)} ({len(data)} bytes)", limit)


def fetch_image_bytes(url: str, max_bytes: int = MAX_URL_BYTES) -> bytes:
    """The body of a GET of the http(s) `url`, at most `max_bytes` (a larger one is refused, not cut), within
    URL_TIMEOUT_S. Only for callers that chose to fetch (load_image's allow_urls, Serve's allow_image_urls)."""
    import urllib.error
    import urllib.request

    if not is_url(url):
        raise ImageInputError(f"{_clip(url)} is not an http(s) URL")
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:  # noqa: S310 - the scheme is checked
            data = response.read(max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ImageInputError(f"URL {_clip(url)}: could not be fetched ({e})") from None
    if len(data) > max_bytes:
        raise ImageInputError(f"URL {_clip(url)}: the response is larger than {max_bytes:,} bytes")
    return data


def is_url(text: str) -> bool:
    """Whether `text` is an http(s) URL (the only schemes an image may be fetched from)."""
    return text.startswith(_SCHEMES)


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(16)


def _clip(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")
