"""The `ltsweep` command exposes exactly its documented subcommands, and reports input errors as one line."""

import subprocess
import sys
from pathlib import Path

import pytest

from lt_models.errors import AnnotationError
from pipelines import cli


def _subcommands(parser):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return action.choices
    return {}


def test_pinned_subcommands_exist():
    top = _subcommands(cli.build_parser())
    assert set(top) == {"demo", "data", "stage0", "train", "sweep", "confirm", "eval", "compare"}
    assert set(_subcommands(top["data"])) == {"synth", "stats", "convert-openimages"}


def test_input_error_is_one_line_exit_2(monkeypatch, capsys):
    def boom(args):
        raise AnnotationError("train.json: annotation id 7: field 'category_id' = 99 is unknown; fix the id")

    parser = cli.build_parser()
    _subcommands(_subcommands(parser)["data"])["synth"].set_defaults(func=boom)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    rc = cli.main(["data", "synth", "--out", "x"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == "ltsweep: error: train.json: annotation id 7: field 'category_id' = 99 is unknown; fix the id"


def test_unknown_subcommand_exits_nonzero():
    with pytest.raises(SystemExit) as exc:
        cli.main(["nope"])
    assert exc.value.code != 0


def test_confirm_options_and_a_missing_sweep_is_one_line_exit_2(tmp_path, capsys):
    confirm = _subcommands(cli.build_parser())["confirm"]
    opts = {o for a in confirm._actions for o in a.option_strings}
    assert {"--top", "--seeds", "--tracking-uri", "--storage-path"} <= opts
    rc = cli.main(["confirm", "nosuch", "--top", "2", "--seeds", "3", "--storage-path", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "no sweep 'nosuch'" in err and "--storage-path" in err


def test_bad_input_raised_in_a_ray_task_prints_its_own_line(monkeypatch, capsys):
    class RayTaskAnnotationError(AnnotationError):  # what Ray builds: an instance of both, with a traceback text
        def __init__(self, cause):
            super().__init__("ray::_train_stage1_task() (pid=7, ip=127.0.0.1)\n  File ...\n" + str(cause))
            self.cause = cause

    def boom(args):
        raise RayTaskAnnotationError(AnnotationError("train.json: image id 3: field 'width' is missing; fix it"))

    parser = cli.build_parser()
    _subcommands(parser)["sweep"].set_defaults(func=boom)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main(["sweep", "x.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "ltsweep: error: train.json: image id 3: field 'width' is missing; fix it"
    opts = {o for a in _subcommands(parser)["sweep"]._actions for o in a.option_strings}
    opts_train = {o for a in _subcommands(parser)["train"]._actions for o in a.option_strings}
    assert "--skip-invalid" in opts and "--skip-invalid" in opts_train


def test_errored_trial_options_need_resume(tmp_path, capsys):
    sweep = _subcommands(cli.build_parser())["sweep"]
    opts = {o for a in sweep._actions for o in a.option_strings}
    assert {"--resume-errored", "--restart-errored"} <= opts
    with pytest.raises(SystemExit):  # one or the other
        cli.build_parser().parse_args(["sweep", "x.yaml", "--resume-errored", "--restart-errored"])
    capsys.readouterr()
    from lt_models.errors import ConfigError
    from pipelines.tune.sweep import run_sweep

    with pytest.raises(ConfigError, match="--resume-errored needs --resume"):
        run_sweep(
            type("Cfg", (), {"name": "x", "run": type("R", (), {"storage_path": tmp_path})()})(), errored="resume"
        )


def test_every_option_has_help_and_version_and_sweep_set(capsys):
    parser = cli.build_parser()

    def missing(p, path):
        out = []
        for a in p._actions:
            if a.__class__.__name__ == "_SubParsersAction":
                for name, sub in a.choices.items():
                    out += missing(sub, path + [name])
            elif a.help is None and a.dest != "help":
                out.append((" ".join(path), a.option_strings or a.dest))
        return out

    assert missing(parser, []) == []
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("ltsweep ")
    args = parser.parse_args(["sweep", "x.yaml", "--set", "search.seeds=[0,1]"])
    assert args.set == ["search.seeds=[0,1]"]
    assert parser.parse_args(["compare", "a", "b", "--json"]).json


@pytest.mark.parametrize(
    "command", [[sys.executable, "-m", "pipelines"], [str(Path(sys.executable).parent / "ltsweep")]]
)
def test_python_m_pipelines_and_the_ltsweep_script_are_one_cli(command, tmp_path):
    """`python -m pipelines sweep X.yaml` and `ltsweep sweep X.yaml` run the same command: bad input is one line
    naming the file, exit code 2."""
    missing = tmp_path / "missing.yaml"
    done = subprocess.run([*command, "sweep", str(missing)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"ltsweep: error: {missing}: config file not found; give a path to a "
        "YAML file (packaged examples live in search_spaces/)"
    ]
