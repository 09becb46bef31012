"""The package surface: public names documented, optional dependencies optional."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import hf_galore


def test_every_public_name_is_documented():
    undocumented = [
        name
        for name in hf_galore.__all__
        if not name.startswith("__") and not (getattr(hf_galore, name).__doc__ or "").strip()
    ]
    assert undocumented == []


def test_design_contract_names_are_exported():
    for name in ("GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor"):
        assert name in hf_galore.__all__
        assert issubclass(getattr(hf_galore, name), __import__("torch").optim.Optimizer)


def test_import_works_without_bitsandbytes_and_8bit_says_how_to_install():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["bitsandbytes"] = None  # makes `import bitsandbytes` fail
        sys.modules["bitsandbytes.functional"] = None
        import torch, hf_galore
        opt = hf_galore.GaLoreAdamW([torch.nn.Parameter(torch.zeros(4, 4))])
        try:
            hf_galore.GaLoreAdamW8bit([torch.nn.Parameter(torch.zeros(4, 4))])
        except hf_galore.UnsupportedSetupError as exc:
            assert "pip install" in str(exc) and "bitsandbytes" in str(exc), exc
            print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
