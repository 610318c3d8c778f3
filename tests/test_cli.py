"""One command-line style: every command's flags come from its config dataclass (index.core.flags)."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import logging
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from curation import cli as curate_cli
from curation.pipeline import CurateConfig
from distill import cli as distill_cli
from distill.config import DistillConfig
from distill.ranking import RankConfig
from index import cli as index_cli
from index.config import FaissConfig, IndexConfig, load_index_config
from index.core.errors import ConfigError, run_main
from index.core.flags import config_parser, flag_kwargs, log_to_stderr, parse_config
from index.crops import CropConfig
from index.download import DownloadConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = (CurateConfig, DistillConfig, RankConfig, IndexConfig, FaissConfig, CropConfig, DownloadConfig)


# ---------------------------------------------------------------- the generator, on a config of every kind


@dataclass(frozen=True)
class Inner:
    x: int = field(default=1, metadata={"help": "inner x"})


@dataclass(frozen=True)
class Toy:
    name: str = field(metadata={"help": "a required name"})
    count: int = field(default=3, metadata={"help": "how many"})
    ratio: float | None = field(default=None, metadata={"help": "a ratio"})
    on: bool = field(default=True, metadata={"help": "a switch"})
    tags: tuple[str, ...] = field(default=(), metadata={"help": "tags"})
    sizes: tuple[int, ...] = field(default=(1, 2), metadata={"help": "sizes"})
    limit: float | str = field(default="auto", metadata={"help": "'auto' or a number"})
    inner: Inner = field(default_factory=Inner, metadata={"help": "a nested config"})

    def __post_init__(self):
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise ConfigError(f"count must be >= 0; got {self.count!r}")
        if self.limit != "auto":
            object.__setattr__(self, "limit", float(self.limit))


def toy(argv: list[str], **kw) -> Toy:
    return parse_config(Toy, config_parser(Toy, "toy", argv=argv, **kw), argv)[0]


def toy_main(argv: list[str]) -> int:
    return run_main("toy", lambda a: toy(a) and 0, argv)


def test_flags_take_each_field_type():
    assert toy(["--name", "a"]) == Toy(name="a")
    cfg = toy(["--name", "a", "--count", "5", "--ratio", "0.5", "--no-on", "--tags", "x,y", "--sizes", "4,5",
               "--limit", "0.25"])
    assert cfg == Toy(name="a", count=5, ratio=0.5, on=False, tags=("x", "y"), sizes=(4, 5), limit=0.25)
    assert isinstance(cfg.sizes[0], int) and toy(["--name", "a", "--on"]).on is True
    assert toy(["--name", "a", "--tags", ""]).tags == ()


def test_option_kinds_follow_the_field_types():
    assert flag_kwargs(int | None) == {"type": int}
    assert flag_kwargs(float | str) == {"type": str}              # left to the config's own validation
    assert flag_kwargs(bool)["action"].__name__ == "BooleanOptionalAction"
    assert flag_kwargs(dict[str, str]) is None and flag_kwargs(Inner) is None   # config file only
    with pytest.raises(TypeError, match="no command-line flag"):
        flag_kwargs(list[str])


def test_a_required_field_is_required(capsys):
    with pytest.raises(SystemExit) as e:
        toy([])
    assert e.value.code == 2 and "--name" in capsys.readouterr().err


def test_bad_values_are_refused_with_the_config_message(capsys):
    assert toy_main(["--name", "a", "--count", "-1"]) == 2
    assert "toy: error: count must be >= 0; got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:                 # not a number: argparse refuses it, also exit 2
        toy(["--name", "a", "--count", "many"])
    assert e.value.code == 2 and "invalid int value: 'many'" in capsys.readouterr().err


def test_a_config_file_gives_defaults_and_flags_override(tmp_path: Path):
    f = tmp_path / "toy.yaml"
    f.write_text(yaml.safe_dump({"name": "from-file", "count": 7, "tags": ["a", "b"], "inner": {"x": 4}}))
    assert toy(["--config", str(f)]) == Toy(name="from-file", count=7, tags=("a", "b"), inner=Inner(x=4))
    assert toy(["--config", str(f), "--count", "1", "--name", "flag"]) == \
        Toy(name="flag", count=1, tags=("a", "b"), inner=Inner(x=4))
    # a default the command sets (e.g. from the environment) is above the file, under the flags
    assert toy(["--config", str(f)], defaults={"count": 9}).count == 9
    assert toy(["--config", str(f), "--count", "2"], defaults={"count": 9}).count == 2


def test_a_config_file_with_unknown_keys_or_bad_values_is_refused(tmp_path: Path, capsys):
    f = tmp_path / "toy.yaml"
    f.write_text(yaml.safe_dump({"name": "a", "bogus": 1}))
    assert toy_main(["--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) ['bogus']" in err and "valid keys: ['count', 'inner', 'limit'" in err
    f.write_text(yaml.safe_dump({"name": "a", "inner": {"y": 1}}))
    assert toy_main(["--config", str(f)]) == 2 and "valid keys: ['x']" in capsys.readouterr().err
    f.write_text(yaml.safe_dump({"name": "a", "count": -2}))
    assert toy_main(["--config", str(f)]) == 2 and "count must be >= 0" in capsys.readouterr().err
    f.write_text(yaml.safe_dump({"name": "a", "count": "many"}))   # reaches the config as written
    assert toy_main(["--config", str(f)]) == 2 and "count must be >= 0; got 'many'" in capsys.readouterr().err
    assert toy_main(["--config", str(tmp_path / "none.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_help_lists_every_field_with_its_default(tmp_path: Path, capsys):
    with pytest.raises(SystemExit):
        toy(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--name NAME a required name (required)", "--count COUNT how many (default: 3)",
                 "--on, --no-on a switch (default: True)", "tags (default: none)", "sizes (default: 1,2)",
                 "--limit LIMIT 'auto' or a number (default: auto)", "set in the --config file only:",
                 "inner: a nested config", "x: inner x (default: 1)", "--config FILE", "--log-level"):
        assert text in out, text
    f = tmp_path / "toy.yaml"
    f.write_text("count: 11\n")
    with pytest.raises(SystemExit):
        toy(["--config", str(f), "--help"])
    assert "how many (default: 11)" in " ".join(capsys.readouterr().out.split())   # the file's values shown


def test_a_field_without_help_is_a_bug():
    @dataclass
    class Bare:
        n: int = 0

    with pytest.raises(TypeError, match="'n' has no help text"):
        config_parser(Bare, "bare")


def test_library_logs_reach_stderr_through_one_handler(capsys):
    log_to_stderr("info")
    log_to_stderr("info")
    logging.getLogger("curation.thresholds").info("calibration computed: leak %.4g", 0.9)
    logging.getLogger("index.gallery").debug("not shown at info")
    err = capsys.readouterr().err
    assert err == "curation.thresholds: calibration computed: leak 0.9\n"
    log_to_stderr("warning")
    logging.getLogger("distill.run").info("hidden")
    assert capsys.readouterr().err == ""
    log_to_stderr("info")


# ---------------------------------------------------------------- the project's configs and commands


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_of_every_config_has_help(cls):
    missing = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("help")]
    assert not missing, f"{cls.__name__} fields without help metadata: {missing}"


def _flag_fields(cls) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if flag_kwargs(hints[f.name]) is not None]


@pytest.mark.parametrize("main,argv,cls", [
    (curate_cli.main, [], CurateConfig), (distill_cli.main, [], DistillConfig),
    (distill_cli.main, ["train"], DistillConfig), (distill_cli.main, ["rank"], RankConfig),
    (index_cli.build_index_main, [], IndexConfig), (index_cli.download_main, [], DownloadConfig)],
    ids=["curate", "distill", "distill-train", "distill-rank", "build-index", "download-gallery"])
def test_each_command_help_lists_its_config_fields(main, argv, cls, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    flags = _flag_fields(cls)
    assert flags and all(f"--{name.replace('_', '-')}" in out for name in flags)
    for name in set(f.name for f in dataclasses.fields(cls)) - set(flags):   # set in the config file
        assert f"  {name}: " in out


def test_every_console_script_resolves_to_a_callable():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"curate", "distill", "build-index", "download-gallery"}
    for name, target in scripts.items():
        module, attr = target.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), name


def test_curate_flags_parse_to_the_config_they_always_did():
    argv = ["--queries", "q", "--index", "i", "--size", "30", "--out", "o", "--cache-dir", "c", "--seed", "1",
            "--dedup-threshold", "0.99", "--leak-threshold", "0.95", "--verify", "none", "--key-threshold", "1",
            "--leak-review", "r.json", "--strategy", "random", "--changed-images", "skip", "--threads", "1",
            "--executor", "ray", "--num-workers", "3", "--verify-max-residual", "inf"]
    assert curate_cli.parse(argv) == CurateConfig(
        queries="q", index="i", size=30, out="o", cache_dir="c", seed=1, dedup_threshold=0.99, leak_threshold=0.95,
        verify="none", key_threshold=1.0, leak_review="r.json", strategy="random", changed_images="skip", threads=1,
        executor="ray", num_workers=3, verify_max_residual=math.inf)
    assert curate_cli.parse(argv[:8]) == CurateConfig(queries="q", index="i", size=30, out="o")


def test_curate_refuses_a_bad_size_with_exit_2(capsys):
    assert curate_cli.main(["--queries", "q", "--index", "i", "--size", "0", "--out", "o"]) == 2
    assert "curate: error: size must be an integer >= 1; got 0" in capsys.readouterr().err


@pytest.mark.parametrize("prog,main,argv,module,work", [
    ("curate", curate_cli.main, ["--queries", "q", "--index", "i", "--size", "1", "--out", "o"], curate_cli, "curate"),
    ("build-index", index_cli.build_index_main, ["--config", str(ROOT / "jobs" / "demo.yaml"), "--out", "o"],
     index_cli, "build_gallery_index"),
    ("download-gallery", index_cli.download_main, ["--url-list", "u.parquet", "--out", "g"], index_cli,
     "download_gallery"),
    ("distill", distill_cli.main, ["--method", "kd", "--transfer", "t", "--queries", "q", "--out", "o"], distill_cli,
     "run_distill"),
    ("distill rank", distill_cli.main, ["rank", "--queries", "q", "--teachers", "a,b"], distill_cli, "rank")],
    ids=["curate", "build-index", "download-gallery", "distill", "distill-rank"])
def test_ctrl_c_in_every_command_is_one_line_and_status_130(prog, main, argv, module, work, monkeypatch, capsys):
    """Each command's work stopped by Ctrl-C; tests/test_faults.py sends a real SIGINT to a running distill."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(module, work, interrupted)
    assert main(argv) == 130
    captured = capsys.readouterr()
    assert captured.err == f"{prog}: stopped; rerun the same command to resume\n" and captured.out == ""


def test_distill_flags_parse_to_the_config_they_always_did(tmp_path: Path):
    argv = ["--method", "kd_weighted", "--transfer", "t", "--queries", "q", "--out", "o", "--student",
            "test-tiny-student", "--resolution", "16", "--batch-size", "8", "--finetune-epochs", "1", "--no-progress",
            "--teachers", "a,b", "--weight-temperature", "inf", "--baseline", "--workers", "2"]
    want = DistillConfig(method="kd_weighted", transfer="t", queries="q", out="o", student="test-tiny-student",
                         resolution=16, batch_size=8, finetune_epochs=1, progress=False, teachers=("a", "b"),
                         weight_temperature=math.inf, baseline=True, workers=2)
    assert distill_cli.config_from_args(argv) == want
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({**want.to_dict(), "weight_temperature": 10.0}))
    assert distill_cli.config_from_args(["--config", str(f), "--no-baseline"]) == \
        want.replace(weight_temperature=10.0, baseline=False)


def test_rank_flags_parse_to_a_rank_config():
    cfg = distill_cli.rank_config_from_args(["--queries", "q", "--teachers", "a,b", "--probe-accuracy",
                                             "--weight-temperature", "10", "--device", "cpu"])
    assert cfg == RankConfig(queries="q", teachers=("a", "b"), probe_accuracy=True, weight_temperature=10.0,
                             device="cpu")
    with pytest.raises(ConfigError, match="valid choices: auto, cpu, cuda"):
        RankConfig(queries="q", teachers=("a",), device="tpu")


def test_build_index_reads_the_job_config_and_its_flags_override(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    job = ROOT / "jobs" / "demo.yaml"
    cfg, out = index_cli.parse_build(["--config", str(job), "--out", str(tmp_path / "idx")])
    assert cfg == load_index_config(job) and out == str(tmp_path / "idx")
    assert cfg.crops.crops_per_image == 2 and cfg.faiss.shards_per_group == 8     # nested parts from the file
    cfg, _ = index_cli.parse_build(["--config", str(job), "--out", "o", "--gallery", "g/*.tar", "--num-workers", "2",
                                    "--executor", "ray", "--encoders", "a,b", "--threads", "1"])
    assert cfg == load_index_config(job, gallery="g/*.tar", num_workers=2, executor="ray", encoders=["a", "b"],
                                    threads=1)


def test_build_index_defaults_to_ray_under_ray_job_submit(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    job = str(ROOT / "jobs" / "demo.yaml")   # says executor: local
    assert index_cli.parse_build(["--config", job, "--out", "o"])[0].executor == "ray"
    assert index_cli.parse_build(["--config", job, "--out", "o", "--executor", "local"])[0].executor == "local"


def test_download_flags_parse_to_a_download_config(capsys):
    cfg = parse_config(DownloadConfig, config_parser(DownloadConfig, "d"),
                       ["--url-list", "u.parquet", "--out", "g", "--max-side", "512", "--no-resume"])[0]
    assert cfg == DownloadConfig(url_list="u.parquet", out="g", max_side=512, resume=False)
    assert index_cli.download_main(["--url-list", "u.xlsx", "--out", "g"]) == 2
    assert "valid extensions: .txt" in capsys.readouterr().err


def test_library_modules_do_not_print():
    """The library logs (logging.getLogger(__name__)); the commands print their summary lines."""
    commands = {"curation/cli.py", "curation/build_index.py", "distill/cli.py", "index/cli.py",
                "index/core/errors.py"}   # run_main prints a command's error line
    offenders = []
    for pkg in ("index", "curation", "distill"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in commands:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                    offenders.append(f"{rel}:{node.lineno}")
    assert not offenders
