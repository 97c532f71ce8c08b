"""`talis bench --shape NAME --device-map FILE | --max-memory CAPS`: planned as `generate` plans a checkpoint, and
refused before anything is built (fake GPU counts: no GPU is needed)."""

import json

import pytest
import torch

from talis_cli import bench, placement
from talis_cli.errors import TalisError
from talis_cli.memory_plan import footprint


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(placement, "_cuda_count", lambda: 2)


def test_shape_tensors_weigh_what_a_65b_model_holds_on_the_gpu():
    args = bench.shape_args("65B", 2048)
    fp = footprint(bench.gptq_tensor_shapes(args, 4, 128), 80, 0, float_bytes=2)
    # 4-bit weights + scales/zeros + fp16 embedding and head: 33.64 GB in the checkpoint (the anchors); the GPU
    # holds 35.45 GB (scales as 4-byte scale/zero words, memory_breakdown), the plan 35.73 (the zeros counted too)
    assert 35.45e9 < fp.total < 35.8e9


def test_65b_over_two_24gib_caps_splits_its_layers(two_gpus):
    plan = bench.plan_shape(bench.shape_args("65B", 2048), 4, 128, 2048, None, "0=24GiB,1=24GiB")
    layers = [plan.device_for(f"model.layers.{i}") for i in range(80)]
    first_on_1 = layers.index("cuda:1")
    assert 30 < first_on_1 < 50 and layers == ["cuda:0"] * first_on_1 + ["cuda:1"] * (80 - first_on_1)
    assert plan.device_for("model.embed_tokens") == "cuda:0" and plan.device_for("lm_head") == "cuda:1"
    assert bench.plan_summary(plan, 80) == f"cuda:0 layers 0-{first_on_1 - 1}, cuda:1 layers {first_on_1}-79"


def test_a_map_naming_a_missing_gpu_fails(two_gpus, tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"layers": {"0-39": 0, "40-79": 2}}))
    with pytest.raises(TalisError, match=r"places layers on cuda:2 but this machine has only 2 GPU\(s\)"):
        bench.plan_shape(bench.shape_args("70B", 2048), 4, 128, 2048, str(path), None)


def test_a_map_overflowing_a_cap_fails(two_gpus, tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"layers": {"0-39": 0, "40-79": 1}}))
    with pytest.raises(TalisError, match=r"cuda:0 would need 1\d\.\d GiB plus 1 GiB reserve but has 10\.0 GiB"):
        bench.plan_shape(bench.shape_args("70B", 2048), 4, 128, 2048, str(path), "0=10GiB,1=24GiB")


def test_run_bench_refuses_before_building_anything(two_gpus, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def built(*args, **kwargs):
        raise AssertionError("something was built or measured before the plan was checked")

    monkeypatch.setattr(bench, "copy_bandwidth", built)
    monkeypatch.setattr(bench, "random_model", built)
    with pytest.raises(TalisError, match=r"does not fit.*GiB is missing"):
        bench.run_bench(shape="65B", prompt=2048, gen=64, ctx=2112, max_memory="0=16GiB,1=16GiB")


def test_tensor_parallel_bench_takes_a_shape_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(Exception, match="times a --shape"):
        bench.run_bench(model="somewhere", tensor_parallel=2)
