"""Q-GaLore's model preparation: the targeted ``nn.Linear`` layers become INT8 layers.

Module selection follows GaLore's rules (``hf_galore.targets``), so this
lives beside target selection, above the INT8 layer itself
(``hf_galore.quant.int8``), which knows nothing of module names.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .errors import GaLoreConfigError
from .projectors.randomized import derive_seed
from .quant.int8 import DEFAULT_WEIGHT_GROUP_SIZE, Int8Linear
from .safetensors_files import checkpoint_files, load_shard
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
    quantized), and a float checkpoint loads straight into them — each dense weight
    is quantized as it is loaded (:func:`load_checkpoint_into_int8`).
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


def _progress_bar(total: int, desc: str = "INT8 weights", unit: str = "layer"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit)


def load_checkpoint_into_int8(
    model: nn.Module,
    checkpoint: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> nn.Module:
    """Load a float (or INT8) safetensors checkpoint into a model whose targets are INT8 layers, shard by shard.

    The model is built without storage and its targets replaced first, so
    the float model never exists in memory; the peak is the INT8 model plus
    one shard::

        from accelerate import init_empty_weights
        with init_empty_weights():  # parameters on the meta device, buffers (RoPE) real
            model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
        prepare_model_for_int8_weights(model, "all-linear")
        load_checkpoint_into_int8(model, "path/to/checkpoint_dir")

    Each shard is read to ``device`` and assigned (``load_state_dict(...,
    assign=True)``); a dense weight of an INT8 layer is quantized as it
    arrives, exactly as ``prepare_model_for_int8_weights`` quantizes a float
    layer. Tied weights are re-tied at the end. Raises
    :class:`~hf_galore.errors.GaLoreConfigError` naming the tensors the
    checkpoint did not provide (still on the meta device), and naming the
    file for a damaged shard or index, a missing shard, or an index entry
    that resolves outside the checkpoint folder
    (:mod:`hf_galore.safetensors_files`).
    """
    files = checkpoint_files(checkpoint)
    bar = _progress_bar(len(files), desc="checkpoint shards", unit="shard") if progress else None
    for path in files:
        shard = load_shard(path, device)
        try:
            model.load_state_dict(shard, strict=False, assign=True)
        except RuntimeError as exc:  # size mismatches, all listed in one multi-line message
            problems = " ".join(str(exc).split())
            raise GaLoreConfigError(
                f"`checkpoint` shard {str(path)!r} does not fit the model: {problems[:400]}"
                "; load the checkpoint of this model's config"
            ) from None
        del shard
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        shown = ", ".join(empty[:8]) + (f" and {len(empty) - 8} more" if len(empty) > 8 else "")
        raise GaLoreConfigError(
            f"`checkpoint` {[str(f) for f in files]} did not provide {len(empty)} tensor(s) of the model: {shown}"
        )
    return model


__all__ = ["checkpoint_files", "load_checkpoint_into_int8", "prepare_model_for_int8_weights"]
