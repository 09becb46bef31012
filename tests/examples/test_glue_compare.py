"""examples/glue/compare.py and the compare_lora.ipynb notebook on the offline default (tiny budget)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("datasets")
pytest.importorskip("evaluate")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

GLUE_DIR = Path(__file__).resolve().parents[2] / "examples" / "glue"
sys.path.insert(0, str(GLUE_DIR))
import compare
import offline_model

PRETRAIN_STEPS = 20
TINY = ["--offline_pretrain_steps", str(PRETRAIN_STEPS), "--max_steps", "4", "--per_device_train_batch_size", "8",
        "--max_train_samples", "64", "--max_eval_samples", "32", "--offline_train_size", "64"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("glue_offline")
    offline_model.ensure_offline_model(path, offline_model.OfflineModelSpec(pretrain_steps=PRETRAIN_STEPS))
    return str(path)


def _fake_run(method: str, seed: int, value: float, state: int) -> dict:
    return {"task": "sst2", "method": method, "seed": seed, "source": "offline", "source_reason": "test",
            "model": "m", "rank": None if method == "full" else 8, "metrics": {"accuracy": value},
            "main_metric": "accuracy", "main_metric_value": value, "trainable_params": 10 + state,
            "total_params": 100, "optimizer_state_bytes": state * 2**20, "weights_grads_states_bytes": 3 * 2**20,
            "peak_memory_bytes": 5 * 2**20, "peak_memory_kind": "cpu_rss_growth", "train_seconds": 1.0 + seed,
            "train_steps": 4, "train_loss": 0.5, "hparams": {"learning_rate": 1e-3, "batch_size": 8, "max_steps": 4,
                                                           "num_train_epochs": 1.0}}


def test_summary_table_and_verdict():
    runs = [_fake_run("galore", s, v, 1) for s, v in enumerate([0.80, 0.82, 0.84])]
    runs += [_fake_run("lora", s, v, 2) for s, v in enumerate([0.81, 0.83, 0.85])]
    summary = compare.summarize(runs, ["full", "galore", "lora"])
    assert list(summary) == ["galore", "lora"]  # methods without runs are left out
    assert summary["galore"]["metric"] == pytest.approx([80.0, 82.0, 84.0])
    table = compare.markdown_table(summary, runs)
    assert "| GaLore r=8 | 82.00 ± 2.00 | 11 | 1.000 | 3.00 | 5.0 ± 0.0 | 2.0 ± 1.0 |" in table
    lines = compare.comparison_lines(summary)
    assert lines[0].startswith("GaLore - LoRA: -1.00 points") and "within noise" in lines[0]
    assert "0.50x" in lines[1]


def test_bad_task_and_method_list_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="`task`='squad' is not supported; choose one of cola, sst2, mrpc"):
        compare.run_comparison("squad", output_dir=tmp_path)
    with pytest.raises(ValueError, match="`methods`='adapter' is not supported; choose one of full, galore, lora"):
        compare.run_comparison("sst2", ["galore", "adapter"], output_dir=tmp_path)


@pytest.mark.slow
def test_compare_forks_runs_and_writes_outputs(cache_dir, tmp_path):
    result = compare.run_comparison(
        "sst2", ["galore", "lora"], [0, 1], source="offline", output_dir=tmp_path, progress=False,
        extra_args=["--offline_cache_dir", cache_dir, *TINY],
    )
    assert [(r["method"], r["seed"]) for r in result["runs"]] == [("galore", 0), ("lora", 0), ("galore", 1), ("lora", 1)]
    assert (tmp_path / "results.md").read_text() == result["text"]
    assert result["table"].count("\n") == 3  # header, rule, two methods
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["runs"]) == 4 and set(saved["summary"]) == {"galore", "lora"}
    assert (tmp_path / "metric_vs_memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "runs" / "lora-seed1" / "log.txt").stat().st_size > 0  # each forked run's log
    # same seed, same data order: the two seeds' galore runs differ, the reports are per run
    assert result["runs"][0]["train_loss"] != result["runs"][2]["train_loss"]


@pytest.mark.slow
def test_notebook_executes(cache_dir, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(GLUE_DIR / "compare_lora.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "outputs must be stripped in git"
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    params[0].source = (
        'TASK = "sst2"\nMETHODS = ["full", "galore", "lora"]\nSEEDS = [0]\nRANK = 8\nSOURCE = "offline"\n'
        f"OUTPUT_DIR = {str(tmp_path / 'out')!r}\nEXTRA_ARGS = {['--offline_cache_dir', cache_dir, *TINY]!r}\n"
    )
    nbclient.NotebookClient(nb, timeout=150, kernel_name="python3",
                            resources={"metadata": {"path": str(GLUE_DIR)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert text.count("seed 0:") >= 3  # the per-run listing printed one line per method
    assert (tmp_path / "out" / "results.md").exists() and (tmp_path / "out" / "metric_vs_memory.png").exists()


def test_readme_quick_start_says_it_is_smoke_scale():
    """Issue 14: the headline must not read as a GLUE reproduction; the paper's setting is `--source hub`."""
    readme = (GLUE_DIR.parents[1] / "README.md").read_text(encoding="utf-8")
    heading = next(line for line in readme.splitlines() if line.startswith("## Quick start"))
    assert "smoke scale" in heading and "not GLUE scores" in heading
    section = readme.split(heading, 1)[1].split("\n## ", 1)[0]
    assert "--source offline" in section and "--source hub" in section
    intro = section.split("```", 1)[0]  # before the command: what the numbers are, and where the real run is
    assert "--source hub" in intro and "generated" in intro


def test_source_hub_without_the_hub_is_one_error_line_not_two_tracebacks(monkeypatch, tmp_path):
    """The forked run's failure used to arrive as its traceback inside the parent's RuntimeError."""
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)  # the forked runs inherit it
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--source", "hub", "--methods", "galore", "--seeds", "0", "--output_dir", str(tmp_path)])
    message = str(exit_info.value.code)
    assert message.startswith("error: `--source hub`: the dataset 'nyu-mll/glue' (sst2) could not be loaded")
    assert "use `--source offline`" in message
    assert "\n" not in message and "Traceback" not in message
