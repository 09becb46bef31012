"""The fenced Python blocks of the README and docs/*.md, and how tests/test_docs.py runs each one.

A block runs as written, alone, in a fresh folder. An HTML comment on the
line right before a block changes that (keep them few):

* ``<!-- docs-test: skip (reason) -->``: not run; the reason is required
  (a fragment, a GPU or the hub);
* ``<!-- docs-test: raises NAME -->``: the block shows an error; it must end
  with exception ``NAME``;
* ``<!-- docs-test: continues -->``: the block goes on from the previous
  Python block of the same page (its names); they run as one script;
* ``<!-- docs-test: torchrun N -->``: the block is a distributed script, run
  under ``torchrun --nproc_per_node N``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
_MARKER = re.compile(r"^<!--\s*docs-test:\s*(.*?)\s*-->\s*$")
_KINDS = re.compile(r"^(?:skip \((?P<reason>.+)\)|raises (?P<error>[A-Za-z_]\w*)|continues|torchrun (?P<procs>\d+))$")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its code and what its marker (if any) asks."""

    path: Path
    line: int
    code: str
    marker: str | None = None

    @property
    def id(self) -> str:
        where = self.path.relative_to(ROOT).as_posix() if self.path.is_relative_to(ROOT) else self.path.name
        return f"{where}:{self.line}"

    def _kind(self) -> re.Match | None:
        return None if self.marker is None else _KINDS.match(self.marker)

    @property
    def skip_reason(self) -> str | None:
        kind = self._kind()
        return kind["reason"] if kind else None

    @property
    def error(self) -> str | None:
        kind = self._kind()
        return kind["error"] if kind else None

    @property
    def processes(self) -> int | None:
        kind = self._kind()
        return int(kind["procs"]) if kind and kind["procs"] else None

    @property
    def continues(self) -> bool:
        return self.marker == "continues"


def doc_pages() -> list[Path]:
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def extract(path: Path) -> list[Block]:
    """The page's fenced ``python`` blocks, each with the marker on the line before it.

    Raises ``ValueError`` for a marker that is not one of the four kinds, so a
    typo cannot silently run (or skip) a block.
    """
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.match(before)
        kind = marker[1] if marker else None
        if kind is not None and not _KINDS.match(kind):
            raise ValueError(
                f"{path.name}:{line}: unknown docs-test marker {kind!r}; valid: 'skip (reason)', "
                "'raises NAME', 'continues', 'torchrun N'"
            )
        blocks.append(Block(path, line, match[1], kind))
    return blocks


@dataclass(frozen=True)
class Run:
    """What one subprocess runs: a block and the blocks it continues, as one script."""

    blocks: tuple[Block, ...]

    @property
    def last(self) -> Block:
        return self.blocks[-1]

    @property
    def script(self) -> str:
        return "\n".join(b.code for b in self.blocks)

    @property
    def processes(self) -> int | None:
        return self.blocks[0].processes


def plan_runs(blocks: list[Block]) -> dict[str, Run]:
    """For every block id, the run that checks it: a chain of ``continues`` runs once, as its last block.

    A block that a later block continues is the prefix of that block's
    script, so the longer run checks it too.
    """
    by_id: dict[str, Run] = {}
    chain: list[Block] = []
    for block in blocks:
        if block.continues:
            if not chain or chain[-1].path != block.path:
                raise ValueError(f"{block.id}: 'continues' needs a previous Python block on the same page")
            if chain[0].skip_reason or chain[0].processes or chain[-1].error:
                raise ValueError(f"{block.id}: cannot continue a skipped, distributed or failing block")
            chain.append(block)
        else:
            chain = [block]
        run = Run(tuple(chain))
        for member in chain:
            by_id[member.id] = run
    return by_id
