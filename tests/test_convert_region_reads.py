"""``convert`` of the MoE forms reads each stored byte once per pass: a piece of a fused expert tensor (one
expert's gate rows, its up rows, its down matrix) reads only its own box, and a fused tensor's stacked block
scale only that expert's grid.

Counted, not timed: every ``Checkpoint.read`` (key, shape of what it returned, bytes) and the reader's own
``bytes_read`` counter, against the sizes the checkpoint's headers give (safetensors' own reader, not ours).
Before the fix, each of gate and up read the expert's whole ``[2I, H]`` matrix (gate_up bytes read twice) and
each piece of a fused block-FP8 tensor read the whole ``[E, gr, gc]`` scale stack.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from mistral4_checkpoints import write_checkpoint
from mistral_native_checkpoints import mla_model
from mistral_native_moe import write_mla_moe_native
from safetensors import safe_open

from automodel_plugins.checkpoint import Checkpoint
from automodel_plugins.pipeline.save.convert import convert_checkpoint
from automodel_plugins.testing.checkpoints import write_fp8_checkpoint
from automodel_plugins.testing.tiny_models import tiny_qwen3_vl_moe_config

pytestmark = pytest.mark.filterwarnings("ignore:.*partial:UserWarning")

_NATIVE_EXPERT = re.compile(r"^layers\.\d+\.experts\.\d+\.w[123]\.weight$")


class Reads:
    """Every read of the source while a conversion runs: ``(key, shape, bytes)``, and the reader's counter."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, tuple[int, ...], int]] = []
        self.counted = 0
        real_read, real_close = Checkpoint.read, Checkpoint.close

        def read(checkpoint: Checkpoint, key: str, region: Any = None) -> torch.Tensor:
            tensor = real_read(checkpoint, key, region)
            self.calls.append((key, tuple(tensor.shape), tensor.numel() * tensor.element_size()))
            return tensor

        def close(checkpoint: Checkpoint) -> None:
            self.counted += checkpoint.bytes_read
            checkpoint.bytes_read = 0
            real_close(checkpoint)

        monkeypatch.setattr(Checkpoint, "read", read)
        monkeypatch.setattr(Checkpoint, "close", close)

    def bytes_of(self, key: str) -> int:
        return sum(nbytes for k, _, nbytes in self.calls if k == key)

    def shapes_of(self, key: str) -> list[tuple[int, ...]]:
        return [shape for k, shape, _ in self.calls if k == key]


def _stored(directory: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """Shape and bytes of every stored tensor, from safetensors' own reader."""
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                tensor = handle.get_slice(key)
                shape = tuple(tensor.get_shape())
                itemsize = torch.empty((), dtype=_DTYPES[tensor.get_dtype()]).element_size()
                out[key] = (shape, itemsize * int(torch.tensor(shape).prod()) if shape else itemsize)
    return out


_DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "F8_E4M3": torch.float8_e4m3fn, "F16": torch.float16}


@pytest.fixture(scope="module")
def large3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mistral Large 3's native form, small: per-expert ``w1/w2/w3`` in 8x8-block FP8 with BF16 grids."""
    return write_mla_moe_native(tmp_path_factory.mktemp("large3") / "native")


@pytest.mark.parametrize("layout", ["native", "hf"])
def test_large3_native_to_bf16_reads_every_byte_once(
    large3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    """One pass: the reader's counter is exactly the checkpoint's bytes, and each expert's ``w1``, ``w3``, ``w2``
    (and its grid) is read once, whole, whichever side of the fused ``gate_up_proj`` it fills."""
    stored = _stored(large3)
    reads = Reads(monkeypatch)
    convert_checkpoint(large3, tmp_path / "out", to="bf16", layout=layout)
    assert reads.counted == sum(nbytes for _, nbytes in stored.values())
    experts = [key for key in stored if _NATIVE_EXPERT.match(key)]
    assert len(experts) == 2 * 4 * 3  # 2 MoE layers of 4 experts, 3 projections each
    for key in experts:
        shape = stored[key][0]
        assert reads.shapes_of(key) == [shape], key
        scale = key.removesuffix("weight") + "weight_scale"
        assert reads.shapes_of(scale) == [stored[scale][0]], scale


def test_large3_native_to_fp8_block_reads_each_piece_once_per_pass(
    large3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FP8 out with fresh scales needs two passes (the amax, then the codes): each expert piece is read exactly
    twice, whole, never a neighbour's rows."""
    stored = _stored(large3)
    reads = Reads(monkeypatch)
    convert_checkpoint(large3, tmp_path / "out", to="fp8-block", layout="native", block_size=32)
    for key in (k for k in stored if _NATIVE_EXPERT.match(k)):
        assert reads.shapes_of(key) == [stored[key][0]] * 2, key


def test_fused_block_fp8_pieces_read_their_own_rows_and_grid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mistral Small 4's HF form with fused block-FP8 experts (``gate_up_proj [E, 2I, H]``, one 16x16 grid per
    expert) into the native form: each ``w1`` / ``w3`` piece reads its own ``[1, I, H]`` rows, each ``w2`` its
    ``[1, H, I]`` matrix, and each read of the stacked scale one expert's grid: the fused tensors' bytes once."""
    source = write_checkpoint(mla_model(), tmp_path / "fused", "block-fused")
    stored = _stored(source)
    reads = Reads(monkeypatch)
    convert_checkpoint(source, tmp_path / "native", to="bf16", layout="native")
    fused = [key for key in stored if key.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(fused) == 2 * 2
    for key in fused:
        (experts, rows, columns), nbytes = stored[key]
        pieces = 2 if key.endswith("gate_up_proj") else 1
        assert reads.shapes_of(key) == [(1, rows // pieces, columns)] * experts * pieces, key
        assert reads.bytes_of(key) == nbytes, key
        scale = key + "_scale_inv"
        assert reads.shapes_of(scale) == [(1, *stored[scale][0][1:])] * experts * pieces, scale
        assert reads.bytes_of(scale) == pieces * stored[scale][1], scale
    assert reads.counted == sum(nbytes for _, nbytes in stored.values()) + sum(
        stored[key + "_scale_inv"][1] for key in fused if key.endswith("gate_up_proj")
    )  # one grid per expert serves both halves: read by each


def test_qwen3_vl_moe_per_expert_to_bf16_reads_every_byte_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Qwen3-VL-MoE's FP8 release form (one 16x16-block tensor per expert and projection) into transformers'
    BF16 form: the reader's counter is the checkpoint's bytes, each expert tensor read once."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    torch.manual_seed(0)
    config = tiny_qwen3_vl_moe_config()
    model = Qwen3VLMoeForConditionalGeneration(config).eval()
    layers = config.text_config.num_hidden_layers
    source = write_fp8_checkpoint(
        model,
        tmp_path / "qwen",
        block_size=(16, 16),
        activation_scale_name=None,
        modules_to_not_convert=(
            "model.visual",
            "lm_head",
            *(f"model.language_model.layers.{i}.mlp.gate" for i in range(layers)),
        ),
        experts="per-expert",
        quantization_extra={"activation_scheme": "dynamic", "fmt": "e4m3"},
    )
    assert json.loads((source / "config.json").read_text())["quantization_config"]["weight_block_size"]
    stored = _stored(source)
    reads = Reads(monkeypatch)
    convert_checkpoint(source, tmp_path / "bf16", to="bf16")
    assert reads.counted == sum(nbytes for _, nbytes in stored.values())
    per_key: dict[str, int] = defaultdict(int)
    for key, _, _ in reads.calls:
        per_key[key] += 1
    experts = [key for key in stored if re.search(r"\.experts\.\d+\.\w+_proj\.weight$", key)]
    assert experts and all(per_key[key] == 1 for key in experts)


@pytest.mark.parametrize(
    ("form", "to"), [("large3", "fp8-block"), ("fused", "bf16"), ("fused", "fp8-tensor")]
)
def test_region_reads_write_the_files_whole_rows_wrote(
    large3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str, to: str
) -> None:
    """The files are byte for byte those of the former reads (every piece cut out of its expert's whole rows,
    which a base without ``values_of`` still does)."""
    from automodel_plugins.pipeline.save.values import CheckpointValues

    source = large3 if form == "large3" else write_checkpoint(mla_model(), tmp_path / "fused", "block-fused")
    convert_checkpoint(source, tmp_path / "regions", to=to, layout="native")
    monkeypatch.delattr(CheckpointValues, "values_of")
    convert_checkpoint(source, tmp_path / "rows", to=to, layout="native")
    names = sorted(p.name for p in (tmp_path / "rows").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "regions").iterdir())
    for name in names:
        assert (tmp_path / "regions" / name).read_bytes() == (tmp_path / "rows" / name).read_bytes(), name
