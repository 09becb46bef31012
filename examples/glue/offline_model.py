"""Offline stand-in for ``FacebookAI/roberta-base``: a small RoBERTa, pre-trained locally.

The paper's claim is about *fine-tuning a pre-trained model* (GaLore, Zhao et al. 2024,
arXiv:2403.03507, Table 4). With no model hub, this module builds a miniature of that
path: a byte-level BPE tokenizer trained with ``tokenizers`` (the same family and special
tokens as RoBERTa's), a small ``RobertaForMaskedLM`` built from a config, and 200 steps of
masked-language-model pre-training on the unlabelled text of the offline GLUE tasks. The
result is saved with ``save_pretrained`` into a cache folder, so ``run_glue.py`` loads it
with ``from_pretrained`` exactly like the real checkpoint. Building costs about 20 s of CPU
time and is cached by its settings.

NOTE: such short pre-training does not teach the model what its words mean (a linear probe
on its frozen <s> features stays at chance on the offline SST-2, also after 1000 steps or
with 2 layers), so adapters on a frozen copy learn nothing; ``run_glue.py`` therefore trains
the word embeddings in every method on the offline default (``--train_embeddings``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from offline_glue import GENERATOR_VERSION, pretraining_corpus

ROBERTA_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, as in roberta-base


@dataclass(frozen=True)
class OfflineModelSpec:
    """Size of the offline encoder and of its pre-training (defaults: seconds on one CPU core)."""

    vocab_size: int = 1024  # BPE target; the tiny lexicon needs fewer, training stops early
    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 130  # 128 tokens + RoBERTa's padding offset of 2
    pretrain_steps: int = 200  # masked-LM steps; 0 keeps the random initialisation
    pretrain_batch_size: int = 64
    pretrain_lr: float = 2e-3
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "generator": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """``$HF_GALORE_CACHE`` or ``~/.cache/hf_galore``, then ``glue_offline``."""
    root = os.environ.get("HF_GALORE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_galore")
    return Path(root) / "glue_offline"


def train_tokenizer(texts: list[str], vocab_size: int):
    """A RoBERTa-style byte-level BPE tokenizer trained on ``texts``, as a transformers fast tokenizer."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=ROBERTA_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # "<s> A </s></s> B </s>": RoBERTa's single and pair templates.
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
        model_max_length=max(8, OfflineModelSpec.max_position_embeddings - 2),
    )


def _pretrain(model, tokenizer, texts: list[str], spec: OfflineModelSpec) -> float:
    """Masked-LM pre-training (15% masking, RoBERTa's 80/10/10 rule); returns the last loss."""
    from transformers import DataCollatorForLanguageModeling

    gen = torch.Generator().manual_seed(spec.seed)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, return_tensors="pt")
    enc = tokenizer(texts, truncation=True, max_length=spec.max_position_embeddings - 2)["input_ids"]
    opt = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, spec.pretrain_steps // 10)) * max(0.0, 1 - s / spec.pretrain_steps)
    )
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(spec.pretrain_steps):
        rows = torch.randint(len(enc), (spec.pretrain_batch_size,), generator=gen).tolist()
        torch.manual_seed(spec.seed * 100_003 + step)  # the collator's masking draws from the global RNG
        batch = collator([{"input_ids": enc[i]} for i in rows])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def build_offline_model(out_dir: str | os.PathLike, spec: OfflineModelSpec = OfflineModelSpec()) -> Path:
    """Train the tokenizer, build and pre-train the small RoBERTa, ``save_pretrained`` both to ``out_dir``."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    texts = pretraining_corpus(seed=spec.seed)
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        type_vocab_size=1,
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    torch.manual_seed(spec.seed)
    model = RobertaForMaskedLM(config)
    loss = _pretrain(model, tokenizer, texts, spec) if spec.pretrain_steps > 0 else float("nan")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "offline_spec.json").write_text(json.dumps({**asdict(spec), "final_mlm_loss": loss}, indent=2))
    return out


def ensure_offline_model(cache_dir: str | os.PathLike | None = None, spec: OfflineModelSpec = OfflineModelSpec()) -> Path:
    """Path of the cached offline model for ``spec``, building it first if needed (atomic rename)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"roberta-tiny-{spec.key()}"
    if (final / "offline_spec.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        build_offline_model(tmp, spec)
        try:
            tmp.rename(final)
        except OSError:  # built concurrently by another process: keep theirs
            if not (final / "offline_spec.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
