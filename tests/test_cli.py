"""The command line's error contract: errors a user can fix are one line on stderr and exit status 2; any other
exception is a bug and keeps its traceback (exit status 1)."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

import workbench.cli.layers
from workbench.cli import main as cli
from workbench.cli.common import int_in_range
from workbench.errors import InvalidValueError, is_user_error

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    status = cli.main(list(argv))
    return status, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["analyze", "--out", "x", "--threads", "0"], "argument --threads: 0 is out of range; valid: an integer >= 1"),
        (["analyze", "--out", "x", "--threads", "two"], "argument --threads: 'two' is not an integer"),
        (
            ["analyze", "--out", "x", "--nbits", "5"],
            "argument --nbits: unsupported bit width 5; valid: 1, 2, 3, 4, 6, 8",
        ),
        (["analyze", "--out", "x", "--num-recipes", "0"], "argument --num-recipes: 0 is out of range"),
        (["analyze", "--out", "x", "--group-size", "-1"], "argument --group-size: -1 is out of range"),
        (["analyze", "--out", "x", "--trajectory-steps", "0"], "argument --trajectory-steps: 0 is out of range"),
        (["analyze", "--out", "x", "--seed", "-3"], "argument --seed: -3 is out of range; valid: an integer >= 0"),
        (["layers", "--min-numel", "-1"], "argument --min-numel: -1 is out of range"),
        (["export", "--out", "x", "--nbits", "7"], "argument --nbits: unsupported bit width 7"),
        (["report", "--threads", "0"], "argument --threads: 0 is out of range"),
        (["analyze"], "the following arguments are required: --out"),
        (["report", "--notebooks", "9"], "unknown notebook '9'; valid: numbers 1-6"),
        (["report", "--run", "../up"], "run name '../up' must be a plain folder name"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(capsys, argv, message):
    status, err = run_cli(capsys, *argv)
    assert status == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"workbench {argv[0]}: error: ") and message in err, err


def _python(cwd, *args: str) -> subprocess.CompletedProcess:
    """This interpreter in a fresh process in `cwd`, with the checkout on its path and nothing else of ours."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_threads_0_in_a_real_process_exits_2_with_one_line(tmp_path):
    proc = _python(tmp_path, "-m", "workbench.cli", "analyze", "--out", str(tmp_path / "out"), "--threads", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "workbench analyze: error: argument --threads: 0 is out of range; valid: an integer >= 1 "
        "(see `workbench analyze --help`)"
    ]
    assert not (tmp_path / "out").exists()


@pytest.fixture
def trained(monkeypatch):
    """`workbench train` runs for real up to the training itself, which records the config it was given instead."""
    import workbench.demo.train

    configs = []
    monkeypatch.setattr(workbench.demo.train, "train", lambda config, out, **kwargs: configs.append(config))
    return configs


@pytest.mark.parametrize("value", ["ture", "maybe", "", "2", "yes!"])
def test_set_rejects_a_boolean_it_cannot_read(capsys, trained, value):
    status, err = run_cli(capsys, "train", "--set", f"zero_terminal_snr={value}")
    assert status == 2 and len(err.strip().splitlines()) == 1 and trained == []
    assert f"--set zero_terminal_snr={value!r} is not a boolean" in err and "true" in err and "no" in err


@pytest.mark.parametrize(
    "override, message",
    [
        ("unet_steps=abc", "--set unet_steps='abc' is not of the field's type int; valid: an integer"),
        ("unet_steps=2.5", "--set unet_steps='2.5' is not of the field's type int"),
        ("vae_lr=fast", "--set vae_lr='fast' is not of the field's type float; valid: a number"),
        ("unet_channels=32,x", "--set unet_channels='32,x' is not of the field's type tuple[int, ...]"),
        ("no_such_key=1", "--set expects KEY=VALUE with KEY one of"),
        ("unet_steps", "--set expects KEY=VALUE"),
        ("unet_steps=-1", "--set unet_steps=-1: unet_steps must be >= 0, got -1"),
        ("unet_batch=0", "unet_batch must be >= 1, got 0"),
    ],
)
def test_set_rejects_unknown_keys_and_unparsable_or_invalid_values(capsys, trained, override, message):
    status, err = run_cli(capsys, "train", "--set", override)
    assert status == 2 and len(err.strip().splitlines()) == 1 and trained == []
    assert message in err, err


@pytest.mark.parametrize(
    "spelling, value", [("True", True), ("false", False), ("1", True), ("0", False), ("YES", True), ("no", False)]
)
def test_set_reads_every_spelling_of_a_boolean_into_the_trained_config(capsys, trained, tmp_path, spelling, value):
    from workbench.demo.config import TrainConfig

    out = str(tmp_path / "model")
    status, err = run_cli(capsys, "train", "--out", out, f"--set=zero_terminal_snr={spelling}", "--set=unet_steps=3")
    assert status == 0, err
    assert trained == [TrainConfig(zero_terminal_snr=value, unet_steps=3)]


def test_config_file_and_set_combine_with_the_set_winning(capsys, trained, tmp_path):
    from workbench.demo.config import TrainConfig

    (tmp_path / "config.json").write_text('{"unet_steps": 7, "vae_steps": 9}')
    argv = ["train", "--out", str(tmp_path / "m"), "--config", str(tmp_path / "config.json"), "--set", "vae_steps=2"]
    assert run_cli(capsys, *argv)[0] == 0
    assert trained == [TrainConfig(unet_steps=7, vae_steps=2)]
    (tmp_path / "config.json").write_text('{"steps": 7}')
    status, err = run_cli(capsys, *argv)
    assert status == 2 and "unknown TrainConfig keys ['steps']" in err and len(trained) == 1


def test_python_m_demo_train_reads_set_with_the_same_parser(capsys, trained, tmp_path):
    from workbench.demo.config import TrainConfig
    from workbench.demo.train import main

    with pytest.raises(SystemExit) as exited:
        main(["--out", str(tmp_path), "--set", "zero_terminal_snr= yes please"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.strip().splitlines()[-1].endswith(
        "error: --set zero_terminal_snr=' yes please' is not a boolean; valid: true, 1, yes, false, 0, no (any case)"
    )
    assert main(["--out", str(tmp_path), "--set", "zero_terminal_snr=no"]) == 0
    assert trained == [TrainConfig(zero_terminal_snr=False)]


def test_train_checks_its_options_before_importing_torch(tmp_path):
    code = (
        "import argparse, sys\n"
        "from workbench.cli.train import run\n"
        "from workbench.errors import InvalidValueError\n"
        "args = argparse.Namespace(set=['unet_steps=x'], config=None, card_only=False, out=None)\n"
        "try:\n"
        "    run(args)\n"
        "except InvalidValueError as err:\n"
        "    print(err)\n"
        "print('torch' in sys.modules)\n"
    )
    proc = _python(tmp_path, "-c", code)
    assert proc.returncode == 0, proc.stderr
    refused = "--set unet_steps='x' is not of the field's type int; valid: an integer"
    assert proc.stdout.splitlines() == [refused, "False"]


@pytest.mark.parametrize("error", [ValueError("internal"), KeyError("internal"), FileNotFoundError("internal")])
def test_an_internal_error_keeps_its_traceback(monkeypatch, error):
    def broken(args):
        raise error

    monkeypatch.setattr(workbench.cli.layers, "run", broken)
    with pytest.raises(type(error)) as raised:
        cli.main(["layers"])
    assert raised.value is error


@pytest.mark.parametrize("error", ["ValueError", "KeyError"])
def test_an_internal_error_in_a_real_process_prints_a_traceback_and_exits_1(tmp_path, error):
    code = (
        "import sys\nimport workbench.cli.layers\nfrom workbench.cli.main import main\n"
        "def broken(args):\n"
        f"    raise {error}('internal bug')\n"
        "workbench.cli.layers.run = broken\n"
        "sys.exit(main(['layers']))\n"
    )
    proc = _python(tmp_path, "-c", code)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "in broken" in proc.stderr
    assert f"{error}: " in proc.stderr and "error: internal bug" not in proc.stderr


def test_user_errors_raised_by_a_command_are_one_line(capsys, monkeypatch):
    def refuse(args):
        raise InvalidValueError("--thing=3 is not valid; valid: 1 or 2")

    monkeypatch.setattr(workbench.cli.layers, "run", refuse)
    assert run_cli(capsys, "layers") == (2, "workbench layers: error: --thing=3 is not valid; valid: 1 or 2\n")


def _user_errors():
    from workbench.coreml import ExportMemoryError
    from workbench.models.loader import ModelNotAvailableError
    from workbench.recipes.recipe import RecipeError
    from workbench.sweep.store import StoreMismatchError

    return [
        RecipeError("recipe x names no layer"),
        StoreMismatchError("store of another run"),
        ModelNotAvailableError("no model at /x"),
        InvalidValueError("--thing=3 is not valid"),
        ExportMemoryError("needs 9 GB"),
    ]


@pytest.mark.parametrize("error", _user_errors(), ids=lambda e: type(e).__name__)
def test_errors_raised_from_every_layer_are_one_line_from_a_command(capsys, monkeypatch, error):
    monkeypatch.setattr(workbench.cli.layers, "run", lambda args: (_ for _ in ()).throw(error))
    assert run_cli(capsys, "layers") == (2, f"workbench layers: error: {error}\n")


def test_user_errors_still_reach_code_that_catches_the_builtin_types():
    from workbench.demo.config import TrainConfig
    from workbench.models.loader import check_model

    with pytest.raises(FileNotFoundError, match="/nonexistent/model"):  # the type callers caught before
        check_model("/nonexistent/model")
    with pytest.raises(ValueError, match="unet_steps"):
        TrainConfig().with_overrides(["unet_steps=x"])
    assert not is_user_error(ValueError("x")) and not is_user_error(KeyError("x")) and not is_user_error(OSError())


def test_int_in_range_names_the_value_and_the_range():
    parse = int_in_range(1, 8)
    assert parse("8") == 8
    for text, message in [("9", "9 is out of range; valid: an integer from 1 to 8"), ("1.5", "'1.5' is not an int")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)


def test_group_size_that_divides_no_layer_is_a_user_error(capsys, tmp_path):
    status, err = run_cli(
        capsys, "analyze", "tiny-sd", "--out", str(tmp_path / "o"), "--group-size", "7", "--nbits", "4", "--quiet"
    )
    # (transformers may print an import-time notice first: not ours)
    assert status == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "workbench analyze: error: group_size=7 does not divide the output channels 32, 64, 128, 512 of the "
        "candidate layers"
    )
    assert not (tmp_path / "o" / "preanalysis.json").exists()


def test_analyze_refuses_refined_without_size_aware_and_data_aware_on_workers(capsys, tmp_path):
    code, err = run_cli(capsys, "analyze", "tiny-sd", "--out", str(tmp_path), "--data-aware", "--workers", "2")
    assert code == 2 and "--data-aware runs in one process" in err and "--workers 2" in err
    code, err = run_cli(capsys, "analyze", "tiny-sd", "--out", str(tmp_path), "--strategies", "apple", "refined")
    assert code == 2 and "add 'size-aware'" in err
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


def test_resolution_sets_the_square_size_the_analysis_measures_at(capsys, tmp_path):
    from workbench.models.tiny import tiny_sd_pipeline

    (tmp_path / "prompts.txt").write_text("a red circle\n")
    out = tmp_path / "out"
    prompts = str(tmp_path / "prompts.txt")
    argv = ["analyze", "tiny-sd", "--out", str(out), "--resolution", "48", "--nbits", "2", "--min-numel", "30000",
            "--num-recipes", "1", "--strategies", "apple", "--prompts", prompts, "--quiet"]  # fmt: skip
    assert run_cli(capsys, *argv)[0] == 0
    run = json.loads((out / "run.json").read_text())
    factor = tiny_sd_pipeline().vae_scale_factor
    assert run["config"]["height"] == run["config"]["width"] == 48
    assert run["identity"]["latent_shape"][-2:] == [48 // factor, 48 // factor]
    status, err = run_cli(capsys, "analyze", "tiny-sd", "--out", str(tmp_path / "bad"), "--resolution", "50")
    assert status == 2 and "resolution=50 must be a positive multiple of 8 pixels" in err
