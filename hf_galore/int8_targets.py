"""Q-GaLore's model preparation: the targeted ``nn.Linear`` layers become INT8 layers.

Module selection follows GaLore's rules (``hf_galore.targets``), so this
lives beside target selection, above the INT8 layer itself
(``hf_galore.quant.int8``), which knows nothing of module names.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .projectors.randomized import derive_seed
from .quant.int8 import DEFAULT_WEIGHT_GROUP_SIZE, Int8Linear
from .targets import TargetModulesError, select_target_modules


def prepare_model_for_int8_weights(
    model: nn.Module,
    target_modules: str | Iterable[str],
    *,
    group_size: int = DEFAULT_WEIGHT_GROUP_SIZE,
    exclude_modules: str | Iterable[str] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> list[str]:
    """Replace the targeted ``nn.Linear`` layers of ``model`` by :class:`Int8Linear`, in place.

    ``target_modules`` / ``exclude_modules`` follow the same rules as
    GaLore's (``hf_galore.targets``: PEFT's suffix lists, full-match regex,
    ``"all-linear"`` without the output head). Then build the optimizer as
    usual (``galore_param_groups`` with the same targets): those weights are
    in a low-rank group and their updates are applied with stochastic
    rounding. Returns the replaced names. Q-GaLore's default group size is
    256 (``--weight_group_size``). ``progress=True`` shows a progress bar
    (tqdm) over the layers: a 7B model has 224 of them.

    Layers are converted one at a time and each float weight is freed as
    its INT8 layer replaces it, so the peak stays about the float model's
    size (plus one layer), not float + INT8. On a model built on the meta
    device the INT8 layers are created on the meta device too (nothing is
    quantized): materialise them with ``model.to_empty(device=...)`` and
    load a float checkpoint with ``load_state_dict`` — each dense weight
    is quantized as it is loaded (docs/projectors.md, "Loading a checkpoint
    into INT8 layers").
    """
    selection = select_target_modules(model, target_modules, exclude_modules)
    names = [name for name, m in selection.modules.items() if type(m) is nn.Linear]
    matched = list(selection.modules)[:5]
    # Keep names only: a list of the layers themselves would hold every float weight alive until
    # the last one is converted (peak = float model + INT8 model instead of about the float model).
    del selection
    if not names:
        raise TargetModulesError(
            f"`target_modules`={target_modules!r} matched no nn.Linear of the model (matched: "
            f"{matched!r}); INT8 weights replace nn.Linear layers only"
        )
    bar = _progress_bar(len(names)) if progress else None
    for index, name in enumerate(names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = Int8Linear.from_linear(getattr(parent, child), group_size=group_size, seed=derive_seed(seed, index))
        setattr(parent, child, layer)  # the float layer is freed here unless the caller holds it
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return names


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="INT8 weights", unit="layer")


__all__ = ["prepare_model_for_int8_weights"]
