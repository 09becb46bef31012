"""Which file of a checkpoint folder is damaged, so a failed resume can name it.

A truncated ``optimizer.pt``, a half-written ``model.safetensors`` or an
empty ``trainer_state.json`` (a job killed while saving, a full disk) makes
the loaders raise ``EOFError``, ``SafetensorError`` or ``JSONDecodeError``
without the path. Each check here reads the file's own structure with its
own library (``json``, the safetensors header, ``zipfile``'s CRCs for
``torch.save`` archives) and says what is wrong; nothing is loaded into a
model. Only called after a load already failed, so reading every byte once
is acceptable.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

from .errors import HfGaloreError

#: ``torch.save`` writes zip archives under these names (the Trainer's optimizer, scheduler, RNG and weights)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
#: a safetensors header larger than this is not one (the format's own limit is 100 MB)
MAX_SAFETENSORS_HEADER = 100 * 2**20


class CheckpointFileError(HfGaloreError, ValueError):
    """A file of a checkpoint folder cannot be read: truncated, damaged or not of its format."""


def _json_problem(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    except json.JSONDecodeError as exc:
        return f"invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
    except RecursionError:
        return "JSON nested too deeply to parse"
    return None


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated: {size} bytes, shorter than the 8-byte header length"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_SAFETENSORS_HEADER, size - 8):
            return f"damaged header: it claims {header_len} bytes of a {size}-byte file"
        try:
            header = json.loads(f.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "damaged header: not valid JSON"
    if not isinstance(header, dict):
        return "damaged header: not a JSON object"
    ends = [
        entry["data_offsets"][1]
        for key, entry in header.items()
        if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets") or ()) == 2
    ]
    needed = 8 + header_len + max(ends, default=0)
    if size < needed:
        return f"truncated: {size} bytes, its header describes {needed}"
    return None


def _torch_problem(path: Path) -> str | None:
    if not zipfile.is_zipfile(path):
        with path.open("rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80":  # a legacy (pre-zip) pickle file: no structure to check without loading it
            return None
        return "truncated or damaged: not a torch.save archive (no zip directory at the end)"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"damaged archive ({exc})"
    if bad is not None:
        return f"damaged archive: entry {bad!r} fails its checksum"
    return None


def file_problem(path: str | os.PathLike[str]) -> str | None:
    """What is wrong with one checkpoint file, or ``None`` if its structure reads (unknown kinds: ``None``)."""
    path = Path(path)
    if path.suffix not in (".json", ".safetensors", *TORCH_SUFFIXES):
        return None
    try:
        if path.stat().st_size == 0:
            return "empty (0 bytes)"
        if path.suffix == ".json":
            return _json_problem(path)
        if path.suffix == ".safetensors":
            return _safetensors_problem(path)
        if path.suffix in TORCH_SUFFIXES:
            return _torch_problem(path)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return None


def find_damaged_file(folder: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """The first damaged file in ``folder`` (sub-folders included, sorted by path), with what is wrong."""
    root = Path(folder)
    if not root.is_dir():
        return None
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        problem = file_problem(path)
        if problem is not None:
            return path, problem
    return None


def damaged_checkpoint_error(folder: str | os.PathLike[str]) -> CheckpointFileError | None:
    """The error naming ``folder``'s damaged file and what to do, or ``None`` when every file reads."""
    found = find_damaged_file(folder)
    if found is None:
        return None
    path, problem = found
    return CheckpointFileError(
        f"cannot resume from {str(folder)!r}: {path.name} is {problem} ({path}). The checkpoint was probably "
        "written by a run stopped while saving: resume from an earlier checkpoint (a damaged optimizer.pt, "
        "scheduler.pt or rng_state*.pth may also be deleted: the Trainer then starts that part fresh)"
    )


__all__ = ["CheckpointFileError", "damaged_checkpoint_error", "file_problem", "find_damaged_file"]
