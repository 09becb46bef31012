"""TRL's ``SFTTrainer`` with the GaLore optim names, as a new user would run it (gradient accumulation 2).

Everything is built in code: a word-level tokenizer, a 2-layer LLaMA and a
32-sentence text dataset, so the test needs no download.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import hf_galore  # noqa: F401  (registers the GaLore optim names with the Trainer)

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "big", "small", "red", "blue"]
VOCAB = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _dataset():
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=g).tolist()) for _ in range(32)]
    return datasets.Dataset.from_dict({"text": texts})


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    return LlamaForCausalLM(config)


def _sft(tmp_path, model, optim: str, name: str) -> SFTTrainer:
    args = SFTConfig(
        output_dir=str(tmp_path / name),
        optim=optim,
        optim_target_modules=["attn", "mlp"],
        optim_args="rank=4, update_proj_gap=2",
        max_steps=3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        max_length=16,
        max_grad_norm=0.0,
        seed=0,
        data_seed=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=_dataset(), processing_class=_tokenizer())
    trainer.train()
    return trainer


@pytest.mark.parametrize("optim", ["galore_adamw", "galore_adamw_layerwise"])
def test_sfttrainer_trains_with_galore(tmp_path, optim):
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _sft(tmp_path, model, optim, "run")
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in logs)
    assert logs[0]["galore/refreshes"] == 14  # every projected weight got a basis
    unmoved = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert unmoved == []  # projected weights, embeddings and norms all trained


def test_sfttrainer_reuses_a_model_after_a_layerwise_run(tmp_path):
    model = _model()
    _sft(tmp_path, model, "galore_adamw_layerwise", "layerwise")
    fresh = copy.deepcopy(model)
    _sft(tmp_path, model, "galore_adamw", "reused")
    _sft(tmp_path, fresh, "galore_adamw", "fresh")
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
