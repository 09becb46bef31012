#!/usr/bin/env python
"""Fine-tune a model on a GLUE task with GaLore, LoRA or full fine-tuning.

The GaLore paper (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient
Low-Rank Projection", ICML, arXiv:2403.03507, Table 4) fine-tunes RoBERTa-base on GLUE
and finds GaLore at rank 4/8 on par with LoRA at the same rank, at similar memory. This
script runs that comparison one task and one method at a time:

    # the paper's setting (needs the Hugging Face Hub): RoBERTa-base, rank 4, MRPC
    python examples/glue/run_glue.py --task_name mrpc --method galore --rank 4 --source hub

    # no hub? the same script falls back to an offline default (or ask for it)
    python examples/glue/run_glue.py --task_name sst2 --method lora --source offline

Methods (the same targets, ``--target_modules query value``, and the same rank):
  galore  ``TrainingArguments(optim="galore_adamw", optim_target_modules=..., optim_args=...)``
          after ``import hf_galore``; the target weights train at full rank with
          low-rank optimizer states, the classification head with plain AdamW.
  lora    ``peft.LoraConfig`` on the same modules (Hu et al. 2022, "LoRA", ICLR).
  full    every parameter with AdamW.

``--source auto`` (the default) uses ``datasets.load_dataset("nyu-mll/glue", task)`` and
``from_pretrained(model_name_or_path)`` when the hub answers, and otherwise the offline
default: GLUE-format generated data (``offline_glue.py``) and a small RoBERTa pre-trained
locally (``offline_model.py``). The run prints which one it used and why.

``--recipe auto`` fills the learning rate, batch size and length of training that were not
given on the command line: the paper's per-task values on the hub (Table 7 for GaLore,
Hu et al.'s Table 9 for LoRA), a short CPU budget on the offline default.

The run ends with one JSON file, ``<output_dir>/glue_results.json``: the task metric(s),
trainable parameters, optimizer-state bytes, peak memory and wall time (``compare.py``
reads it).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the offline helpers live next to this script
    sys.path.insert(0, str(HERE))

from offline_glue import (
    GLUE_TASKS,
    LABEL_NAMES,
    TASK_TO_KEYS,
    glue_splits,
    load_offline_glue,
)

METHODS = ("full", "galore", "lora")
METRIC_PATH = str(HERE / "glue_metric")

# The number each paper table reports per task (GaLore Table 4 as defined by Q-GaLore:
# MCC for CoLA, Pearson for STS-B, F1 for MRPC, matched/mismatched mean for MNLI).
MAIN_METRIC = {
    "cola": "matthews_correlation", "sst2": "accuracy", "mrpc": "f1", "stsb": "pearson", "qqp": "accuracy",
    "mnli": "accuracy_mean", "qnli": "accuracy", "rte": "accuracy", "wnli": "accuracy",
}

# GaLore paper, Table 7 (App. D.1): learning rate per task for rank 4 (scale 4) and rank 8 (scale 2), batch.
PAPER_GALORE_LR = {
    4: {"cola": 3e-5, "stsb": 1e-5, "mrpc": 3e-5, "rte": 1e-5, "sst2": 1e-5, "mnli": 1e-5, "qnli": 1e-5, "qqp": 1e-5},
    8: {"cola": 1e-5, "stsb": 3e-5, "mrpc": 2e-5, "rte": 2e-5, "sst2": 2e-5, "mnli": 1e-5, "qnli": 1e-5, "qqp": 2e-5},
}
PAPER_GALORE_SCALE = {4: 4.0, 8: 2.0}
PAPER_BATCH = {"cola": 32}  # every other task: 16
PAPER_EPOCHS = 30  # "every task trains for 30 epochs at max length 512"
PAPER_GAP = 500  # the paper's only public GLUE command (MRPC, r = 4) uses update_proj_gap 500
# LoRA, RoBERTa-base (Hu et al. 2022, Table 9): learning rate per task, alpha 8 at r 8 on query/value.
LORA_PAPER_LR = {"mnli": 5e-4, "sst2": 5e-4, "mrpc": 4e-4, "cola": 4e-4, "qnli": 4e-4, "qqp": 5e-4,
                 "rte": 5e-4, "stsb": 4e-4}
FULL_FT_LR = 2e-5  # RoBERTa (Liu et al. 2019) searched {1e-5, 2e-5, 3e-5} for GLUE fine-tuning
# Offline default: a CPU budget of a few hundred steps. The learning rates come from short single-seed
# checks on the offline sst2 (each learnt; adapter methods usually want a larger lr than full
# fine-tuning), not from a sweep; docs/benchmarks.md (GLUE section) has the measured results.
OFFLINE_LR = {"full": 1e-3, "lora": 3e-3, "galore": 3e-3}
OFFLINE_MAX_STEPS = 300
OFFLINE_BATCH = 32
OFFLINE_GAP = 50


@dataclass
class GlueArguments:
    """What to fine-tune, on which task, with which method (``--help`` prints every field)."""

    task_name: str = field(default="sst2", metadata={"help": f"GLUE task: one of {', '.join(GLUE_TASKS)}."})
    method: str = field(default="galore", metadata={"help": f"Fine-tuning method: one of {', '.join(METHODS)}."})
    model_name_or_path: str = field(
        default="FacebookAI/roberta-base",
        metadata={"help": "Hub id or local folder of a model with a sequence-classification head (used with the hub)."},
    )
    source: Literal["auto", "hub", "offline"] = field(
        default="auto",
        metadata={"help": "auto: the hub if reachable, else the offline default; hub; offline (generated data, local model)."},
    )
    recipe: Literal["auto", "paper", "offline", "none"] = field(
        default="auto",
        metadata={"help": "Fill lr/batch/steps/scale/gap not given on the command line: the paper's per-task values "
                  "(hub), the CPU budget (offline), or nothing (transformers' defaults). auto follows the source."},
    )
    rank: int = field(default=8, metadata={"help": "Rank of GaLore's projection and of LoRA (the paper: 4 or 8)."})
    galore_scale: float | None = field(
        default=None, metadata={"help": "GaLore scale alpha; default 4 at rank 4, 2 at rank 8 (paper Table 7), else 16/rank."}
    )
    update_proj_gap: int | None = field(
        default=None, metadata={"help": "GaLore steps between basis refreshes; default 500 on the hub, 50 offline."}
    )
    lora_alpha: float = field(default=8.0, metadata={"help": "LoRA alpha (Hu et al.: 8 for RoBERTa-base)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    target_modules: list[str] = field(
        default_factory=lambda: ["query", "value"],
        metadata={"help": "Modules adapted by LoRA and projected by GaLore (names or dot-bounded suffixes)."},
    )
    train_non_target: bool = field(
        default=False,
        metadata={"help": "GaLore: also train every non-target parameter at full rank (embeddings, FFN, norms), as "
                  "the paper's script did. Default: only the targets and the classification head, LoRA's trainable "
                  "set, so optimizer states compare like for like."},
    )
    train_embeddings: bool | None = field(
        default=None,
        metadata={"help": "LoRA and GaLore: also train the input word embeddings at full rank (LoRA through "
                  "`modules_to_save`). Default: on for the offline default, whose small locally pre-trained "
                  "model has not learnt word meanings (with frozen embeddings neither method learns its tasks), "
                  "off on the hub, as in the paper."},
    )
    max_seq_length: int | None = field(
        default=None, metadata={"help": "Truncation length in tokens; default 512 with the paper recipe, else 128."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N examples of each evaluation split."})
    offline_train_size: int | None = field(
        default=None, metadata={"help": "Offline default: examples generated for training (default per task)."}
    )
    offline_cache_dir: str | None = field(
        default=None, metadata={"help": "Offline default: where the locally pre-trained model is cached "
                                "(default $HF_GALORE_CACHE or ~/.cache/hf_galore)."}
    )
    offline_pretrain_steps: int | None = field(
        default=None, metadata={"help": "Offline default: masked-LM pre-training steps of the small RoBERTa "
                                "(default: OfflineModelSpec's, 200)."}
    )


# ------------------------------------------------------------------------------- checks
def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"`{name}`={value!r} is not supported; choose one of {', '.join(choices)}.")
    return value


def classification_head_names(model: nn.Module) -> list[str]:
    """Top-level names of ``model``'s classification head ("classifier" or "score"), if any."""
    return [name for name, _ in model.named_children() if name in ("classifier", "score")]


def check_sequence_classifier(model: nn.Module) -> None:
    """Refuse a model without a sequence-classification head, naming the modules it has."""
    if not type(model).__name__.endswith("ForSequenceClassification") or not classification_head_names(model):
        children = [name for name, _ in model.named_children()]
        raise ValueError(
            f"{type(model).__name__} has no sequence-classification head (a `classifier` or `score` module); its "
            f"top-level modules are {children}. Load it with AutoModelForSequenceClassification.from_pretrained(...) "
            "or pick a model type that has one."
        )


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def check_target_modules(model: nn.Module, targets: list[str]) -> None:
    """Every target must match some nn.Linear; otherwise list the linear-layer names that exist."""
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    missing = [t for t in targets if not any(_matches(n, t) for n in linear)]
    if missing:
        short = sorted({n.split(".")[-1] for n in linear} | {".".join(n.split(".")[-2:]) for n in linear})
        raise ValueError(
            f"`target_modules` {missing} match no linear layer of {type(model).__name__}; linear layer names that "
            f"exist (match by name or dot-bounded suffix): {short}"
        )


# ------------------------------------------------------------------------------- loading
def _hub_offline_env() -> str | None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def probe_hub(timeout: float = 10.0) -> tuple[bool, str]:
    """Whether the hub answers (one request, no retries), and why not.

    ``load_dataset`` retries with back-off for about half a minute before giving up, so
    the automatic choice asks once first.
    """
    env = _hub_offline_env()
    if env is not None:
        return False, f"{env} is set, so the hub is not contacted"
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info("nyu-mll/glue", timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - DNS failure, timeout, proxy, HTTP error: all mean offline
        return False, f"the hub was unreachable ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})"
    return True, "the hub answered"


class HubUnreachableError(RuntimeError):
    """``--source hub`` could not load from the Hugging Face Hub: one line naming what, with the offline source.

    Without it an offline machine gets ``datasets``' traceback (and, under
    ``compare.py``, that traceback inside the parent's).
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
    """The one-line error for ``what`` failing to load from the hub with ``exc``."""
    reason = " ".join(str(exc).split())[:200] or "no message"
    return HubUnreachableError(
        f"`--source hub`: {what} could not be loaded from the Hugging Face Hub ({type(exc).__name__}: {reason}); "
        "if the hub is unreachable from this machine, use `--source offline` (generated GLUE-format data and a "
        "small locally pre-trained RoBERTa) or `--source auto` (the hub when it answers, else offline)"
    )


def load_hub(task: str, model_name: str):
    """The real path: GLUE from the hub and the tokenizer/config of ``model_name``."""
    import datasets
    from transformers import AutoTokenizer

    try:
        raw = datasets.load_dataset("nyu-mll/glue", task)
    except _network_errors() as exc:
        raise hub_unreachable(f"the dataset 'nyu-mll/glue' ({task})", exc) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name)
    except _network_errors() as exc:
        raise hub_unreachable(f"the tokenizer of {model_name!r}", exc) from None
    return raw, tokenizer, model_name


def load_offline(task: str, args: GlueArguments):
    """The offline default: generated GLUE-format data and the locally pre-trained small RoBERTa."""
    from offline_model import OfflineModelSpec, ensure_offline_model
    from transformers import AutoTokenizer

    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # the small model's ops are too short for intra-op threads to pay off
    raw = load_offline_glue(task, train_size=args.offline_train_size)
    steps = args.offline_pretrain_steps
    spec = OfflineModelSpec() if steps is None else OfflineModelSpec(pretrain_steps=steps)
    path = ensure_offline_model(args.offline_cache_dir, spec)
    return raw, AutoTokenizer.from_pretrained(path), str(path)


def load_data_and_tokenizer(args: GlueArguments) -> tuple[Any, Any, str, str, str]:
    """(raw DatasetDict, tokenizer, model path, source "hub"/"offline", why)."""
    if args.source == "offline":
        return (*load_offline(args.task_name, args), "offline", "requested with --source offline")
    if args.source == "auto":
        reachable, why = probe_hub()
        if not reachable:
            return (*load_offline(args.task_name, args), "offline", why)
        try:
            return (*load_hub(args.task_name, args.model_name_or_path), "hub", "the hub answered")
        except Exception as exc:  # noqa: BLE001 - no network, no hub, gated repo...: fall back, and say so
            why = f"the hub was unreachable ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
            return (*load_offline(args.task_name, args), "offline", why)
    return (*load_hub(args.task_name, args.model_name_or_path), "hub", "requested with --source hub")


def load_model(path: str, task: str):
    """``AutoModelForSequenceClassification.from_pretrained`` with the task's labels; clear error without a head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    names = LABEL_NAMES[task]
    num_labels = 1 if names is None else len(names)
    kwargs: dict[str, Any] = {"num_labels": num_labels, "finetuning_task": task}
    if names is not None:
        kwargs["id2label"] = dict(enumerate(names))
        kwargs["label2id"] = {n: i for i, n in enumerate(names)}
    config = AutoConfig.from_pretrained(path, **kwargs)
    if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        types = sorted(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
        raise ValueError(
            f"`model_name_or_path`={path!r} is a {config.model_type!r} model, which has no sequence-classification "
            f"head in transformers; model types with one: {', '.join(types)}"
        )
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
    check_sequence_classifier(model)
    return model


def tokenize(raw, tokenizer, task: str, max_length: int):
    first, second = TASK_TO_KEYS[task]

    def encode(batch):
        texts = (batch[first],) if second is None else (batch[first], batch[second])
        return tokenizer(*texts, truncation=True, max_length=max_length)

    drop = [c for c in raw["train"].column_names if c != "label"]
    return raw.map(encode, batched=True, remove_columns=drop, desc=None)


# ------------------------------------------------------------------------------- recipe
def resolve_recipe(args: GlueArguments, source: str) -> str:
    if args.recipe != "auto":
        return args.recipe
    return "paper" if source == "hub" else "offline"


def galore_scale(args: GlueArguments) -> float:
    if args.galore_scale is not None:
        return args.galore_scale
    return PAPER_GALORE_SCALE.get(args.rank, 16.0 / args.rank)


def recipe_values(args: GlueArguments, recipe: str) -> dict[str, Any]:
    """TrainingArguments values of the recipe (applied only where the user gave none)."""
    task, method = args.task_name, args.method
    if recipe == "paper":
        if method == "galore":
            lr = PAPER_GALORE_LR.get(args.rank, PAPER_GALORE_LR[8]).get(task, 2e-5)
        elif method == "lora":
            lr = LORA_PAPER_LR.get(task, 5e-4)
        else:
            lr = FULL_FT_LR
        batch = PAPER_BATCH.get(task, 16)
        return {"learning_rate": lr, "per_device_train_batch_size": batch, "num_train_epochs": PAPER_EPOCHS,
                "warmup_ratio": 0.06 if method == "lora" else 0.0}
    if recipe == "offline":
        return {"learning_rate": OFFLINE_LR[method], "per_device_train_batch_size": OFFLINE_BATCH,
                "per_device_eval_batch_size": 128, "max_steps": OFFLINE_MAX_STEPS, "warmup_ratio": 0.1}
    return {}


def explicit_flags(argv: list[str]) -> set[str]:
    """Names of the options given on the command line (``--name value`` or ``--name=value``)."""
    return {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}


# ------------------------------------------------------------------------------- methods
def input_embedding_name(model: nn.Module) -> str:
    """Module name of the input word embeddings (``roberta.embeddings.word_embeddings`` for RoBERTa)."""
    emb = model.get_input_embeddings()
    return next(name for name, m in model.named_modules() if m is emb)


def apply_method(model: nn.Module, args: GlueArguments, train_embeddings: bool = False) -> nn.Module:
    """Make ``model`` ready for ``args.method``: the LoRA wrapper, or GaLore's trainable set.

    LoRA and GaLore train the same parameters besides the targets: the classification head
    and, with ``train_embeddings``, the input word embeddings (both at full rank).
    """
    if args.method == "full":
        return model
    check_target_modules(model, args.target_modules)
    heads = classification_head_names(model)
    extra = heads + ([input_embedding_name(model)] if train_embeddings else [])
    if args.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        config = LoraConfig(task_type=TaskType.SEQ_CLS, r=args.rank, lora_alpha=args.lora_alpha,
                            lora_dropout=args.lora_dropout, target_modules=list(args.target_modules),
                            modules_to_save=extra)
        return get_peft_model(model, config)
    # galore: LoRA's trainable set (target weights + head [+ embeddings]) unless asked to train everything.
    if not args.train_non_target:
        prefixes = tuple(f"{name}." for name in extra)
        targets = {f"{n}.weight" for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and any(_matches(n, t) for t in args.target_modules)}
        for name, param in model.named_parameters():
            param.requires_grad_(name in targets or name.startswith(prefixes))
    return model


def method_training_kwargs(args: GlueArguments, gap: int) -> dict[str, Any]:
    if args.method != "galore":
        return {"optim": "adamw_torch"}
    import hf_galore  # noqa: F401  (registers optim="galore_adamw" with the Trainer)

    return {
        "optim": "galore_adamw",
        "optim_target_modules": list(args.target_modules),
        "optim_args": f"rank={args.rank},update_proj_gap={gap},scale={galore_scale(args)},proj_type=std",
    }


# ------------------------------------------------------------------------------- measuring
def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct tensor storages held in the optimizer state (moments, bases, counters)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    seen: dict[int, int] = {}

    def visit(value: Any) -> None:
        if torch.is_tensor(value):
            storage = value.untyped_storage()
            seen[storage.data_ptr() or id(value)] = storage.nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    for state in inner.state.values():
        visit(state)
    return sum(seen.values())


class PeakMemory:
    """Peak memory of the block: CUDA's allocator peak, or on CPU the growth of the process's peak RSS.

    On Linux the kernel's RSS high-water mark is reset at entry (``/proc/self/clear_refs``),
    so the figure is the block's own peak minus the RSS at entry. Elsewhere a sampling
    thread approximates it. Run each measurement in a fresh process (``compare.py`` forks
    one per run) so that memory freed by an earlier run cannot hide a later run's growth.
    """

    def __init__(self) -> None:
        self.kind = "cuda_allocated" if torch.cuda.is_available() else "cpu_rss_growth"
        self.peak_bytes = 0
        self._start = 0
        self._hwm_ok = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def _rss(self) -> int:
        value = self._status("VmRSS")
        if value is not None:
            return value
        import resource  # pragma: no cover - non-Linux fallback (ru_maxrss is KiB on Linux, bytes on macOS)

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._sampled = max(self._sampled, self._rss())

    def __enter__(self) -> PeakMemory:  # noqa: PYI034 - typing.Self needs Python 3.11
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self._hwm_ok = self._status("VmHWM") is not None
        except OSError:
            self._hwm_ok = False
        self._start = self._rss()
        if not self._hwm_ok:
            self._sampled = self._start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._start
            return
        if self._hwm_ok:
            peak = self._status("VmHWM") or self._start
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            peak = max(self._sampled, self._rss())
        self.peak_bytes = max(0, peak - self._start)


def tensor_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of all parameters, bytes of the trainable ones = their gradients)."""
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return weights, grads


# ------------------------------------------------------------------------------- main
def build_parser():
    from transformers import HfArgumentParser, TrainingArguments

    return HfArgumentParser((GlueArguments, TrainingArguments), description=__doc__.split("\n\n")[0])


def parse_args(argv: list[str] | None = None):
    """Parse ``argv`` (default ``sys.argv[1:]``) into (GlueArguments, TrainingArguments, explicit names)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--output_dir" or a.startswith("--output_dir=") for a in argv):
        argv += ["--output_dir", "outputs/glue"]
    glue_args, training_args = build_parser().parse_args_into_dataclasses(args=argv)
    check_choice("task_name", glue_args.task_name, GLUE_TASKS)
    check_choice("method", glue_args.method, METHODS)
    return glue_args, training_args, explicit_flags(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one fine-tuning and return (and write) its results."""
    import evaluate
    from transformers import DataCollatorWithPadding, Trainer, set_seed

    args, training_args, given = parse_args(argv)
    task = args.task_name
    set_seed(training_args.seed)
    raw, tokenizer, model_path, source, why = load_data_and_tokenizer(args)
    print(f"[run_glue] data and model: {'Hugging Face Hub' if source == 'hub' else 'offline default'} ({why}); "
          f"model {model_path}", flush=True)

    recipe = resolve_recipe(args, source)
    for key, value in recipe_values(args, recipe).items():
        if key not in given:
            setattr(training_args, key, value)
    if "max_steps" in given or recipe == "offline":
        training_args.num_train_epochs = 1.0  # ignored when max_steps > 0; keeps the printout honest
    gap = args.update_proj_gap if args.update_proj_gap is not None else (PAPER_GAP if source == "hub" else OFFLINE_GAP)
    max_length = args.max_seq_length or (512 if recipe == "paper" else 128)
    for key, value in method_training_kwargs(args, gap).items():
        setattr(training_args, key, value)
    if "report_to" not in given:
        training_args.report_to = []
    if "save_strategy" not in given:
        training_args.save_strategy = "no"

    data = tokenize(raw, tokenizer, task, min(max_length, tokenizer.model_max_length))
    train = data["train"]
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    eval_splits = {}
    for split in glue_splits(task)[0]:
        ds = data[split]
        if args.max_eval_samples is not None:
            ds = ds.select(range(min(args.max_eval_samples, len(ds))))
        eval_splits[split] = ds

    set_seed(training_args.seed)  # the head's initialisation does not depend on the data path taken
    train_embeddings = args.train_embeddings if args.train_embeddings is not None else recipe == "offline"
    try:
        loaded = load_model(model_path, task)
    except _network_errors() as exc:
        if source != "hub":
            raise
        raise hub_unreachable(f"the model {model_path!r}", exc) from None
    model = apply_method(loaded, args, train_embeddings)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    metric_name = "mnli" if task == "mnli" else task
    metric = evaluate.load(METRIC_PATH, metric_name)

    def compute_metrics(pred) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        preds = np.squeeze(logits, -1) if task == "stsb" else np.argmax(logits, axis=-1)
        return metric.compute(predictions=preds, references=pred.label_ids)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
    )
    start = time.perf_counter()
    with PeakMemory() as peak:
        train_output = trainer.train()
    wall = time.perf_counter() - start
    state_bytes = optimizer_state_bytes(trainer.optimizer)
    weight_bytes, grad_bytes = tensor_bytes(model)

    metrics: dict[str, float] = {}
    for split, ds in eval_splits.items():
        out = trainer.evaluate(ds, metric_key_prefix="eval")
        suffix = "_mm" if split.endswith("mismatched") else ""
        metrics.update({k[len("eval_"):] + suffix: float(v) for k, v in out.items()
                        if k[len("eval_"):] in ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr")})
    if task == "mnli":
        metrics["accuracy_mean"] = (metrics["accuracy"] + metrics["accuracy_mm"]) / 2

    result = {
        "task": task,
        "method": args.method,
        "seed": training_args.seed,
        "source": source,
        "source_reason": why,
        "model": model_path,
        "rank": args.rank if args.method != "full" else None,
        "metrics": metrics,
        "main_metric": MAIN_METRIC[task],
        "main_metric_value": metrics[MAIN_METRIC[task]],
        "trainable_params": trainable,
        "total_params": total,
        "optimizer_state_bytes": state_bytes,
        "weights_grads_states_bytes": weight_bytes + grad_bytes + state_bytes,
        "peak_memory_bytes": peak.peak_bytes,
        "peak_memory_kind": peak.kind,
        "train_seconds": wall,
        "torch_threads": torch.get_num_threads(),
        "train_steps": train_output.global_step,
        "train_loss": float(train_output.training_loss),
        "hparams": {
            "recipe": recipe,
            "learning_rate": training_args.learning_rate,
            "batch_size": training_args.per_device_train_batch_size,
            "max_steps": training_args.max_steps,
            "num_train_epochs": training_args.num_train_epochs,
            "max_seq_length": max_length,
            "target_modules": list(args.target_modules),
            "train_embeddings": train_embeddings if args.method != "full" else True,
            **({"galore_scale": galore_scale(args), "update_proj_gap": gap, "train_non_target": args.train_non_target}
               if args.method == "galore" else {}),
            **({"lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout} if args.method == "lora" else {}),
        },
    }
    out_dir = Path(training_args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "glue_results.json").write_text(json.dumps(result, indent=2))
    shown = ", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items())
    print(f"[run_glue] {task} {args.method}: {shown} | trainable {trainable:,} of {total:,} | optimizer state "
          f"{state_bytes / 2**20:.3f} MB | peak {peak.kind} {peak.peak_bytes / 2**20:.1f} MB | {wall:.1f} s",
          flush=True)
    return result


def cli(argv: list[str] | None = None) -> int:
    """The command line: :func:`main`, with an unreachable hub as one error line (exit code 2)."""
    try:
        main(argv)
    except HubUnreachableError as exc:
        print(f"run_glue.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
