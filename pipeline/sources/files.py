"""Which videos a path names: files, folders walked recursively, globs, and image-sequence folders; and a
video's label from its place (parent folder or file stem). No decoding here (media.py decodes)."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.errors import DataError

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mkv", ".webm", ".avi", ".mov", ".mpg", ".mpeg", ".ts", ".mts",
                              ".m2ts", ".flv", ".wmv", ".ogv", ".3gp", ".gif", ".y4m"})
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
LABELS = ("folder", "stem", "none")  # where a video's label comes from
FITS = ("crop", "squash")  # how a frame becomes square: centre crop to the short side, or resize as is


class BadVideo(Exception):
    """Why a video is unusable ([Note: damaged video]); callers turn it into a skip or a DataError."""


@dataclass(frozen=True)
class Item:
    """One video: a file, or an image-sequence folder and its images in order."""

    path: str  # the file or the folder
    images: tuple[str, ...] = ()  # for an image sequence: its image files, in name order

    @property
    def kind(self) -> str:
        return "images" if self.images else "video"

    def label(self, mode: str) -> str | None:
        """The label name: the parent folder's name, the file's stem (a sequence: its folder's name), or None."""
        if mode == "none":
            return None
        path = os.path.normpath(self.path)
        if mode == "folder":
            return os.path.basename(os.path.dirname(os.path.abspath(path)))
        return os.path.basename(path) if self.images else os.path.splitext(os.path.basename(path))[0]

    def stat(self) -> tuple[int, int]:
        """(bytes, newest mtime in ns) of the file or of the sequence's images: what tells a changed source."""
        files = self.images or (self.path,)
        try:
            stats = [os.stat(f) for f in files]
        except OSError as e:
            raise BadVideo(f"cannot read: {e.strerror}") from None
        return sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats)


def discover(paths: Sequence[str], what: str) -> tuple[list[Item], list[str]]:
    """The videos that files, folders and globs name, in a stable order, and the files a folder held that
    are neither video nor image (ignored, for the record).

    A file is a video whatever its name (so a non-video is reported, not passed over); in a folder, walked
    recursively, files with a video extension are videos and the image files of each folder form one image
    sequence. Hidden files and folders are passed over. A path that names nothing raises DataError.
    """
    items: list[Item] = []
    ignored: list[str] = []
    for raw in paths:
        matches = sorted(glob.glob(raw, recursive=True)) if glob.has_magic(raw) else [raw]
        if not matches:
            raise DataError(f"{what}: {raw} matches no file")
        for path in matches:
            if os.path.isdir(path):
                found, skipped = _walk(path)
                if not found:
                    raise DataError(f"{what}: {path} holds no video files or images")
                items += found
                ignored += skipped
            elif os.path.lexists(path):
                items.append(Item(path))
            else:
                raise DataError(f"{what}: {path}: no such file or folder")
    unique = list(dict.fromkeys(items))  # a file named twice is one video
    return unique, ignored


def _walk(root: str) -> tuple[list[Item], list[str]]:
    items: list[Item] = []
    ignored: list[str] = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        images = []
        for name in sorted(f for f in files if not f.startswith(".")):
            ext = os.path.splitext(name)[1].lower()
            path = os.path.join(folder, name)
            if ext in VIDEO_EXTENSIONS:
                items.append(Item(path))
            elif ext in IMAGE_EXTENSIONS:
                images.append(path)
            else:
                ignored.append(path)
        if images:
            items.append(Item(folder, tuple(images)))
    return items, ignored
