"""Config: TOML sections into dataclasses, flag overrides, clear errors naming the key, round trip."""
from __future__ import annotations

from pathlib import Path

import pytest

from imgfeat.metadata.config import Config, DecodeConfig, dump_toml, load_config

REPO = Path(__file__).resolve().parent.parent


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = load_config()
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(cfg))
    assert load_config(path) == cfg


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.toml")):
        load_config(path)
    text = (REPO / "configs" / "default.toml").read_text()
    body = text[text.index("\n[") + 1:]
    assert body == dump_toml(Config()), "configs/default.toml must list every key with its default (dump_toml)"


def test_one_decode_section_read_by_both_stages(tmp_path, caplog):
    """The caps and formats live in [decode]; the old per-stage keys still load, as that one key."""
    cfg = load_config(None, {"manifest": {"max_pixels": 5000}, "preprocess": {"max_pixels": 5000}})
    assert cfg.decode.max_pixels == 5000 and "decode.max_pixels" in caplog.text
    with pytest.raises(ValueError, match=r"manifest\.max_bytes = 10 and preprocess\.max_bytes = 20 disagree"):
        load_config(None, {"manifest": {"max_bytes": 10}, "preprocess": {"max_bytes": 20}})
    with pytest.raises(ValueError, match=r"decode\.formats: unknown format 'jpg'"):
        load_config(None, {"preprocess": {"formats": ["jpg"]}})  # validated once, whichever name set it
    assert load_config(None, settings=["manifest.max_jpeg_scans=7"]).decode.max_jpeg_scans == 7


def test_stage_fingerprints_unchanged_by_the_decode_section():
    """Fingerprints hash the [decode] keys inside the sections that read them, as before the section
    existed (value pinned when near_duplicates became "flag" by default: the default manifest gained the
    perceptual hash, the quality signals and near_duplicate_of then, so older run folders rebuild it once)."""
    cfg = Config()
    assert cfg.fingerprint("manifest") == "2d47205c22b0e2e2"
    assert cfg.fingerprint("manifest") != Config(decode=DecodeConfig(max_pixels=5)).fingerprint("manifest")
    assert cfg.fingerprint("featurize", "preprocess") != Config(decode=DecodeConfig(max_pixels=5)).fingerprint(
        "featurize", "preprocess")


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
