"""The GPU path, checked on any machine: data placement on a device, pinned-memory loaders, bfloat16 training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import Dataset

from medflare.data.placement import TensorDictDataset, dataset_bytes, loader_options, place_on_device
from medflare.flare.executors import AdversarialAlignmentExecutor, SegmentationExecutor
from medflare.segmentation.metrics import evaluate_segmentation
from medflare.networks import build_model
from medflare.segmentation.training import SegmentationTrainer

CPU = torch.device("cpu")


def _items(n=6, size=16):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(1, size, size, generator=g),
             "label": torch.randint(0, 3, (1, size, size), generator=g).float()} for _ in range(n)]


def test_in_memory_data_is_stacked_on_the_device_when_it_fits():
    items = _items()
    placed = place_on_device(Dataset(items), CPU, budget=dataset_bytes(items))
    assert isinstance(placed, TensorDictDataset) and len(placed) == len(items)
    for k in (0, 5):
        assert torch.equal(placed[k]["image"], items[k]["image"]) and torch.equal(placed[k]["label"], items[k]["label"])
    # and the model scores it exactly as it scores the list of items
    model = build_model("unet", spatial_dims=2)
    assert evaluate_segmentation(model, placed, 3, CPU) == evaluate_segmentation(model, Dataset(items), 3, CPU)


@pytest.mark.parametrize("case", ["too large", "lazy", "sizes differ", "cpu default", "none"])
def test_data_that_cannot_be_placed_is_left_as_it_is(case):
    items = _items()
    dataset = {"too large": Dataset(items), "lazy": Dataset(items, transform=lambda x: x),
               "sizes differ": Dataset(items[:2] + _items(1, size=8)), "cpu default": Dataset(items),
               "none": None}[case]
    budget = dataset_bytes(items) - 1 if case == "too large" else (None if case == "cpu default" else 10**9)
    assert place_on_device(dataset, CPU, budget=budget) is dataset


def test_host_data_bound_for_a_gpu_is_pinned():
    items = _items()
    assert loader_options(Dataset(items), torch.device("cuda")) == {"pin_memory": True}
    assert loader_options(Dataset(items), CPU) == {"pin_memory": False}
    on_device = place_on_device(Dataset(items), CPU, budget=10**9)
    assert loader_options(on_device, CPU) == {"pin_memory": False}


def test_mixed_precision_runs_the_forward_pass_in_bfloat16_and_keeps_float32_weights():
    torch.manual_seed(0)
    model = build_model("unet", spatial_dims=2)
    seen = []
    model.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    trainer = SegmentationTrainer(model, CPU, lr=0.01, mixed_precision=True)
    result = trainer.fit(Dataset(_items(8)), 1, 4)
    assert result.steps == 2 and np.isfinite(result.losses["loss"])
    assert set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("cls, extra", [(SegmentationExecutor, {}), (AdversarialAlignmentExecutor, {"warmup_rounds": 0})])
def test_executors_pass_mixed_precision_to_their_trainer(cls, extra, tmp_path):
    ex = cls(synthetic={"n_train": 4, "n_val": 2, "n_test": 2}, batch_size=2, mixed_precision=True, **extra)
    ex.start("site-1", str(tmp_path))
    ex._ensure_ready(None)
    assert ex.trainer.mixed_precision is True
    assert not isinstance(ex.data.train, TensorDictDataset)  # a CPU site keeps its data where it is
