#!/usr/bin/env python
"""GaLore vs LoRA vs full fine-tuning on one GLUE task: same seeds, same budget, one table.

    # offline default (no hub needed): sst2, seeds 0 1 2, rank 8; a few minutes on 2 CPU cores
    python examples/glue/compare.py

    # another task, more seeds, rank 4; options after "--" go to every run_glue.py run
    python examples/glue/compare.py --task mrpc --seeds 0 1 2 3 4 --rank 4 -- --max_steps 500

    # the paper's setting on the hub (RoBERTa-base, Table 7 recipes; hours on a GPU)
    python examples/glue/compare.py --task mrpc --source hub --rank 4

Every (method, seed) is one ``run_glue.py`` run in its own forked process (Linux), so its
peak memory is its own. The output folder gets ``results.md`` (the table, also printed),
``results.json`` (every run) and ``metric_vs_memory.png``; ``runs/<method>-seed<k>/``
keeps each run's log and JSON. The task metric is reported as mean ± sample standard
deviation over seeds: a difference between methods smaller than those spreads is noise.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import run_glue
from offline_glue import GLUE_TASKS

MB = 2**20
METHOD_LABELS = {"full": "Full FT (AdamW)", "galore": "GaLore", "lora": "LoRA"}


# ------------------------------------------------------------------------------- isolation
def _child(conn, fn: Callable, args: tuple, log_path: str | None) -> None:
    try:
        if log_path is not None:  # keep the parent's progress bar clean; the log stays on disk
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            # Python-level streams too: they may be replaced objects (pytest, Jupyter) not writing to fd 1/2.
            sys.stdout = sys.stderr = os.fdopen(fd, "w", buffering=1)
        conn.send(("ok", fn(*args)))
    except run_glue.HubUnreachableError as exc:  # a one-line error, not a traceback to nest in the parent's
        conn.send(("hub", str(exc)))
    except BaseException:  # noqa: BLE001 - report everything to the parent, SystemExit from argparse too
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # skip the parent's atexit handlers and finalizers (pytest, Jupyter) in the child


def run_isolated(fn: Callable, args: tuple = (), *, isolate: bool = True, log_path: str | None = None) -> Any:
    """``fn(*args)`` in a forked child (fresh peak-memory accounting), or in this process."""
    if not isolate:
        return fn(*args)
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args, log_path))
    proc.start()
    send.close()
    try:
        status, payload = recv.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"the run died without a result (exit code {proc.exitcode}); see {log_path}") from None
    proc.join()
    if status == "hub":
        raise run_glue.HubUnreachableError(payload)
    if status == "error":
        raise RuntimeError(f"the run failed (log: {log_path}):\n{payload}")
    return payload


def default_isolate() -> bool:
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


# ------------------------------------------------------------------------------- stats
def mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_pm(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    mean, std = mean_std([v * scale for v in values])
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def summarize(runs: list[dict[str, Any]], methods: list[str]) -> dict[str, dict[str, Any]]:
    """Per method: the runs' metric values (x100), state/memory bytes and times."""
    out: dict[str, dict[str, Any]] = {}
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        out[method] = {
            "seeds": [r["seed"] for r in rs],
            "metric": [100 * r["main_metric_value"] for r in rs],
            "metrics": {k: [100 * r["metrics"][k] for r in rs] for k in rs[0]["metrics"]},
            "trainable_params": rs[0]["trainable_params"],
            "optimizer_state_mb": [r["optimizer_state_bytes"] / MB for r in rs],
            "weights_grads_states_mb": [r["weights_grads_states_bytes"] / MB for r in rs],
            "peak_memory_mb": [r["peak_memory_bytes"] / MB for r in rs],
            "train_seconds": [r["train_seconds"] for r in rs],
        }
    return out


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"CPU {model}, {os.cpu_count()} cores visible"


def markdown_table(summary: dict[str, dict[str, Any]], runs: list[dict[str, Any]]) -> str:
    first = runs[0]
    metric = first["main_metric"]
    peak_kind = "CUDA allocated" if first["peak_memory_kind"] == "cuda_allocated" else "RSS growth"
    lines = [
        (f"| method | {first['task']} {metric} (mean ± std) | trainable params | optimizer state MB "
         f"| weights+grads+states MB | peak memory MB ({peak_kind}) | train time s |"),
        "|---|---|---|---|---|---|---|",
    ]
    for method, s in summary.items():
        label = METHOD_LABELS[method]
        if method != "full":
            rank = next(r["rank"] for r in runs if r["method"] == method)
            label = f"{METHOD_LABELS[method]} r={rank}"
        lines.append(
            f"| {label} | {fmt_pm(s['metric'])} | {s['trainable_params']:,} | "
            f"{statistics.fmean(s['optimizer_state_mb']):.3f} | {statistics.fmean(s['weights_grads_states_mb']):.2f} | "
            f"{fmt_pm(s['peak_memory_mb'], digits=1)} | {fmt_pm(s['train_seconds'], digits=1)} |"
        )
    return "\n".join(lines)


def comparison_lines(summary: dict[str, dict[str, Any]]) -> list[str]:
    """GaLore against LoRA: metric difference with both spreads, and the optimizer-state ratio."""
    if "galore" not in summary or "lora" not in summary:
        return []
    g, lo = summary["galore"], summary["lora"]
    gm, gs = mean_std(g["metric"])
    lm, ls = mean_std(lo["metric"])
    state_ratio = statistics.fmean(g["optimizer_state_mb"]) / statistics.fmean(lo["optimizer_state_mb"])
    noise = max(gs, ls)
    verdict = "within noise" if abs(gm - lm) <= noise else ("better" if gm > lm else "worse")
    return [
        f"GaLore - LoRA: {gm - lm:+.2f} points (std over seeds: GaLore {gs:.2f}, LoRA {ls:.2f}; {verdict}).",
        f"Optimizer state GaLore / LoRA: {state_ratio:.2f}x (measured from the optimizers' tensors).",
    ]


def plot(summary: dict[str, dict[str, Any]], runs: list[dict[str, Any]], path: Path) -> None:
    """Task metric (mean ± std) against optimizer-state MB and peak memory MB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = runs[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    colors = {"full": "tab:gray", "galore": "tab:blue", "lora": "tab:orange"}
    for ax, key, xlabel in (
        (axes[0], "optimizer_state_mb", "optimizer state (MB)"),
        (axes[1], "peak_memory_mb", "peak memory (MB, " + first["peak_memory_kind"].replace("_", " ") + ")"),
    ):
        for method, s in summary.items():
            xm, xs = mean_std(s[key])
            ym, ys = mean_std(s["metric"])
            ax.errorbar([xm], [ym], xerr=[xs], yerr=[ys], fmt="o", capsize=4, color=colors[method],
                        label=METHOD_LABELS[method])
            ax.annotate(METHOD_LABELS[method], (xm, ym), textcoords="offset points", xytext=(6, 6), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{first['task']} {first['main_metric']} (x100)")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"GLUE {first['task']} ({first['source']}): metric vs memory, {len(summary[next(iter(summary))]['seeds'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------- driver
def _prepare_offline(cache_dir: str | None, pretrain_steps: int | None) -> str:
    import torch
    from offline_model import OfflineModelSpec, ensure_offline_model

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # as run_glue does for the offline default
    spec = OfflineModelSpec() if pretrain_steps is None else OfflineModelSpec(pretrain_steps=pretrain_steps)
    return str(ensure_offline_model(cache_dir, spec))


def run_comparison(
    task: str = "sst2",
    methods: list[str] | tuple[str, ...] = ("full", "galore", "lora"),
    seeds: list[int] | tuple[int, ...] = (0, 1, 2),
    *,
    rank: int = 8,
    source: str = "auto",
    output_dir: str | os.PathLike = "outputs/glue_compare",
    extra_args: list[str] | None = None,
    isolate: bool | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every (seed, method), write results.md / results.json / metric_vs_memory.png; return them."""
    from tqdm import tqdm  # plain tqdm: also fine in notebooks without ipywidgets

    run_glue.check_choice("task", task, GLUE_TASKS)
    for method in methods:
        run_glue.check_choice("methods", method, run_glue.METHODS)
    isolate = default_isolate() if isolate is None else isolate
    extra = list(extra_args or [])
    out = Path(output_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)

    # Decide hub vs offline once for all runs (the same choice for every method and seed).
    if source == "auto":
        reachable, why = run_glue.probe_hub()
        source = "hub" if reachable else "offline"
    else:
        why = f"requested with --source {source}"
    print(f"Data and model: {'Hugging Face Hub' if source == 'hub' else 'offline default'} ({why})", flush=True)
    if source == "offline":
        # Build the small pre-trained model once, before the timed runs (cached on disk).
        cache = extra[extra.index("--offline_cache_dir") + 1] if "--offline_cache_dir" in extra else None
        steps = int(extra[extra.index("--offline_pretrain_steps") + 1]) if "--offline_pretrain_steps" in extra else None
        print("Preparing the offline default model (built once, then cached) ...", flush=True)
        path = run_isolated(_prepare_offline, (cache, steps), isolate=isolate,
                            log_path=str(out / "prepare.log") if isolate else None)
        print(f"  {path}", flush=True)

    runs: list[dict[str, Any]] = []
    jobs = [(seed, method) for seed in seeds for method in methods]  # interleaved: partial results stay comparable
    start = time.perf_counter()
    bar = tqdm(jobs, desc=f"GLUE {task}", unit="run", disable=not progress)
    for seed, method in bar:
        run_dir = out / "runs" / f"{method}-seed{seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        argv = ["--task_name", task, "--method", method, "--seed", str(seed), "--rank", str(rank),
                "--source", source, "--output_dir", str(run_dir), "--disable_tqdm", "true", *extra]
        bar.set_postfix_str(f"{method} seed {seed}")
        result = run_isolated(run_glue.main, (argv,), isolate=isolate,
                              log_path=str(run_dir / "log.txt") if isolate else None)
        runs.append(result)
        bar.write(f"  {method:<6} seed {seed}: {result['main_metric']} {100 * result['main_metric_value']:.2f}, "
                  f"{result['train_seconds']:.1f} s")
    bar.close()

    summary = summarize(runs, list(methods))
    first = runs[0]
    settings = (
        f"Task {task} ({source}: {why}); model {first['model']}; "
        f"seeds {list(seeds)}; rank {rank}; " + "; ".join(
            f"{m}: lr {next(r for r in runs if r['method'] == m)['hparams']['learning_rate']:g}" for m in summary)
        + f"; batch {first['hparams']['batch_size']}; max_steps {first['hparams']['max_steps']} "
        f"(epochs {first['hparams']['num_train_epochs']:g} if max_steps <= 0); {hardware()}, "
        f"torch threads per run {first.get('torch_threads', '?')}; torch {__import__('torch').__version__}; "
        f"total wall time {time.perf_counter() - start:.0f} s."
    )
    table = markdown_table(summary, runs)
    extra_lines = comparison_lines(summary)
    text = "\n".join([table, "", *extra_lines, "", settings]) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))
    plot(summary, runs, out / "metric_vs_memory.png")
    return {"table": table, "text": text, "summary": summary, "runs": runs, "output_dir": str(out)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Options after a lone '--' are passed to every run_glue.py run (see run_glue.py --help), "
        "e.g. -- --max_steps 500 --learning_rate 1e-3.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", default="sst2", help=f"GLUE task: {', '.join(GLUE_TASKS)}")
    p.add_argument("--methods", nargs="+", default=list(run_glue.METHODS), help="methods to compare")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one run per method and seed")
    p.add_argument("--rank", type=int, default=8, help="GaLore and LoRA rank")
    p.add_argument("--source", choices=["auto", "hub", "offline"], default="auto",
                   help="auto: the hub if reachable, else the offline default")
    p.add_argument("--output_dir", default="outputs/glue_compare", help="where the table, JSON and plot go")
    p.add_argument("--no_isolate", action="store_true", help="run in this process (peak memory then mixes runs)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    try:
        result = run_comparison(args.task, args.methods, args.seeds, rank=args.rank, source=args.source,
                                output_dir=args.output_dir, extra_args=extra,
                                isolate=False if args.no_isolate else None)
    except (ValueError, run_glue.HubUnreachableError) as exc:  # bad task/method (valid ones listed), no hub
        raise SystemExit(f"error: {exc}") from None
    print()
    print(result["text"])
    print(f"Written: {Path(result['output_dir']) / 'results.md'}, results.json, metric_vs_memory.png")
    return result


if __name__ == "__main__":
    main()
