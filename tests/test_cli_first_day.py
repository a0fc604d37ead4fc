"""What a user meets on the first day: errors found before heavy work, in one line; `--set` for any key;
stage flags on `run`; decoders that do not flood the terminal."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from imgfeat.metadata.config import Config, load_config, parse_setting

REPO = Path(__file__).resolve().parent.parent


def imgfeat(*args: str, env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgfeat", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_set_is_typed_like_toml() -> None:
    cfg = load_config(None, settings=["pca.k=32", "featurize.model=resnet18", "manifest.split_ratios={train=0.5, test=0.5}",
                                      "run.stages=['manifest', 'featurize']", "featurize.compile=true",
                                      "spark.conf.spark.executor.memory=4g", "featurize.weights=\"none\""])
    assert cfg.pca.k == 32 and cfg.featurize.model == "resnet18" and cfg.featurize.compile is True
    assert cfg.manifest.split_ratios == {"train": 0.5, "test": 0.5}
    assert cfg.run.stages == ["manifest", "featurize"]
    assert cfg.spark.conf == {"spark.executor.memory": "4g"} and cfg.featurize.weights == "none"


def test_set_keeps_other_table_entries_and_flags_win(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('[spark.conf]\n"spark.a" = "1"\n[pca]\nk = 8\n')
    cfg = load_config(str(conf), {"pca": {"k": 16}}, ["spark.conf.spark.b=2", "pca.k=12"])
    assert cfg.spark.conf == {"spark.a": "1", "spark.b": "2"}
    assert cfg.pca.k == 16  # an explicit stage flag wins over --set, which wins over the file


@pytest.mark.parametrize("item, message", [
    ("pca.kk=3", "unknown key pca.kk"),
    ("pcaa.k=3", "unknown config section [pcaa]"),
    ("pca.k", "expected SECTION.KEY=VALUE"),
    ("pca.k=many", "pca.k must be an integer"),
    ("featurize.model.x=1", "featurize.model is not a table"),
])
def test_set_mistakes_name_the_key(item: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, settings=[item])


def test_config_file_and_regex_mistakes_say_what_is_wrong(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("k = 3\n")
    with pytest.raises(ValueError, match=r"k = 3 is outside any section"):
        load_config(str(conf))
    with pytest.raises(ValueError, match=r"manifest.label_regex .* is not a valid regular expression"):
        load_config(None, settings=["manifest.label_from=regex", "manifest.label_regex=(?P<label>[a-z]+"])
    with pytest.raises(ValueError, match=r"manifest.label_regex needs a named group"):
        load_config(None, settings=["manifest.label_from=regex", "manifest.label_regex=([a-z]+)"])


def test_parse_setting_takes_plain_strings() -> None:
    assert parse_setting("featurize.layer=layer4.2.relu", Config()) == ("featurize", "layer", "layer4.2.relu")


def test_run_without_weights_fails_at_once_in_one_line(tmp_path: Path) -> None:
    """The default model with no cached weights: found before Spark starts, one line, exit 2, nothing written."""
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    (src / "x.jpg").write_bytes(b"\xff\xd8\xff")
    out = tmp_path / "run"
    t = time.perf_counter()
    # The closed proxy port makes the download attempt fail at once on any machine.
    proc = imgfeat("run", str(tmp_path / "src"), "--out", str(out),
                   env={"TORCH_HOME": str(tmp_path / "th"), "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"})
    seconds = time.perf_counter() - t
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("imgfeat: error: featurize.weights: resnet50"), proc.stderr
    assert "Traceback" not in proc.stderr and "--weights-path" in lines[0]
    assert not (out / "manifest").exists() and not (out / "manifest_summary.json").exists()
    assert seconds < 60, seconds  # generous: no Spark job ran (that alone takes longer on this machine)


@pytest.mark.parametrize("args, message", [
    (["run", "/no/such/folder", "--out", "{tmp}/r", "--set", "featurize.weights=none"], "SRC '/no/such/folder': no such folder"),
    (["run", "{tmp}/src", "--out", "{tmp}/r", "--set", "pca.kk=1"], "unknown key pca.kk"),
    (["run", "{tmp}/src", "--out", "{tmp}/r", "--weights-path", "{tmp}/missing.pth"], "featurize.weights_path: no such file"),
    (["run", "{tmp}/src", "--out", "{tmp}/r", "--model", "resnet_fifty"], "featurize.model: 'resnet_fifty' is not a torchvision model"),
    (["featurize", "--manifest", "{tmp}", "--out", "{tmp}/f"], "no manifest_summary.json there"),
    (["manifest", "{tmp}", "--out", "{tmp}/m", "--set", "manifest.validation=deep"], "manifest.validation must be"),
])
def test_expected_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "src").mkdir()
    proc = imgfeat(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("imgfeat: error: "), proc.stderr
    assert message in lines[0], lines[0]


def test_featurize_without_weights_fails_before_reading_the_manifest_rows(tmp_path: Path) -> None:
    """``imgfeat featurize`` runs the same weights check as ``imgfeat run``: one line naming the fixes."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest_summary.json").write_text("{}")
    proc = imgfeat("featurize", "--manifest", str(tmp_path / "m"), "--out", str(tmp_path / "f"), "--model", "resnet18",
                   env={"TORCH_HOME": str(tmp_path / "th"), "https_proxy": "http://127.0.0.1:9",
                        "HTTPS_PROXY": "http://127.0.0.1:9"})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("imgfeat: error: featurize.weights: resnet18") and "--weights none" in lines[0], lines[0]
    assert not list((tmp_path / "f").iterdir())  # the folder was only proven writable


@pytest.mark.parametrize("args, message", [
    (["manifest", "{tmp}/src", "--out", "{tmp}/afile"], "--out {tmp}/afile: is a file, not a folder"),
    (["manifest", "{tmp}/src", "--out", "{tmp}/afile/sub"], "--out {tmp}/afile/sub: cannot write there"),
    (["manifest", "{tmp}/src", "--out", "{tmp}/src/out"], "--out '{tmp}/src/out' is inside SRC"),
    (["manifest", "--show", "{tmp}/afile"], "--show {tmp}/afile: no manifest_summary.json there"),
    (["featurize", "--manifest", "{tmp}/m", "--out", "{tmp}/afile"], "--out {tmp}/afile: is a file, not a folder"),
    (["prep", "--manifest", "{tmp}/m", "--out", "{tmp}/afile"], "--out {tmp}/afile: is a file, not a folder"),
    (["pca", "--manifest", "{tmp}/m", "--features", "{tmp}/nofeat", "--out", "{tmp}/p"], "--features {tmp}/nofeat: no such folder"),
    (["pca", "--manifest", "{tmp}/m", "--features", "{tmp}/m", "--out", "{tmp}/afile"], "--out {tmp}/afile: is a file"),
    (["neighbors", "--manifest", "{tmp}/m", "--features", "{tmp}/m", "--out", "{tmp}/afile"], "--out {tmp}/afile: is a file"),
    (["verify", "--manifest", "{tmp}/m", "--features", "{tmp}/nofeat"], "--features {tmp}/nofeat: no such folder"),
])
def test_output_folder_mistakes_are_found_before_heavy_work(tmp_path: Path, args: list[str], message: str) -> None:
    """An --out that is a file, lies under a file or inside a source folder, and a --features folder that is not
    there: one line, exit 2, before Spark or a model starts (seconds), nothing written."""
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.jpg").write_bytes(b"\xff\xd8\xff")
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest_summary.json").write_text("{}")
    t = time.perf_counter()
    proc = imgfeat(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    seconds = time.perf_counter() - t
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("imgfeat: error: "), proc.stderr
    assert message.replace("{tmp}", str(tmp_path)) in lines[0], lines[0]
    assert not (tmp_path / "src" / "out").exists() and (tmp_path / "afile").read_text() == "not a folder"
    assert seconds < 30, seconds  # no Spark session and no model: a Spark start alone takes longer here


def test_pca_k_and_fit_split_mistakes_are_found_before_spark(tmp_path: Path) -> None:
    """`pca --k` above the width written in the shards' markers, a fit split the manifest lacks: one line
    naming the key, before Spark starts."""
    from imgfeat.metadata.contracts import feature_store

    ids = [f"id{i}" for i in range(6)]
    feature_store.write_feature_shard(str(tmp_path / "f"), 0, ids, np.ones((6, 4), np.float32), [], "npy", "test")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest_summary.json").write_text('{"by_split": {"train": 4, "val": 2}}')
    for args, message in ((["--k", "8"], "pca.k = 8 exceeds the feature width 4"),
                          (["--k", "2", "--set", "pca.fit_split=training"],
                           "pca.fit_split = 'training': the manifest has no such split; its splits: train, val")):
        t = time.perf_counter()
        proc = imgfeat("pca", "--manifest", str(tmp_path / "m"), "--features", str(tmp_path / "f"), "--out",
                       str(tmp_path / "p"), *args)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"imgfeat: error: {message}"), lines[0]
        assert time.perf_counter() - t < 30


def test_quiet_and_verbose_go_before_or_after_the_subcommand() -> None:
    for args in (["-q", "verify", "/nope"], ["verify", "/nope", "-q"]):
        proc = imgfeat(*args)
        assert proc.returncode == 2 and proc.stderr.strip().startswith("imgfeat: error: --manifest /nope"), proc.stderr
    proc = imgfeat("-v", "verify", "/nope")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_ctrl_c_is_one_line_and_exit_130(capsys: pytest.CaptureFixture) -> None:
    import argparse

    from imgfeat.metadata.cli_common import report_errors

    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    assert report_errors(interrupted, argparse.Namespace(verbose=0)) == 130
    assert capsys.readouterr().err == "imgfeat: interrupted; rerun the same command to resume\n"


def test_verbose_shows_the_traceback(tmp_path: Path) -> None:
    proc = imgfeat("run", str(tmp_path), "--out", str(tmp_path / "r"), "--set", "pca.kk=1", "-v")
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "imgfeat: error: " in proc.stderr


def test_run_takes_the_stage_flags() -> None:
    from imgfeat.cli import build_parser

    args = build_parser().parse_args(["run", "src", "--out", "o", "--model", "resnet18", "--k", "8", "--batch-size", "16",
                                      "--precision", "bf16", "--validation", "header", "--weights", "none"])
    from imgfeat.run_cli import config_from_args

    cfg = config_from_args(args)
    assert (cfg.featurize.model, cfg.pca.k, cfg.preprocess.batch_size, cfg.featurize.precision) == ("resnet18", 8, 16, "bf16")
    assert (cfg.manifest.validation, cfg.featurize.weights) == ("header", "none")


def test_decoders_are_quiet_unless_asked(pngsuite_dir: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """libpng writes its warnings to file descriptor 2; the per-file verdict is in the row instead."""
    from imgfeat.metadata.config import PreprocessConfig
    from imgfeat.metadata.manifest.checks import decode_check
    from imgfeat.preprocess.decode import DecodeError, decode_image

    broken = sorted(pngsuite_dir.glob("x*.png"))
    assert broken

    def decode_all() -> None:
        for path in broken:
            data = path.read_bytes()
            decode_check(data, 10**8)
            try:
                decode_image(data, PreprocessConfig())
            except DecodeError:
                pass

    monkeypatch.delenv("IMGFEAT_DECODER_LOGS", raising=False)
    decode_all()
    assert "libpng" not in capfd.readouterr().err
    monkeypatch.setenv("IMGFEAT_DECODER_LOGS", "1")
    decode_all()
    assert "libpng" in capfd.readouterr().err
