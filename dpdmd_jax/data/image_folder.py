"""An image folder with captions: the real images of DMD2's GAN on a real model (`gan.real="data"`
from an embedding cache built with `--images`, `data.embedding_cache`).

Two layouts, the ones image-training tools read: a `metadata.jsonl` (Hugging Face `imagefolder`: one
JSON object per line, the image's path relative to the folder in `file_name`, its caption in a
column, "text" by default), or each image next to a caption file of the same name (`a.png` +
`a.txt`, as LoRA trainers keep them). Images are resized so their shorter side is the training
size and centre-cropped to a square, as diffusers' text-to-image training scripts prepare them.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class ImageFolderError(ValueError):
    """An image folder that cannot be read as (image, caption) pairs; the message names the fix."""


def read_image_folder(folder: str, caption_column: str = "text") -> list[tuple[str, str]]:
    """(image path, caption) of every image of `folder`, in file-name order."""
    if not os.path.isdir(folder):
        raise ImageFolderError(f"{folder} is not a folder")
    metadata = os.path.join(folder, "metadata.jsonl")
    pairs = _from_metadata(folder, metadata, caption_column) if os.path.isfile(metadata) else _from_sidecars(folder)
    if not pairs:
        raise ImageFolderError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return sorted(pairs)


def _from_metadata(folder: str, metadata: str, column: str) -> list[tuple[str, str]]:
    pairs = []
    with open(metadata, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ImageFolderError(f"{metadata} line {n} is not JSON ({e})") from e
            if not isinstance(row, dict) or "file_name" not in row or not isinstance(row.get(column), str):
                has = sorted(row) if isinstance(row, dict) else row
                raise ImageFolderError(f"{metadata} line {n}: needs 'file_name' and a string caption in {column!r} "
                                       f"(has {has!r}); name the caption column with --caption_column")
            path = os.path.join(folder, row["file_name"])
            if not os.path.isfile(path):
                raise ImageFolderError(f"{metadata} line {n}: {path} does not exist")
            pairs.append((path, row[column]))
    return pairs


def _from_sidecars(folder: str) -> list[tuple[str, str]]:
    pairs = []
    for name in os.listdir(folder):
        stem, suffix = os.path.splitext(name)
        if suffix.lower() not in IMAGE_SUFFIXES:
            continue
        caption = os.path.join(folder, stem + ".txt")
        if not os.path.isfile(caption):
            raise ImageFolderError(f"{os.path.join(folder, name)} has no caption: write it to {caption}, or list "
                                   "the folder's images and captions in a metadata.jsonl")
        with open(caption, encoding="utf-8") as f:
            pairs.append((os.path.join(folder, name), f.read().strip()))
    return pairs


def load_image(path: str, size: int) -> np.ndarray:
    """[size, size, 3] float32 in [-1, 1]: RGB, the shorter side resized to `size` (bilinear, as
    torchvision's `Resize` on a PIL image), then the centre `size` x `size` crop."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        w, h = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((w, h), Image.BILINEAR)
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return np.asarray(im, np.float32) / 127.5 - 1.0
