"""Pretraining data: C4 streamed with the paper's tokenizer, or an offline corpus shipped with Python.

Real path (GaLore, arXiv:2403.03507, §5.1 and App. C.1): documents of
``allenai/c4`` ("en", streamed) tokenized with the T5 tokenizer (``t5-base``),
each truncated / padded to ``max_length`` tokens; padding is masked out of the
loss. This is what jiaweizzhao/GaLore ``torchrun_main.py`` does.

Offline default: the source files of the running Python's standard library
(found through ``sysconfig``), split by file into train and held-out sets, a
byte-level BPE tokenizer trained on the train files with ``tokenizers``, and
the token stream packed into fixed-length blocks. Everything is cached under
``cache_dir`` keyed by the corpus fingerprint, so the second run starts in
about a second. Sampling is a pure function of ``(seed, step)``, which is
what makes checkpoint resume bit-exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

#: Special tokens of the offline tokenizer, at the ids the paper's T5 tokenizer uses (pad 0, eos 1, unk 2),
#: so the model configs (``bos_token_id`` 0, ``eos_token_id`` 1) mean the same thing on both paths.
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
PAD_ID, EOS_ID = 0, 1
IGNORE_INDEX = -100

#: The paper's tokenizer (GaLore §5.1: "the T5 tokenizer"; the repository loads ``t5-base``).
C4_TOKENIZER = "t5-base"


class HubUnreachableError(RuntimeError):
    """``--dataset c4`` could not reach the Hugging Face Hub: one line that names what and offers the offline path.

    Without it, an offline machine gets transformers' and huggingface_hub's
    chained tracebacks (three exceptions deep) for the tokenizer, or
    ``datasets``' for the stream.
    """


def _network_errors() -> tuple[type[BaseException], ...]:
    """What "no hub" looks like: OSError (ConnectionError, transformers' OSError) and the HTTP clients' errors."""
    errors: list[type[BaseException]] = [OSError]
    for module, name in (("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def hub_unreachable(what: str, exc: BaseException) -> HubUnreachableError:
    """The one-line error for ``what`` (a repo on the hub) failing to load with ``exc``."""
    reason = " ".join(str(exc).split())[:200] or "no message"
    return HubUnreachableError(
        f"`--dataset c4` needs the Hugging Face Hub for {what}, and the hub is unreachable "
        f"({type(exc).__name__}: {reason}); use the offline corpus instead (`--dataset offline`, the default), "
        "or run where huggingface.co is reachable"
    )


def default_cache_dir() -> Path:
    """``$HF_GALORE_CACHE`` or ``~/.cache/hf_galore/c4_pretrain``."""
    root = os.environ.get("HF_GALORE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "hf_galore" / "c4_pretrain"


# ---------------------------------------------------------------------------- offline corpus
def stdlib_files(max_chars: int | None = None) -> list[Path]:
    """The standard library's ``.py`` files in a fixed order (sorted by relative path).

    ``site-packages`` is skipped so the corpus is the same on every machine
    with the same Python version. ``max_chars`` keeps a deterministic prefix.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (f for f in root.rglob("*.py") if "site-packages" not in f.parts and f.is_file()),
        key=lambda f: f.relative_to(root).as_posix(),
    )
    if max_chars is None:
        return files
    kept, total = [], 0
    for f in files:
        size = f.stat().st_size
        if total + size > max_chars:
            break
        kept.append(f)
        total += size
    return kept


def is_heldout(relative_path: str, heldout_percent: float) -> bool:
    """File-level split by a hash of the path: no document is in both sets, whatever the file order."""
    bucket = int(hashlib.sha1(relative_path.encode()).hexdigest()[:8], 16) % 10_000
    return bucket < heldout_percent * 100


def read_corpus(max_chars: int | None, heldout_percent: float) -> tuple[list[str], list[str], str]:
    """(train documents, held-out documents, fingerprint) of the stdlib corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, heldout = [], []
    digest = hashlib.sha1()
    for f in stdlib_files(max_chars):
        rel = f.relative_to(root).as_posix()
        text = f.read_text(encoding="utf-8", errors="replace")
        digest.update(rel.encode())
        digest.update(str(len(text)).encode())
        (heldout if is_heldout(rel, heldout_percent) else train).append(text)
    digest.update(f"{heldout_percent}".encode())
    return train, heldout, digest.hexdigest()[:12]


def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (the GPT-2 scheme: no unknown characters) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def pack(documents: list[list[int]], block_size: int) -> torch.Tensor:
    """Concatenate documents, each followed by ``</s>``, and cut into full ``block_size`` blocks.

    The tail that does not fill a block is dropped (standard packing, as in
    the Hugging Face ``run_clm.py`` example).
    """
    stream: list[int] = []
    for ids in documents:
        stream.extend(ids)
        stream.append(EOS_ID)
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise ValueError(
            f"the corpus has {len(stream)} tokens, fewer than one block of `max_length`={block_size}; "
            "raise `max_corpus_chars` or lower `max_length`"
        )
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.int32).view(n_blocks, block_size)


@dataclass
class PackedCorpus:
    """Fixed-length blocks ready for causal-LM training, plus the tokenizer that made them."""

    train: torch.Tensor  # (n_train, block_size) int32
    heldout: torch.Tensor  # (n_heldout, block_size) int32
    vocab_size: int
    tokenizer_path: Path

    @property
    def block_size(self) -> int:
        return int(self.train.shape[1])


def build_offline_corpus(
    block_size: int,
    vocab_size: int = 8192,
    max_corpus_chars: int | None = 8_000_000,
    heldout_percent: float = 3.0,
    cache_dir: str | Path | None = None,
) -> PackedCorpus:
    """Tokenizer + packed train / held-out blocks of the stdlib corpus, cached on disk."""
    train_docs, heldout_docs, fingerprint = read_corpus(max_corpus_chars, heldout_percent)
    if not heldout_docs:
        raise ValueError(f"`heldout_percent`={heldout_percent!r} left no held-out file; raise it")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = f"stdlib-{fingerprint}-v{vocab_size}"
    tok_path = cache / f"{key}-tokenizer.json"
    blocks_path = cache / f"{key}-b{block_size}.pt"
    if blocks_path.exists() and tok_path.exists():
        saved = torch.load(blocks_path, weights_only=True)
        return PackedCorpus(saved["train"], saved["heldout"], int(saved["vocab_size"]), tok_path)

    from tokenizers import Tokenizer

    cache.mkdir(parents=True, exist_ok=True)
    if tok_path.exists():
        tokenizer = Tokenizer.from_file(str(tok_path))
    else:
        tokenizer = train_bpe_tokenizer(train_docs, vocab_size)
        tmp = tok_path.with_suffix(f".tmp{os.getpid()}")
        tokenizer.save(str(tmp))
        os.replace(tmp, tok_path)  # atomic: concurrent ranks never read half a file
    encode = lambda docs: [e.ids for e in tokenizer.encode_batch(docs)]
    train = pack(encode(train_docs), block_size)
    heldout = pack(encode(heldout_docs), block_size)
    corpus = PackedCorpus(train, heldout, tokenizer.get_vocab_size(), tok_path)
    tmp = blocks_path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"train": train, "heldout": heldout, "vocab_size": corpus.vocab_size}, tmp)
    os.replace(tmp, blocks_path)
    return corpus


def offline_batches(
    blocks: torch.Tensor, batch_size: int, seed: int, start_step: int, micro_steps: int, rank: int, world: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches for this rank; batch ``k`` depends only on ``(seed, k)``.

    Each optimizer step consumes ``micro_steps`` micro-batches per rank.
    Blocks are visited in a seeded permutation, one permutation per epoch;
    rank ``r`` takes every ``world``-th slot, so ranks never share a block.
    Starting at ``start_step`` (resume) yields exactly what an uninterrupted
    run would have seen from there.
    """
    n = blocks.shape[0]
    per_step = batch_size * micro_steps * world
    if per_step > n:
        raise ValueError(f"one optimizer step needs {per_step} blocks but the training set has only {n}")
    k = start_step * micro_steps
    perm_epoch, perm = -1, None
    while True:
        idx = []
        for row in range(batch_size):
            slot = (k * world + rank) * batch_size + row  # global position in the block order
            epoch, pos = divmod(slot, n)
            if epoch != perm_epoch:
                gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                perm_epoch, perm = epoch, torch.randperm(n, generator=gen)
            idx.append(int(perm[pos]))
        ids = blocks[idx].long()
        yield {"input_ids": ids, "labels": ids.clone()}
        k += 1


# ---------------------------------------------------------------------------- C4 (the paper's data)
def c4_batches(
    split: str, tokenizer, max_length: int, batch_size: int, seed: int, skip_examples: int, rank: int, world: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches of streamed C4 as in GaLore's ``torchrun_main.py``: truncate / pad, pad masked.

    Needs network access to the Hugging Face Hub. ``skip_examples`` (per
    rank) resumes the stream where a checkpoint left it.
    """
    import datasets

    try:
        stream = datasets.load_dataset("allenai/c4", "en", split=split, streaming=True)
    except _network_errors() as exc:
        raise hub_unreachable(f"the dataset 'allenai/c4' ({split})", exc) from None
    if split == "train":
        stream = stream.shuffle(seed=seed)
    if world > 1:
        stream = datasets.distributed.split_dataset_by_node(stream, rank=rank, world_size=world)
    if skip_examples:
        stream = stream.skip(skip_examples)
    texts: list[str] = []
    examples = iter(stream)
    while True:
        try:
            example = next(examples)
        except StopIteration:
            break
        except _network_errors() as exc:  # the stream reads shards over the network as it goes
            raise hub_unreachable(f"the dataset 'allenai/c4' ({split})", exc) from None
        texts.append(example["text"])
        if len(texts) == batch_size:
            enc = tokenizer(texts, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
            ids = enc["input_ids"]
            labels = ids.clone()
            labels[ids == tokenizer.pad_token_id] = IGNORE_INDEX
            yield {"input_ids": ids, "labels": labels, "attention_mask": enc["attention_mask"]}
            texts = []


def c4_tokenizer():
    """The paper's tokenizer, ``t5-base`` (sentencepiece, 32k pieces + 100 sentinels)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(C4_TOKENIZER, model_max_length=int(1e30))
    except _network_errors() as exc:
        raise hub_unreachable(f"the T5 tokenizer {C4_TOKENIZER!r}", exc) from None


def corpus_summary(corpus: PackedCorpus) -> dict[str, int]:
    """Sizes for the log line and the benchmark table."""
    return {
        "train_blocks": int(corpus.train.shape[0]),
        "heldout_blocks": int(corpus.heldout.shape[0]),
        "block_size": corpus.block_size,
        "vocab_size": corpus.vocab_size,
        "train_tokens": int(corpus.train.numel()),
    }


__all__ = [
    "C4_TOKENIZER",
    "EOS_ID",
    "IGNORE_INDEX",
    "PAD_ID",
    "HubUnreachableError",
    "PackedCorpus",
    "build_offline_corpus",
    "c4_batches",
    "c4_tokenizer",
    "corpus_summary",
    "default_cache_dir",
    "offline_batches",
    "pack",
    "read_corpus",
    "stdlib_files",
    "train_bpe_tokenizer",
]

if __name__ == "__main__":  # builds (and caches) the default corpus, prints its sizes
    c = build_offline_corpus(256)
    print(json.dumps(corpus_summary(c)))
