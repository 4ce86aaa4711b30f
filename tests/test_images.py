"""pipelines.images: every input form decodes to the same RGB image, EXIF and mode conversion as transformers, and
bad inputs get errors that name the input and the problem (transformers lets Pillow's and httpx's raw errors out)."""

import base64
import http.server
import io
import struct
import threading
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.images import ImageInputError, load_image, to_rgb
from tests.image_checkpoints import gradient_image, random_image


def _png(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **save)
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG that claims width x height pixels: IHDR (valid CRC), an IDAT of a few bytes, IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def image():
    return random_image(0, 10, 14)


def test_every_input_form_gives_the_same_image(image, tmp_path):
    """Path (str and Path), bytes, bytearray, base64, data URI, PIL, numpy uint8 and float, torch uint8 and float CHW:
    all decode to the same pixels."""
    data = _png(image)
    path = tmp_path / "image.png"
    path.write_bytes(data)
    pixels = np.array(image)
    b64 = base64.b64encode(data).decode()
    forms = {
        "str path": str(path),
        "Path": path,
        "bytes": data,
        "bytearray": bytearray(data),
        "base64": b64,
        "base64 with newlines": base64.encodebytes(data).decode(),
        "data URI": "data:image/png;base64," + b64,
        "PIL": image,
        "numpy uint8": pixels,
        "numpy float": pixels / 255.0,
        "numpy float32": (pixels / 255.0).astype(np.float32),
        "torch uint8": torch.from_numpy(pixels).permute(2, 0, 1),
        "torch float": torch.from_numpy(pixels).permute(2, 0, 1) / 255.0,
    }
    for name, form in forms.items():
        out = load_image(form)
        assert out.mode == "RGB", name
        np.testing.assert_array_equal(np.array(out), pixels, err_msg=name)


def test_grayscale_arrays_become_rgb(image):
    """An (H, W) or (H, W, 1) array and a (1, H, W) tensor are gray: each channel equals the gray value."""
    gray = np.array(image)[..., 0]
    for form in (gray, gray[..., None], torch.from_numpy(gray)[None]):
        np.testing.assert_array_equal(np.array(load_image(form)), np.repeat(gray[..., None], 3, axis=-1))


def test_exif_orientation_is_applied_as_transformers(tmp_path):
    """A PNG whose EXIF says "rotate 90 CW" (orientation 6) comes back upright, equal to transformers' load_image."""
    from transformers.image_utils import load_image as reference

    stored = gradient_image(12, 20)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.png"
    path.write_bytes(_png(stored, exif=exif.tobytes()))
    ours = load_image(path)
    assert ours.size == (12, 20)  # width and height swapped
    np.testing.assert_array_equal(np.array(ours), np.array(reference(str(path))))
    np.testing.assert_array_equal(np.array(ours), np.array(stored.transpose(Image.Transpose.ROTATE_270)))


def _mode_images() -> dict[str, Image.Image]:
    rgba = random_image(1, 9, 11, "RGBA")
    sixteen = np.arange(99, dtype=np.uint16).reshape(9, 11) * 600  # up to 58,800: 16-bit values above 255
    palette = rgba.convert("RGB").convert("P")
    keyed = palette.copy()
    keyed.info["transparency"] = 3
    return {
        "RGBA": rgba,
        "LA": rgba.convert("LA"),
        "P": palette,
        "P with transparency": keyed,
        "PA": rgba.convert("PA"),
        "L": rgba.convert("L"),
        "1": rgba.convert("1"),
        "CMYK": rgba.convert("RGB").convert("CMYK"),
        "I;16": Image.fromarray(sixteen),
        "I": Image.fromarray(sixteen.astype(np.int32) - 1000),
        "F": Image.fromarray(sixteen.astype(np.float32) / 7),
        "RGB": rgba.convert("RGB"),
    }


@pytest.mark.parametrize("mode", list(_mode_images()))
def test_mode_conversion_equals_transformers(mode):
    """Every mode becomes RGB as transformers' convert_to_rgb does: alpha and transparency keys composited onto
    white, the rest through Pillow (16/32-bit values clipped at 255) - directly and through a PNG round trip."""
    from transformers.image_transforms import convert_to_rgb

    image = _mode_images()[mode]
    expected = convert_to_rgb(image, return_numpy=True)
    np.testing.assert_array_equal(np.array(to_rgb(image)), expected)
    np.testing.assert_array_equal(np.array(load_image(image)), expected)
    if mode not in ("CMYK", "F", "PA", "I"):  # modes PNG cannot store
        decoded = Image.open(io.BytesIO(_png(image)))
        np.testing.assert_array_equal(np.array(load_image(_png(image))), convert_to_rgb(decoded, return_numpy=True))


def test_a_text_file_named_jpg_names_the_file_and_the_problem(tmp_path):
    """A text file with an image suffix: the path, its size, that Pillow cannot read it, and how it starts."""
    path = tmp_path / "photo.jpg"
    path.write_text("just some text, not a JPEG")
    with pytest.raises(ImageInputError, match=r"file '.*photo\.jpg' \(26 bytes\): not an image format .*b'just some"):
        load_image(str(path))


def test_empty_inputs_are_refused():
    """Zero bytes, as a file or as bytes, say so."""
    with pytest.raises(ImageInputError, match=r"bytes input of 0 bytes: no image data"):
        load_image(b"")


def test_an_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageInputError, match=r"file '.*empty\.png': the file is empty \(0 bytes\)"):
        load_image(path)


def test_a_30000_square_png_header_is_refused_before_decoding():
    """A 68-byte PNG claiming 30,000 x 30,000 pixels (Pillow's bomb error) and one of 10,000 x 10,000 (over the limit,
    under Pillow's error threshold): both refused from the header, naming the input, the size and the limit."""
    with pytest.raises(
        ImageInputError, match=r"bytes input of 68 bytes: the image is too large \(900,000,000 pixels\)"
    ):
        load_image(_png_header(30_000, 30_000))
    with pytest.warns(Image.DecompressionBombWarning):
        with pytest.raises(ImageInputError, match=r"10000 x 10000 = 100,000,000 pixels\); the limit is 89,478,485"):
            load_image(_png_header(10_000, 10_000))


def test_max_pixels_lowers_the_limit(image):
    """max_pixels applies to decoded files and to arrays alike."""
    with pytest.raises(ImageInputError, match=r"14 x 10 = 140 pixels\); the limit is 100 pixels"):
        load_image(_png(image), max_pixels=100)
    with pytest.raises(
        ImageInputError,
        match=r"numpy array of shape \(10, 14, 3\): the image is too large \(140 pixels\); the limit is 100",
    ):
        load_image(np.array(image), max_pixels=100)


def test_corrupt_data_names_the_input(image):
    """A truncated PNG: the input and "corrupt or truncated", not Pillow's bare OSError."""
    with pytest.raises(ImageInputError, match=r"bytes input of 60 bytes: the image data is corrupt or truncated"):
        load_image(_png(image)[:60])


def test_urls_are_refused_unless_allowed():
    """Offline (and in Serve) a URL is refused with the reason and the way out."""
    with pytest.raises(ImageInputError, match=r"URL 'https://example.com/cat.jpg': fetching URLs is not enabled"):
        load_image("https://example.com/cat.jpg")


def test_allowed_urls_are_fetched(image):
    """With allow_urls=True an http URL is fetched (a local server here) and decoded like bytes."""
    data = _png(image)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/image.png"
        np.testing.assert_array_equal(np.array(load_image(url, allow_urls=True)), np.array(image))
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "bad, message",
    [
        ("no/such/photo.jpg", r"'no/such/photo\.jpg' is not an existing file, a data URI nor a base64 string"),
        ("data:text/plain;base64,aGVsbG8=", r"data URI 'data:text/plain.*expected 'data:image/<type>;base64,<data>'"),
        ("data:image/png;base64,%%%%", r"data URI of 4 characters is not valid base64"),
        (np.zeros((4, 5), dtype=np.int16), r"numpy array of shape \(4, 5\) has dtype int16; allowed: uint8"),
        (np.full((4, 5, 3), 1.5), r"float pixels must lie in \[0, 1\], got \[1\.5, 1\.5\]"),
        (np.zeros((4, 5, 2), dtype=np.uint8), r"numpy array of shape \(4, 5, 2\): an image array is \(H, W, C\)"),
        (torch.zeros(2, 4, 5, dtype=torch.uint8), r"torch tensor of shape \(2, 4, 5\): an image tensor is \(C, H, W\)"),
    ],
)
def test_bad_values_name_the_input_and_what_is_allowed(bad, message):
    with pytest.raises(ImageInputError, match=message):
        load_image(bad)


def test_a_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match=r"cannot read an image from a int; an image is a local path"):
        load_image(3)
