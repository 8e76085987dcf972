"""Encoded images -> uint8 (C, H, W) tensors, on the host or (JPEG) on the GPU, with TorchCodec.

TorchCodec is the PyTorch decoder that replaces torchvision.io's (deprecated in torchvision 0.29).
Host: TorchCodec (libjpeg-turbo, libpng, libwebp, ...); PIL for the formats it does not read (BMP,
TIFF, ...) and for JPEGs whose EXIF orientation rotates them (HF datasets' PIL decoding applies it,
TorchCodec does not). GPU: nvJPEG through TorchCodec's batched decode_jpeg; only baseline JPEGs in
the model's colour mode with no EXIF rotation are sent there (`jpeg_size`), the rest decode on the host.
Reduced size: simplejpeg (libjpeg-turbo's DCT scaling) decodes a JPEG at 1/2, 1/4 or 1/8 of its size
when the caller knows the pixels would be thrown away by the resize anyway (`decode_reduced`).
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
import simplejpeg
import torch
from PIL import Image, ImageOps
from torchcodec.decoders import decode_image, decode_jpeg

_READ_MODE = {"RGB": "RGB", "L": "GRAY"}
_SCALED_MODE = {"RGB": "RGB", "L": "GRAY"}  # simplejpeg's colour space names
_SCALABLE_COLOURS = ("YCbCr", "Gray")  # what libjpeg converts to RGB or grey itself (not CMYK / YCCK)
REDUCTIONS = (8, 4, 2)  # libjpeg-turbo's fast scaled IDCTs (1/8, 1/4, 1/2); the M/8 others are slower than full size
_EXIF_ORIENTATION = 0x0112


def encoded_bytes(cell: dict) -> bytes:
    """The encoded file of an HF `Image(decode=False)` cell: its bytes, or the file at its path."""
    if cell.get("bytes") is not None:
        return cell["bytes"]
    with open(cell["path"], "rb") as f:
        return f.read()


def as_byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _is_jpeg(data: bytes) -> bool:
    return data[:2] == b"\xff\xd8"


def _rotated_by_exif(data: bytes) -> bool:
    """True when a JPEG carries an EXIF orientation other than 'upright' (header read only)."""
    if data.find(b"Exif\x00\x00", 0, 65536) < 0:  # no EXIF block at all: the common case, no parsing
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.getexif().get(_EXIF_ORIENTATION, 1) != 1
    except Exception:  # noqa: BLE001 -- an unreadable header is the decoder's to report
        return False


def decode_host(data: bytes | torch.Tensor, mode: str) -> torch.Tensor:
    """Decode on the CPU to uint8 (C, H, W) in `mode` ("RGB" or "L"); raises on unreadable data."""
    raw = data.numpy().tobytes() if isinstance(data, torch.Tensor) else data
    if not (_is_jpeg(raw) and _rotated_by_exif(raw)):
        try:
            return decode_image(data if isinstance(data, torch.Tensor) else as_byte_tensor(raw), mode=_READ_MODE[mode])
        except (RuntimeError, ValueError):
            pass  # a format TorchCodec does not read, or damaged data: PIL decides (and names the problem)
    with Image.open(io.BytesIO(raw)) as img:
        img.load()
        if img.getexif().get(_EXIF_ORIENTATION) is not None:
            img = ImageOps.exif_transpose(img)
        array = np.asarray(img.convert(mode))
    return torch.from_numpy(array.copy()).reshape(array.shape[0], array.shape[1], -1).permute(2, 0, 1).contiguous()


def jpeg_size(data: bytes, mode: str) -> Optional[tuple[int, int]]:
    """(width, height) when `data` is a JPEG the GPU decoder takes as is, else None (decode on the host).

    Reads the header only. Excluded: other formats, CMYK / YCCK and progressive files, files whose
    EXIF orientation would rotate them, and greyscale files for RGB models (and the reverse).
    """
    if not _is_jpeg(data):
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode != mode or img.info.get("progressive"):
                return None
            if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                return None
            return img.size
    except Exception:  # noqa: BLE001 -- unreadable header: the host decoder reports it properly
        return None


def decode_on_device(datas: list[torch.Tensor], mode: str, device: torch.device) -> list[torch.Tensor | Exception]:
    """Decode JPEGs (uint8 byte tensors) to uint8 (C, H, W) tensors on `device`, one batched call on CUDA.

    If the batched nvJPEG call fails (a damaged file, a variant it rejects, an old driver), each image
    is decoded on the host instead and moved to the device: slower, never wrong. An image no decoder
    reads comes back as its exception, for the caller's bad-image policy.
    """
    if device.type == "cuda":
        try:
            return list(decode_jpeg(list(datas), mode=_READ_MODE[mode], device=device))
        except (RuntimeError, ValueError):
            pass
    out: list[torch.Tensor | Exception] = []
    for data in datas:
        try:
            out.append(decode_host(data, mode).to(device, non_blocking=True))
        except Exception as e:  # noqa: BLE001 -- reported per image by the loader
            out.append(e)
    return out


def scalable_jpeg_size(data: bytes) -> Optional[tuple[int, int]]:
    """(width, height) of a JPEG `decode_reduced` takes (YCbCr or grey, not EXIF-rotated), else None.

    Reads the header only (a few microseconds); anything unreadable is left to the full decoder to report.
    """
    if not _is_jpeg(data) or _rotated_by_exif(data):
        return None
    try:
        height, width, colours, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (width, height) if colours in _SCALABLE_COLOURS else None


def decode_reduced(data: bytes, mode: str, factor: int) -> torch.Tensor:
    """A JPEG decoded at 1/`factor` of its size (ceil(w / factor) x ceil(h / factor)), uint8 (C, H, W).

    libjpeg's scaled IDCT computes the smaller image from each 8x8 block's low frequencies, skipping
    the full-size IDCT, upsampling and colour conversion (the entropy decoding remains). factor 1 is
    the ordinary host decode.
    """
    if factor == 1:
        return decode_host(data, mode)
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    array = simplejpeg.decode_jpeg(data, colorspace=_SCALED_MODE[mode],
                                   min_height=-(-height // factor), min_width=-(-width // factor))
    return torch.from_numpy(array).permute(2, 0, 1)
