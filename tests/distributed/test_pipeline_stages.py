"""Two pipeline stages: rank 0 holds the vision tower, projector, embeddings and layers 0-1; rank 1 holds
layers 2-3, the final norm and ``lm_head``. Each loads with ``load_weights(..., stage=True)``, reads only its
own tensors, and runs its own sub-modules (never the outer forward); rank 0 sends its activations to rank 1.
"""

from __future__ import annotations

import pytest

from ._expect import assert_reads_exactly_its_share

pytestmark = pytest.mark.distributed

SCENARIOS = ("pipeline",)


def test_each_stage_loads_its_tensors_exactly(distributed_run) -> None:
    ranks = distributed_run.ranks("pipeline")
    for rank, result in enumerate(ranks):
        assert result["local_mismatches"] == [], f"rank {rank}"
    assert ranks[0]["tensors"] > ranks[1]["tensors"] > 0


def test_each_stage_reads_only_its_tensors(distributed_run) -> None:
    ranks = distributed_run.ranks("pipeline")
    for rank, result in enumerate(ranks):
        assert_reads_exactly_its_share(rank, result)
    keys = [{key for key, _ in result["reads"]} for result in ranks]
    assert not keys[0] & keys[1], "a tensor was read by both stages"
    assert keys[0] | keys[1] == set(ranks[0]["checkpoint_keys"]), "the stages together must read every tensor"
    assert any(key.startswith("vision_tower.") for key in keys[0])
    assert not any(key.startswith("vision_tower.") for key in keys[1])
    assert "language_model.lm_head.weight" in keys[1] - keys[0]


def test_rotary_repair_fires_when_only_the_stage_runs(distributed_run) -> None:
    ranks = distributed_run.ranks("pipeline")
    assert ranks[0]["rotary_buffers"] == [
        "model.language_model.rotary_emb.inv_freq",
        "model.language_model.rotary_emb.original_inv_freq",
        "model.vision_tower.patch_positional_embedding.inv_freq",
        "model.vision_tower.patch_positional_embedding.original_inv_freq",
    ]
    assert ranks[1]["rotary_buffers"] == [
        "model.language_model.rotary_emb.inv_freq",
        "model.language_model.rotary_emb.original_inv_freq",
    ]
    for rank, result in enumerate(ranks):
        assert result["rotary_after_load"] == [], f"rank {rank}: not repaired by load_weights"
        assert result["garbled_rotary_buffers"] == len(result["rotary_buffers"])
        assert result["rotary_after_forward"] == [], f"rank {rank}: the stage's first forward did not repair"
        assert result["stage_output_equal"], f"rank {rank}: stage output differs from the whole model's"
