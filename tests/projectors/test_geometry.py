"""Projection geometry: sides, shapes, back-projection, overlap."""

from __future__ import annotations

import pytest
import torch

from hf_galore import GaLoreConfigError
from hf_galore.projectors.geometry import (
    as_matrix,
    project,
    project_back_add_,
    projected_shape,
    sides_for,
    subspace_overlap,
)
from hf_galore.projectors.svd import top_singular_basis

SIDES = [
    ("std", (8, 4), ("right",)),
    ("std", (4, 8), ("left",)),
    ("std", (6, 6), ("right",)),
    ("reverse_std", (8, 4), ("left",)),
    ("reverse_std", (4, 8), ("right",)),
    ("left", (8, 4), ("left",)),
    ("right", (4, 8), ("right",)),
    ("full", (8, 4), ("left", "right")),
]


@pytest.mark.parametrize("proj_type,shape,expected", SIDES)
def test_sides_follow_galore_torch_convention(proj_type, shape, expected):
    assert sides_for(proj_type, shape) == expected


def test_unknown_proj_type_lists_valid_ones():
    with pytest.raises(GaLoreConfigError, match="'reverse_std'"):
        sides_for("diag", (4, 4))


@pytest.mark.parametrize("proj_type,shape,rank,expected", [
    ("std", (20, 10), 4, (20, 4)),
    ("std", (10, 20), 4, (4, 20)),
    ("full", (20, 10), 4, (4, 4)),
    ("std", (20, 3), 8, (20, 3)),
])
def test_projected_shape(proj_type, shape, rank, expected):
    grad = torch.randn(*shape)
    sides = sides_for(proj_type, shape)
    bases = [top_singular_basis(grad, rank, s) for s in sides]
    assert project(grad, bases, sides).shape == expected == projected_shape(shape, rank, sides)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_back_projection_of_projection_is_the_orthogonal_projector(proj_type):
    torch.manual_seed(0)
    grad = torch.randn(12, 7, dtype=torch.float64)
    sides = sides_for(proj_type, grad.shape)
    bases = [top_singular_basis(grad, 3, s).double() for s in sides]
    target = torch.zeros_like(grad)
    project_back_add_(target, project(grad, bases, sides), bases, sides, alpha=1.0)
    expected = grad
    for basis, side in zip(bases, sides):
        expected = basis @ basis.t() @ expected if side == "left" else expected @ basis @ basis.t()
    torch.testing.assert_close(target, expected)


def test_svd_basis_is_compact_and_orthonormal():
    grad = torch.randn(64, 40)
    basis = top_singular_basis(grad, 8, "left")
    assert basis.is_contiguous() and basis.dtype == torch.float32
    assert basis.untyped_storage().nbytes() == basis.numel() * 4  # no view into U
    torch.testing.assert_close(basis.t() @ basis, torch.eye(8), atol=1e-5, rtol=0)


def test_svd_of_bf16_gradient_is_computed_in_float32():
    grad = torch.randn(32, 16).bfloat16()
    basis = top_singular_basis(grad, 4, "right")
    assert basis.dtype == torch.float32
    exact = torch.linalg.svd(grad.float(), full_matrices=False)[2][:4].t()
    assert subspace_overlap(basis, exact) > 0.9999


def test_overlap_is_one_for_rotations_and_zero_for_orthogonal_subspaces():
    q, _ = torch.linalg.qr(torch.randn(10, 4))
    rotation, _ = torch.linalg.qr(torch.randn(4, 4))
    assert subspace_overlap(q[:, :2], (q[:, :2] @ rotation[:2, :2].sign().diag().diag())) == pytest.approx(1.0)
    assert subspace_overlap(q[:, :2], q[:, 2:4]) == pytest.approx(0.0, abs=1e-6)


def test_as_matrix_flattens_trailing_dimensions_as_a_view():
    conv = torch.randn(6, 3, 2, 2)
    flat = as_matrix(conv)
    assert flat.shape == (6, 12) and flat.data_ptr() == conv.data_ptr()
