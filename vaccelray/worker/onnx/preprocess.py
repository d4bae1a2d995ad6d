"""Turn an encoded image (any format Pillow reads) into the model's input.

Resize the short side to 256 (bicubic), centre-crop 224x224, RGB ``uint8``
``[224, 224, 3]``; the graph does the ``(x - 127) / 128`` normalisation. The
resize and the crop are one Pillow ``resize`` with a source box, and JPEGs
larger than needed are decoded at a reduced DCT scale (``draft``).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["CROP", "RESIZE", "ImageError", "preprocess"]

RESIZE = 256
CROP = 224


class ImageError(ValueError):
    """The payload is not an image Pillow can decode."""


def preprocess(data: bytes) -> npt.NDArray[Any]:
    """Decode *data* into a ``uint8`` ``[224, 224, 3]`` array; :class:`ImageError` if it can't."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError("the image is empty")
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(
            f"the payload ({len(data)} bytes) is not an image in a format Pillow can read"
        ) from None
    except Exception as exc:
        raise ImageError(f"cannot read the image: {exc}") from None
    try:
        with img:
            fmt = img.format or "image"
            if img.format == "JPEG":
                # decode at 1/2, 1/4 or 1/8 scale when that still covers the resize target
                img.draft("RGB", (RESIZE, RESIZE))
            img.load()
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            if img.mode != "RGB":
                img = img.convert("RGB")
            width, height = img.size
            if width < 1 or height < 1:
                raise ImageError("the image has no pixels")
            side = min(width, height) * CROP / RESIZE
            box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
            img = img.resize((CROP, CROP), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
            array = np.asarray(img, dtype=np.uint8)
    except ImageError:
        raise
    except Exception as exc:  # truncated or corrupt data: OSError, SyntaxError, ...
        raise ImageError(f"cannot decode the {fmt} image: {exc}") from None
    if array.shape != (CROP, CROP, 3):
        raise ImageError(f"unexpected decoded image shape {array.shape}")
    return array
