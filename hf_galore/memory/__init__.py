"""``estimate_memory``: how many bytes a training step needs, per method, before you allocate any.

The figures are *what hf_galore's optimizers really hold*, not the papers'
rounded formulas: for a model that fits in memory the optimizer-state and
weight bytes equal, to the byte, the tensors our optimizers keep after a step
(``tests/test_memory.py`` checks that). Optimizer state is never computed
from a component's name here: each base optimizer, basis finder and refresh
policy declares its per-weight tensors (``state_layout``) and each codec is
measured by encoding a basis; :func:`weight_state_bytes` adds them up, for
this estimate and for the Trainer's start-up summary alike. The formulas are
documented in ``docs/memory.md``.

Per parameter tensor of ``numel`` elements stored in ``dtype`` (``e`` bytes):

* weights: ``numel·e`` (Q-GaLore's INT8 weights: codes + group scales, see
  :func:`int8_weight_bytes`); frozen parameters cost only their weights;
* gradients: ``numel·e`` for every trainable tensor; layer-wise methods step
  each weight in its gradient hook and free the gradient at once, so only the
  largest single gradient is counted (GaLore §4.3, arXiv:2403.03507);
* optimizer state: a 4-byte float32 ``step`` per trainable tensor, plus

  the declared base update's state, e.g.

  - Adam: ``exp_avg`` and ``exp_avg_sq`` in ``dtype``: ``2·numel·e``;
  - 8-bit Adam: ``2·numel`` uint8 + ``2·⌈numel/256⌉`` float32 block maxima
    (tensors under 4096 elements keep Adam's ``2·numel·e``, as bitsandbytes);
  - Adafactor (β₁ = None): float32 row and column statistics
    (``4·(m + n)`` bytes for an ``m × n`` matrix, ``4·numel`` for vectors);
  - GaLore targets: the same moments, but of the projected gradient
    (``r × n`` or ``m × r``, arXiv:2403.03507 Alg. 1), plus the basis
    (``k × r`` in ``dtype``, or the quantized codec's bytes for Q-GaLore),
    plus the basis finder's and refresh policy's own state (OSD's Adam on
    the basis, Q-GaLore's cosine FIFO). Targets whose smaller side is
    ``<= r`` train at full rank, as ``galore_param_groups`` decides.
* activations: an estimate for decoder-only transformers (LLaMA layout), see
  :func:`activation_bytes`.


The package splits along the lines of that job: :mod:`.result` (the
``MemoryEstimate`` type), :mod:`.formulas` (per-weight bytes from the
components' declarations, activations, INT8 weights, transient working sets),
:mod:`.models` (presets, config files and hub ids, built on the meta device)
and :mod:`.estimate` (the methods and the estimator).
"""

from __future__ import annotations

from .estimate import DTYPES, METHODS, MethodSpec, estimate_memory, register_method
from .formulas import (
    INT8_WEIGHT_GROUP_SIZE,
    STEP_BYTES,
    activation_bytes,
    basis_bytes,
    int8_weight_bytes,
    refresh_transient_bytes,
    update_transient_bytes,
    weight_state_bytes,
)
from .models import load_preset, preset_names, resolve_model, select_target_modules
from .result import FIELDS, MemoryEstimate

__all__ = [
    "DTYPES",
    "FIELDS",
    "INT8_WEIGHT_GROUP_SIZE",
    "METHODS",
    "STEP_BYTES",
    "MemoryEstimate",
    "MethodSpec",
    "activation_bytes",
    "basis_bytes",
    "estimate_memory",
    "int8_weight_bytes",
    "load_preset",
    "preset_names",
    "refresh_transient_bytes",
    "register_method",
    "resolve_model",
    "select_target_modules",
    "update_transient_bytes",
    "weight_state_bytes",
]
