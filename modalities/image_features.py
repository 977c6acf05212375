"""Image preprocessing in numpy and Pillow (used by the input pipeline and by `predict`).

Kept apart from the image modality net so that neither the input pipeline nor `predict` needs JAX.
"""

import numpy as np


def resize_and_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes uint8 [H, W, C] so the shorter side is `size`, then crops the centre square."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  h, w, c = image.shape
  if (h, w) == (size, size):
    return image
  scale = size / min(h, w)
  new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
  pil = Image.fromarray(image[..., 0] if c == 1 else image)
  resized = np.asarray(pil.resize((new_w, new_h), Image.BILINEAR))  # Antialiased when shrinking.
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return resized.reshape(new_h, new_w, c)[top:top + size, left:left + size]


def normalize(image: np.ndarray, size: int | None = None) -> np.ndarray:
  """uint8 [H, W] or [H, W, C] (C = 1, 3 or 4) -> float32 [size, size, 3] in [-1, 1].

  Grayscale is tiled to RGB, alpha dropped; with `size`, resized and centre-cropped to a square.
  """
  img = np.asarray(image)
  if img.ndim == 2:
    img = img[..., None]
  if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected an image [H, W, C] with C in (1, 3, 4), got shape {img.shape}")
  img = img[..., :3]
  if size is not None:
    img = resize_and_crop(img, size)
  if img.shape[-1] == 1:
    img = np.repeat(img, 3, axis=-1)
  return img.astype(np.float32) / 127.5 - 1.0
