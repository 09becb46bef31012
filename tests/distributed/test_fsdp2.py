"""FSDP2 (``fully_shard``): shard-local projection equals one process, and the state is sharded."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.distributed

TOLERANCE = 1e-6


@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_fsdp2_equals_one_process(scenario, proj_type):
    """``std`` and ``reverse_std`` cover left and right bases on tall and wide weights, with uneven shards."""
    for rank in scenario(f"fsdp2_{proj_type}"):
        assert rank["max_diff_vs_one_process"] < TOLERANCE
        assert rank["moments_rel_diff"] < 1e-5
        assert rank["refreshes"] == rank["ref_refreshes"] == 9


@pytest.mark.parametrize("projector", ["randomized", "online_pca"])
def test_fsdp2_other_projectors_equal_one_process(scenario, projector):
    """The finder runs on rank 0 with the gathered gradient: its seeds and state match one process."""
    for rank in scenario(f"fsdp2_{projector}"):
        assert rank["max_diff_vs_one_process"] < TOLERANCE
        assert rank["moments_rel_diff"] < 1e-5
        # the finder's own state (online PCA's moments) is replicated from rank 0: checkpoints restore it
        assert (
            rank["checkpoint"]["restored_full"] and rank["checkpoint"]["restored_dcp"]
        )


def test_fsdp2_full_projection_moments_equal_one_process(scenario):
    for rank in scenario("fsdp2_full"):
        assert rank["moments_rel_diff"] < 1e-5


@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_fsdp2_per_rank_state_is_at_most_six_tenths_of_one_process(scenario, proj_type):
    """Moments, bases and full-rank states are all sharded over the two ranks."""
    for rank in scenario(f"fsdp2_{proj_type}"):
        mine, one = rank["state_bytes"], rank["state_bytes_one_process"]
        assert rank["lowrank_states_local"]
        assert mine["total"] <= 0.6 * one["total"]
        for key in ("bases", "lowrank_moments", "full_rank"):
            assert mine[key] <= 0.6 * one[key], key


@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_fsdp2_checkpoints_hold_every_ranks_shard(scenario, proj_type):
    """torch.distributed.checkpoint sees the low-rank shards as DTensors (``sharded_state_dict_post_hook``).

    The gathered (``full_state_dict=True``) moments and bases equal one process's, and both a
    full-state-dict load and a ``dcp.save``/``dcp.load`` round trip restore each rank's shards.
    """
    for rank in scenario(f"fsdp2_{proj_type}"):
        checkpoint = rank["checkpoint"]
        assert (
            checkpoint["keys"] == 15
        )  # 3 weights x (2 moments + 1 basis) + 3 biases x 2 moments
        assert checkpoint["rel_diff_vs_one_process"] < 1e-5
        assert checkpoint["restored_full"]
        assert checkpoint["restored_dcp"]


@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_fsdp2_a_nan_on_one_rank_skips_the_step_on_every_rank(scenario, proj_type):
    """At a refresh step and between refreshes: weights, moments, bases and counters kept on both ranks."""
    for rank in scenario(f"fsdp2_nonfinite_{proj_type}"):
        assert rank["kept"] == [True, True]
        assert rank["skipped"] == 2 and rank["finite"]


@pytest.mark.parametrize("name", ["fsdp2_int8", "fsdp2_fallback", "fsdp2_lazy_rotate"])
def test_fsdp2_runs_the_same_refresh_as_one_process(scenario, name):
    """The one refresh algorithm runs on shards: options it applies behave as in one process.

    ``int8``: a quantized basis is stored whole (one process's codes; a row
    shard quantized on its own differed by the quantization error).
    ``fallback``: an SVD that fails falls back to the randomized finder and is
    counted on every rank (only rank 0 counted it). ``lazy_rotate``: the lazy
    refresh policy and moment rotation on the gathered bases.
    """
    for rank in scenario(name):
        assert rank["max_diff_vs_one_process"] < TOLERANCE
        assert rank["moments_rel_diff"] < 1e-5
        assert rank["stats"] == rank["ref_stats"]
    if name == "fsdp2_fallback":
        assert all(rank["stats"]["fallbacks"] == 9 for rank in scenario(name))


def test_fsdp2_quantized_bases_checkpoint_as_one_process(scenario):
    for rank in scenario("fsdp2_int8"):
        checkpoint = rank["checkpoint"]
        assert checkpoint["codes_equal"]  # the gathered codes are one process's, bit for bit
        assert checkpoint["rel_diff_vs_one_process"] < 1e-5
        assert checkpoint["restored_full"] and checkpoint["restored_dcp"]


def test_fsdp2_a_per_rank_optimizer_file_is_refused_in_one_process(scenario):
    """A rank's ``optimizer.state_dict()`` (its DTensor shards) is no checkpoint for an unsharded run."""
    for rank in scenario("fsdp2_std"):
        message = rank["per_rank_file_into_one_process"]
        assert message.startswith("refused: "), message
        assert "DTensor" in message or "shard" in message, message
