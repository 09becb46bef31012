"""The version-gated transformers shim: which release line routes optim names how, and that nothing else is patched.

Every release line runs this file in its own environment (the main suite on
the newest 5.x; ``.ci/transformers_lines`` on the oldest supported 4.x), so
both branches of the version condition are exercised against a real
transformers, and both are also driven here with a fake ``transformers.trainer``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from hf_galore.compat_transformers import (
    OPTIMIZER_TABLE_SINCE,
    check_optim_args_split,
    hook_optimizer_dispatch,
    transformers_version,
    uses_optimizer_table,
)
from hf_galore.errors import GaLoreConfigError, UnsupportedSetupError
from hf_galore.trainer_args import EXPLICIT_PATH

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "version,table",
    [("4.47.1", False), ("4.57.6", False), ("5.0.0.dev0", True), ("5.0.0", True), ("5.24.0", True)],
)
def test_the_release_line_decides_the_route(version, table):
    assert OPTIMIZER_TABLE_SINCE.release == (5, 0, 0)
    assert uses_optimizer_table(version) is table


def _fake_trainer_module(method):
    module = types.ModuleType("fake_transformers_trainer")
    module.Trainer = type("Trainer", (), {"get_optimizer_cls_and_kwargs": method})
    return module


def test_4x_route_wraps_the_static_method_for_our_names_only():
    def original(args, model=None):
        return "theirs", {"model": model}

    module = _fake_trainer_module(staticmethod(original))
    claims = lambda args: args.optim.startswith("galore")
    build = lambda args, model: ("ours", {"model": model})
    assert hook_optimizer_dispatch(module, claims, build, version="4.47.1") is None
    wrapped = module.Trainer.get_optimizer_cls_and_kwargs
    assert wrapped(SimpleNamespace(optim="galore_adamw"), "m") == ("ours", {"model": "m"})
    assert wrapped(SimpleNamespace(optim="adamw_torch"), "m") == ("theirs", {"model": "m"})
    hook_optimizer_dispatch(module, claims, build, version="4.47.1")  # idempotent: not wrapped twice
    assert module.Trainer.get_optimizer_cls_and_kwargs is wrapped


def test_4x_without_the_static_method_names_the_explicit_path():
    module = _fake_trainer_module(lambda self, args: None)
    with pytest.raises(UnsupportedSetupError, match=r"no static `Trainer.get_optimizer_cls_and_kwargs`") as info:
        hook_optimizer_dispatch(module, bool, lambda a, m: None, version="4.47.1")
    assert EXPLICIT_PATH in str(info.value)


def test_5x_route_returns_the_table_and_leaves_trainer_alone(monkeypatch):
    table: dict = {}
    monkeypatch.setitem(sys.modules, "transformers.trainer_optimizer", SimpleNamespace(_OPTIMIZER_HANDLERS=table))
    method = staticmethod(lambda args, model=None: None)
    module = _fake_trainer_module(method)
    assert hook_optimizer_dispatch(module, bool, lambda a, m: None, version="5.0.0") is table
    assert module.Trainer.__dict__["get_optimizer_cls_and_kwargs"] is method


def test_5x_without_the_table_is_an_error_naming_the_explicit_path(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers.trainer_optimizer", types.ModuleType("renamed"))
    with pytest.raises(UnsupportedSetupError, match=r"_OPTIMIZER_HANDLERS.*transformers >= 5.0.0") as info:
        hook_optimizer_dispatch(_fake_trainer_module(staticmethod(len)), bool, lambda a, m: None, version="5.3.0")
    assert EXPLICIT_PATH in str(info.value)


@pytest.mark.parametrize("text", ["rank=4,", "rank=4,,scale=0.5", "rank=4, scale", "rank=4=5"])
def test_5x_refuses_optim_args_transformers_cannot_split(text):
    with pytest.raises(GaLoreConfigError, match=r"cannot split into one key=value.*trailing comma"):
        check_optim_args_split(text, version="5.0.0")
    check_optim_args_split(text, version="4.47.1")  # 4.x never splits it: hf_galore's parser reads it
    check_optim_args_split("rank=4, update_proj_gap=2", version="5.0.0")
    check_optim_args_split(None, version="5.0.0")


def test_a_trailing_comma_on_the_installed_release(tmp_path):
    """5.x: refused at ``Trainer(...)`` in hf_galore's words (was transformers' bare ValueError); 4.x: accepted."""
    from transformers import Trainer, TrainingArguments

    from tests import helpers

    args = TrainingArguments(
        output_dir=str(tmp_path),
        optim="galore_adamw",
        optim_target_modules=["attn"],
        optim_args="rank=4,",
        report_to=[],
        use_cpu=True,
    )

    def build():
        return Trainer(model=helpers.tiny_llama(0), args=args, train_dataset=helpers.TokenData(64, 16, 4, 1))

    if uses_optimizer_table(transformers_version()):
        with pytest.raises(GaLoreConfigError, match="'rank=4,'.*trailing comma"):
            build()
    else:
        optimizer = build().create_optimizer()
        assert next(g["rank"] for g in optimizer.param_groups if "rank" in g) == 4


def test_the_installed_release_takes_its_lines_route():
    """The real transformers of this environment: the route its version names is the one installed."""
    from transformers import Trainer

    import hf_galore

    assert hf_galore.register_with_transformers()
    wrapped = hasattr(Trainer.get_optimizer_cls_and_kwargs, "__hf_galore_original__")
    assert wrapped is (not uses_optimizer_table(transformers_version()))
    assert str(transformers_version()) == transformers.__version__


def _defined_outside_transformers(cls: type) -> list[str]:
    """Names in ``vars(cls)`` whose function (or static/class method, property getter) is not transformers' code."""
    out = []
    for name, value in vars(cls).items():
        func = getattr(value, "__func__", None) or getattr(value, "fget", None) or value
        module = getattr(func, "__module__", None)
        if callable(func) and module is not None and not module.startswith("transformers"):
            out.append(name)
    return sorted(out)


#: What the shim may replace on ``Trainer``, per release line: nothing on 5.x; on 4.x only the public static method.
ALLOWED = {True: [], False: ["get_optimizer_cls_and_kwargs"]}

_PROBE = """
import json, sys, warnings
sys.path.insert(0, sys.argv[1])
import transformers.trainer
from transformers import Trainer, TrainingArguments
before = dict(vars(Trainer))
import hf_galore  # transformers.trainer is already imported: the hook runs now
from tests import helpers

def changed():
    after = dict(vars(Trainer))
    return sorted(k for k in before.keys() | after.keys() if before.get(k) is not after.get(k))

after_import = changed()
args = TrainingArguments(
    output_dir=sys.argv[2], optim="galore_adamw_layerwise", optim_target_modules=["attn", "mlp"],
    optim_args="rank=4", max_steps=2, per_device_train_batch_size=4, logging_steps=1, report_to=[],
    use_cpu=True, save_strategy="no", disable_tqdm=True, max_grad_norm=0.5,
)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    trainer = Trainer(model=helpers.tiny_llama(0, vocab=64, seq=16), args=args,
                      train_dataset=helpers.TokenData(64, 16, 16, 1))
    trainer.train()
layerwise = type(trainer.optimizer.optimizer).__name__
norms = [e["grad_norm"] for e in trainer.state.log_history if "loss" in e]
print(json.dumps({"import": after_import, "run": changed(), "optimizer": layerwise, "norms": norms}))
"""


@pytest.mark.slow
def test_no_trainer_attribute_is_replaced_by_import_or_a_layerwise_run(tmp_path):
    """``vars(Trainer)`` before ``import hf_galore``, after it, and after a layer-wise run with clipping."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(ROOT), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    allowed = ALLOWED[uses_optimizer_table(transformers_version())]
    assert seen["import"] == allowed and seen["run"] == allowed
    assert seen["optimizer"] == "LayerwiseOptimizer"
    assert len(seen["norms"]) == 2 and min(seen["norms"]) > 0  # logged, and not the Trainer's 0 after the hooks


def test_no_trainer_attribute_is_hf_galore_code_in_this_process():
    """Whatever the import order here (the test above covers transformers first): only transformers' code on Trainer."""
    from transformers import Trainer

    import hf_galore

    assert hf_galore.register_with_transformers()
    assert _defined_outside_transformers(Trainer) == ALLOWED[uses_optimizer_table(transformers_version())]
    assert not any(name.startswith("_hf_galore") for name in vars(Trainer))
