"""A photo as it is shown: the EXIF Orientation tag (phones and cameras store many photos turned) applied.

Every viewer turns such a photo; the official Qwen3-VL code embeds the stored pixels. qvlsearch turns it
before resizing, wherever pixels are read (PIL, the JPEG-on-device path, RAW files, thumbnails), so that
a photo tagged 6 gets the vector of the upright picture. Images without the tag are left as they are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PIL import ExifTags, Image

if TYPE_CHECKING:
    import torch

# The transposition that shows a photo upright, for each Orientation value other than 1 (as Pillow's exif_transpose)
TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}


def orientation_of(image: Image.Image) -> int:
    """The image's EXIF Orientation (1 to 8); 1 when it has none or one that is no orientation."""
    value = image.getexif().get(ExifTags.Base.Orientation)
    return value if isinstance(value, int) and value in TRANSPOSE else 1


def turns(orientation: int) -> bool:
    """Whether showing an image of this orientation swaps its width and height."""
    return orientation in (5, 6, 7, 8)


def upright(image: Image.Image, orientation: int | None = None) -> Image.Image:
    """The image as shown (its own EXIF Orientation, or `orientation`); the image itself when nothing turns."""
    orientation = orientation_of(image) if orientation is None else orientation
    return image.transpose(TRANSPOSE[orientation]) if orientation in TRANSPOSE else image


def upright_tensor(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """`upright` for a decoded C×H×W tensor (on any device)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.rot90(-1, (-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return image.rot90(1, (-2, -1))
    return image
