"""A safetensors checkpoint on disk, read as untrusted input: its files stay inside its folder, damage is named.

A checkpoint folder often comes from elsewhere (the hub, a colleague). Its
``model.safetensors.index.json`` names the shard of every tensor, and
nothing stops an entry from naming ``../../home/me/secrets.safetensors`` or
an absolute path: here every entry must resolve (symlinks followed) inside
the folder. The one exception is the hub cache's own layout, where a
``snapshots/<revision>/`` file links to the same repository's ``blobs/``.
A truncated shard, an index that is no JSON or a missing shard becomes one
:class:`~hf_galore.errors.GaLoreConfigError` line naming the file, instead
of a ``SafetensorError`` / ``JSONDecodeError`` that names none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import GaLoreConfigError, one_line

INDEX_NAME = "model.safetensors.index.json"

#: Largest index file read: a 7B model's index is ~25 KB, the largest published ones well under 10 MB.
MAX_INDEX_BYTES = 64 * 2**20


def _allowed_roots(folder: Path) -> list[Path]:
    """Where the folder's files may resolve to: the folder, and ``blobs/`` for a hub-cache snapshot."""
    resolved = folder.resolve()
    roots = [resolved]
    if resolved.parent.name == "snapshots":  # <cache>/models--org--name/snapshots/<revision>
        roots.append(resolved.parent.parent / "blobs")
    return roots


def _inside_folder(folder: Path, name: str, what: str) -> Path:
    """``folder / name`` if it resolves inside ``folder`` (or its hub-cache blobs); else refuse, naming ``what``."""
    if not name or os.path.isabs(name) or Path(name).drive or Path(name).anchor:
        raise GaLoreConfigError(
            f"{what} {name!r} is not a relative path inside the checkpoint folder {str(folder)!r}; "
            "a shard must be named relative to the folder (e.g. 'model-00001-of-00002.safetensors')"
        )
    path = folder / name
    target = path.resolve()
    if not any(target.is_relative_to(root) for root in _allowed_roots(folder)):
        raise GaLoreConfigError(
            f"{what} {name!r} resolves to {str(target)!r}, outside the checkpoint folder {str(folder)!r}; "
            "refusing to read it: keep every shard inside the folder"
        )
    return path


def _read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of an index file, every way it can be bad one message naming the file."""
    try:
        with open(index, "rb") as fh:
            raw = fh.read(MAX_INDEX_BYTES + 1)
    except OSError as exc:
        raise GaLoreConfigError(f"`checkpoint` index {str(index)!r} cannot be read: {one_line(exc, limit=200)}") from None
    if len(raw) > MAX_INDEX_BYTES:
        raise GaLoreConfigError(
            f"`checkpoint` index {str(index)!r} is over {MAX_INDEX_BYTES:,} bytes: it is not a safetensors index"
        )
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        where = f" ({exc.msg} at line {exc.lineno} column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise GaLoreConfigError(
            f"`checkpoint` index {str(index)!r} is not valid JSON{where}: it is damaged; re-download or re-save "
            "the checkpoint"
        ) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise GaLoreConfigError(
            f"`checkpoint` index {str(index)!r} has no `weight_map` object (tensor name -> shard file); "
            "re-download or re-save the checkpoint"
        )
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise GaLoreConfigError(
                f"`checkpoint` index {str(index)!r}: `weight_map` entry {key!r} must name a shard file, got "
                f"{shard!r:.60}"
            )
    return weight_map


def checkpoint_files(checkpoint: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The safetensors files of a checkpoint: a file, a list of files, or a directory (sharded or not).

    A directory's files (its index's shards, or its ``*.safetensors``) must
    lie inside it; files passed by name are the caller's choice and are
    only checked to exist.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint)
        if path.is_dir():
            index = path / INDEX_NAME
            if index.is_file():
                weight_map = _read_index(index)
                shards: dict[str, Path] = {}
                for key, shard in weight_map.items():
                    if shard not in shards:
                        shards[shard] = _inside_folder(
                            path, shard, f"`checkpoint` index {INDEX_NAME} entry {key!r}: shard"
                        )
                missing = [str(p) for p in shards.values() if not p.is_file()]
                if missing:
                    raise GaLoreConfigError(
                        f"`checkpoint` index {str(index)!r} names {len(missing)} shard(s) that are not in the "
                        f"folder: {', '.join(repr(m) for m in missing[:4])}; re-download the checkpoint"
                    )
                return [shards[name] for name in sorted(shards)]
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise GaLoreConfigError(f"`checkpoint` directory {str(path)!r} holds no *.safetensors file")
            return [_inside_folder(path, f.name, "`checkpoint` file") for f in files]
        paths = [path]
    else:
        paths = [Path(p) for p in checkpoint]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise GaLoreConfigError(f"`checkpoint`: no such safetensors file(s): {missing or checkpoint!r}")
    return paths


def load_shard(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file; a damaged or unreadable file is one error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise GaLoreConfigError(
            f"`checkpoint` shard {str(path)!r} cannot be read as safetensors ({one_line(exc, limit=200)}): it is damaged or "
            "truncated; re-download or re-save it"
        ) from None


__all__ = ["INDEX_NAME", "checkpoint_files", "load_shard"]
