"""examples/glue/run_glue.py on the offline default: each method trains, measures and reports; bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("datasets")
pytest.importorskip("evaluate")
pytest.importorskip("peft")

GLUE_DIR = Path(__file__).resolve().parents[2] / "examples" / "glue"
sys.path.insert(0, str(GLUE_DIR))
import offline_model
import run_glue

PRETRAIN_STEPS = 20  # a briefly pre-trained model is enough to check the plumbing
HIDDEN, LAYERS, RANK = 64, 4, 8


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("glue_offline")
    offline_model.ensure_offline_model(path, offline_model.OfflineModelSpec(pretrain_steps=PRETRAIN_STEPS))
    return str(path.parent / path.name)


def _args(cache_dir: str, out: Path, task: str, method: str, *extra: str) -> list[str]:
    return ["--task_name", task, "--method", method, "--source", "offline", "--offline_cache_dir", cache_dir,
            "--offline_pretrain_steps", str(PRETRAIN_STEPS), "--output_dir", str(out), "--max_steps", "6",
            "--per_device_train_batch_size", "8", "--max_train_samples", "96", "--max_eval_samples", "40",
            "--offline_train_size", "96", "--disable_tqdm", "true", "--rank", str(RANK), *extra]


@pytest.fixture(scope="module")
def sst2_runs(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return {m: run_glue.main(_args(cache_dir, out / m, "sst2", m)) for m in run_glue.METHODS}


@pytest.mark.slow
def test_each_method_trains_and_reports(sst2_runs, tmp_path):
    n_layers_targets = LAYERS * 2  # query and value in every layer
    head = HIDDEN * HIDDEN + HIDDEN + HIDDEN * 2 + 2  # classifier.dense + classifier.out_proj
    full, galore, lora = sst2_runs["full"], sst2_runs["galore"], sst2_runs["lora"]
    for r in sst2_runs.values():
        assert r["source"] == "offline" and r["source_reason"] == "requested with --source offline"
        assert r["train_steps"] == 6 and r["train_loss"] == pytest.approx(r["train_loss"])  # finite
        assert 0.0 <= r["metrics"]["accuracy"] <= 1.0 and r["main_metric"] == "accuracy"
        assert r["peak_memory_kind"] == "cpu_rss_growth" and r["peak_memory_bytes"] >= 0
    # trainable sets: everything; the target weights + head; the adapters + head
    assert full["trainable_params"] == full["total_params"]
    assert galore["trainable_params"] == n_layers_targets * HIDDEN * HIDDEN + head
    assert lora["trainable_params"] == n_layers_targets * 2 * RANK * HIDDEN + head
    # AdamW keeps two fp32 moments per trainable value plus one fp32 step tensor per parameter tensor
    n_tensors = sum(1 for _ in run_glue.load_model(full["model"], "sst2").parameters())
    assert full["optimizer_state_bytes"] == 8 * full["trainable_params"] + 4 * n_tensors
    # GaLore: low-rank moments + basis for the targets; within 2x of LoRA's state, far below full AdamW's
    assert galore["optimizer_state_bytes"] < 2 * lora["optimizer_state_bytes"]
    assert galore["optimizer_state_bytes"] < full["optimizer_state_bytes"] / 10
    assert galore["hparams"]["galore_scale"] == 2.0 and galore["hparams"]["update_proj_gap"] == run_glue.OFFLINE_GAP


@pytest.mark.slow
@pytest.mark.parametrize("task,keys", [
    ("mnli", {"accuracy", "accuracy_mm", "accuracy_mean"}),
    ("stsb", {"pearson", "spearmanr"}),
    ("mrpc", {"accuracy", "f1"}),
    ("cola", {"matthews_correlation"}),
])
def test_task_metrics(cache_dir, tmp_path, task, keys):
    r = run_glue.main(_args(cache_dir, tmp_path, task, "galore", "--max_steps", "2"))
    assert set(r["metrics"]) == keys
    assert r["main_metric"] == run_glue.MAIN_METRIC[task]
    saved = json.loads((tmp_path / "glue_results.json").read_text())
    assert saved["metrics"] == r["metrics"] and saved["task"] == task


# ----------------------------------------------------------------------------- bad input
def _tiny_classifier():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=20, num_labels=2)
    return RobertaForSequenceClassification(config)


@pytest.mark.parametrize("argv,pattern", [
    (["--task_name", "squad"], r"`task_name`='squad' is not supported; choose one of cola, sst2, mrpc, stsb, qqp, "
                               r"mnli, qnli, rte, wnli"),
    (["--method", "adapter"], r"`method`='adapter' is not supported; choose one of full, galore, lora"),
])
def test_unknown_task_or_method_lists_valid_ones(argv, pattern, tmp_path):
    with pytest.raises(ValueError, match=pattern):
        run_glue.parse_args([*argv, "--output_dir", str(tmp_path)])


def test_absent_target_modules_list_existing_names():
    with pytest.raises(ValueError, match=r"\['q_proj', 'v_proj'\] match no linear layer of RobertaForSequenceClassification"
                                         r".*'dense', 'intermediate.dense', 'key', 'out_proj'.*'query'.*'value'"):
        run_glue.check_target_modules(_tiny_classifier(), ["q_proj", "v_proj", "query"])
    run_glue.check_target_modules(_tiny_classifier(), ["query", "attention.self.value"])  # suffixes match


def test_model_without_classification_head_names_its_modules(tmp_path):
    from transformers import RobertaConfig, RobertaForMaskedLM, ViTConfig

    mlm = RobertaForMaskedLM(RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match=r"RobertaForMaskedLM has no sequence-classification head.*\['roberta', 'lm_head'\]"):
        run_glue.check_sequence_classifier(mlm)
    ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"is a 'vit' model, which has no sequence-classification head in "
                                         r"transformers; model types with one: .*roberta"):
        run_glue.load_model(str(tmp_path), "sst2")


def test_trainable_sets_match_between_lora_and_galore():
    args = run_glue.GlueArguments(method="galore", rank=2)
    galore = run_glue.apply_method(_tiny_classifier(), args, train_embeddings=True)
    names = sorted(n for n, p in galore.named_parameters() if p.requires_grad)
    assert names == ["classifier.dense.bias", "classifier.dense.weight", "classifier.out_proj.bias",
                     "classifier.out_proj.weight", "roberta.embeddings.word_embeddings.weight",
                     "roberta.encoder.layer.0.attention.self.query.weight",
                     "roberta.encoder.layer.0.attention.self.value.weight"]
    lora = run_glue.apply_method(_tiny_classifier(), run_glue.GlueArguments(method="lora", rank=2), train_embeddings=True)
    lora_names = sorted(n for n, p in lora.named_parameters() if p.requires_grad)
    saved = "base_model.model.{}.modules_to_save.default.{}"
    assert lora_names == [
        saved.format("classifier", "dense.bias"), saved.format("classifier", "dense.weight"),
        saved.format("classifier", "out_proj.bias"), saved.format("classifier", "out_proj.weight"),
        saved.format("roberta.embeddings.word_embeddings", "weight"),
        *[f"base_model.model.roberta.encoder.layer.0.attention.self.{m}.lora_{ab}.default.weight"
          for m in ("query", "value") for ab in ("A", "B")],
    ]
