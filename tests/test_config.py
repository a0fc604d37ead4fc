"""Config: TOML sections into dataclasses, flag overrides, clear errors naming the key, round trip."""
from __future__ import annotations

from pathlib import Path

import pytest

from imgfeat.metadata.config import Config, dump_toml, load_config

REPO = Path(__file__).resolve().parent.parent


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = load_config()
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(cfg))
    assert load_config(path) == cfg


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.toml")):
        load_config(path)
    assert load_config(REPO / "configs" / "default.toml") == Config()


def test_file_values_and_flag_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[manifest]\nvalidation = "header"\nrows_per_shard = 10\n[featurize]\nmodel = "mobilenet_v2"\n')
    cfg = load_config(path, {"manifest": {"rows_per_shard": 99, "validation": None}})
    assert cfg.manifest.validation == "header"  # a flag left at None does not override
    assert cfg.manifest.rows_per_shard == 99
    assert cfg.featurize.model == "mobilenet_v2"


@pytest.mark.parametrize(
    "text, match",
    [
        ("[manifest]\nvalidaton = 'full'\n", r"manifest\.validaton"),
        ("[manfest]\nx = 1\n", r"\[manfest\]"),
        ("[manifest]\nvalidation = 'deep'\n", r"manifest\.validation"),
        ("[manifest]\nrows_per_shard = 'ten'\n", r"manifest\.rows_per_shard"),
        ("[manifest]\nsplit_ratios = { train = 0.5, test = 0.4 }\n", r"manifest\.split_ratios"),
        ("[preprocess]\nbackground = [1, 2]\n", r"preprocess\.background"),
        ("[featurize]\nprecision = 'fp8'\n", r"featurize\.precision"),
        ("[spark]\nconf = { foo = 'x' }\n", r"spark\.conf\.foo"),
        ("[manifest\n", r"not valid TOML"),
    ],
)
def test_mistakes_name_the_key(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(path)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")


def test_fingerprint_depends_on_the_named_sections():
    a, b = Config(), Config()
    b.featurize.model = "mobilenet_v2"
    assert a.fingerprint("manifest") == b.fingerprint("manifest")
    assert a.fingerprint("featurize") != b.fingerprint("featurize")
