"""Flags are generated from the config dataclasses: one spelling per key in every command."""
from __future__ import annotations

import argparse

import pytest

from imgfeat.cli import build_parser
from imgfeat.featurize.stage_cli import build_parser as featurize_parser
from imgfeat.featurize.stage_cli import config_from_args
from imgfeat.metadata.config import Config


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _config_flags(parser: argparse.ArgumentParser) -> dict[str, tuple[str, ...]]:
    return {a.dest.split(":", 1)[1]: tuple(a.option_strings) for a in parser._actions if a.dest.startswith("config:")}


def test_every_command_spells_a_key_the_same_way():
    commands = {name: _config_flags(p) for name, p in _subparsers(build_parser()).items()}
    commands["python -m imgfeat.featurize"] = _config_flags(featurize_parser())
    spelling: dict[str, tuple[str, ...]] = {}
    valid = {f"{s}.{k}" for s, sec in Config().to_dict().items() for k in sec}
    for name, flags in commands.items():
        for key, options in flags.items():
            assert key in valid, f"{name}: flag for unknown key {key}"
            assert spelling.setdefault(key, options) == options, f"{name} spells {key} as {options}, not {spelling[key]}"
    # the keys several commands share, flagged everywhere they are offered
    assert spelling["preprocess.num_workers"] == ("--num-workers",)
    assert spelling["spark.master"] == ("--master",)
    assert {"manifest", "featurize", "prep", "pca", "run"} <= set(commands)


def test_generated_flags_set_their_keys_and_win_over_set():
    args = featurize_parser().parse_args(["--manifest", "m", "--out", "f", "--no-channels-last", "--precision", "bf16",
                                          "--num-workers", "0", "--set", "featurize.precision=fp16",
                                          "--set", "featurize.layer=layer4"])
    cfg = config_from_args(args)
    assert cfg.featurize.channels_last is False and cfg.featurize.precision == "bf16"
    assert cfg.preprocess.num_workers == 0 and cfg.featurize.layer == "layer4"
    defaults = config_from_args(featurize_parser().parse_args(["--manifest", "m", "--out", "f"]))
    assert defaults == Config().validate()


def test_choices_come_from_the_config(capsys):
    with pytest.raises(SystemExit):
        featurize_parser().parse_args(["--manifest", "m", "--out", "f", "--pool", "mean"])
    assert "invalid choice: 'mean'" in capsys.readouterr().err


def test_run_takes_stage_lists_and_sources():
    from imgfeat.run_cli import config_from_args as run_config

    args = build_parser().parse_args(["run", "a", "b", "--out", "o", "--stages", "manifest,featurize", "--k", "3"])
    cfg = run_config(args)
    assert cfg.run.sources == ["a", "b"] and cfg.run.stages == ["manifest", "featurize"] and cfg.pca.k == 3
