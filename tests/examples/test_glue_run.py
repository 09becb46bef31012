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
    from transformers import AutoConfig

    emb = AutoConfig.from_pretrained(full["model"]).vocab_size * HIDDEN  # word embeddings train offline
    for r in sst2_runs.values():
        assert r["source"] == "offline" and r["source_reason"] == "requested with --source offline"
        assert r["train_steps"] == 6 and r["train_loss"] == pytest.approx(r["train_loss"])  # finite
        assert 0.0 <= r["metrics"]["accuracy"] <= 1.0 and r["main_metric"] == "accuracy"
        assert r["peak_memory_kind"] == "cpu_rss_growth" and r["peak_memory_bytes"] >= 0
    # trainable sets: everything; the target weights + head + embeddings; the adapters + head + embeddings
    assert full["trainable_params"] == full["total_params"]
    assert galore["trainable_params"] == n_layers_targets * HIDDEN * HIDDEN + head + emb
    assert lora["trainable_params"] == n_layers_targets * 2 * RANK * HIDDEN + head + emb
    assert galore["hparams"]["train_embeddings"] and lora["hparams"]["train_embeddings"]
    # AdamW keeps two fp32 moments per trainable value plus one fp32 step tensor per parameter tensor
    n_tensors = sum(1 for _ in run_glue.load_model(full["model"], "sst2").parameters())
    assert full["optimizer_state_bytes"] == 8 * full["trainable_params"] + 4 * n_tensors
    assert lora["optimizer_state_bytes"] == 8 * lora["trainable_params"] + 4 * (5 + 2 * n_layers_targets)
    # GaLore: per 64x64 target two low-rank moments and the basis, each 64 x rank fp32; AdamW for head and
    # embeddings (5 tensors); one fp32 step per tensor
    low_rank = n_layers_targets * 3 * HIDDEN * RANK * 4
    assert galore["optimizer_state_bytes"] == low_rank + 8 * (head + emb) + 4 * (n_layers_targets + 5)
    assert galore["optimizer_state_bytes"] < 2 * lora["optimizer_state_bytes"]  # the bar
    assert galore["hparams"]["galore_scale"] == 2.0 and galore["hparams"]["update_proj_gap"] == run_glue.OFFLINE_GAP


@pytest.mark.slow
@pytest.mark.parametrize("task,keys", [
    ("mnli", {"accuracy", "accuracy_mm", "accuracy_mean"}),
    ("stsb", {"pearson", "spearmanr"}),
    ("mrpc", {"accuracy", "f1"}),
    ("cola", {"matthews_correlation"}),
])
def test_task_metrics(cache_dir, tmp_path, task, keys):
    # --source auto under the suite's HF_HUB_OFFLINE=1 picks the offline default and says why
    r = run_glue.main(_args(cache_dir, tmp_path, task, "galore", "--max_steps", "2", "--source", "auto"))
    assert r["source"] == "offline" and r["source_reason"] == "HF_HUB_OFFLINE is set, so the hub is not contacted"
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
    (["--task_name", "squad"], (r"`task_name`='squad' is not supported; choose one of cola, sst2, mrpc, stsb, "
                                r"qqp, mnli, qnli, rte, wnli")),
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


# (method, rank, task) -> the paper recipe's learning rate and batch (GaLore Table 7; Hu et al. Table 9)
PAPER_RECIPE_CASES = [
    ("galore", 4, "mrpc", 3e-5, 16), ("galore", 4, "cola", 3e-5, 32), ("galore", 8, "stsb", 3e-5, 16),
    ("galore", 8, "cola", 1e-5, 32), ("galore", 8, "mnli", 1e-5, 16), ("lora", 8, "sst2", 5e-4, 16),
    ("lora", 8, "mrpc", 4e-4, 16), ("full", 8, "rte", 2e-5, 16),
]


@pytest.mark.parametrize("method,rank,task,lr,batch", PAPER_RECIPE_CASES)
def test_paper_recipe(method, rank, task, lr, batch):
    args = run_glue.GlueArguments(task_name=task, method=method, rank=rank)
    values = run_glue.recipe_values(args, "paper")
    assert values["learning_rate"] == lr and values["per_device_train_batch_size"] == batch
    assert values["num_train_epochs"] == 30
    assert run_glue.galore_scale(args) == {4: 4.0, 8: 2.0}[rank]


def test_explicit_flags_win_over_the_recipe():
    assert run_glue.explicit_flags(["--learning_rate", "1e-3", "--max-steps=5", "sst2"]) == {"learning_rate", "max_steps"}


def test_probe_hub_reports_why(monkeypatch):
    import huggingface_hub

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    def unreachable(self, *args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", unreachable)
    assert run_glue.probe_hub() == (False, "the hub was unreachable (ConnectionError: Name or service not known)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run_glue.probe_hub() == (False, "HF_HUB_OFFLINE is set, so the hub is not contacted")


# ----------------------------------------------------------------------------- no hub
def _hub_down(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)


def test_source_hub_without_the_hub_is_one_error_line_naming_the_offline_source(monkeypatch, tmp_path, capsys):
    _hub_down(monkeypatch)
    argv = ["--task_name", "sst2", "--method", "galore", "--source", "hub", "--output_dir", str(tmp_path)]
    with pytest.raises(run_glue.HubUnreachableError, match=r"'nyu-mll/glue' \(sst2\) could not be loaded"):
        run_glue.main(argv)
    assert run_glue.cli(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("run_glue.py: error: `--source hub`: the dataset 'nyu-mll/glue' (sst2)")
    assert "ConnectionError: Couldn't reach 'nyu-mll/glue'" in lines[0] and "use `--source offline`" in lines[0]
