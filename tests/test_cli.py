import yaml
from typer.testing import CliRunner

from medvq.cli import app, resolve_config

runner = CliRunner()


def test_config_command_prints_all_defaults_as_yaml():
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.stdout)
    assert set(cfg) == {"method", "data", "model", "train", "score"}
    assert cfg["model"]["beta"] == 0.25


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 7, "batch_size": 4}, "model": {"codebook_size": 64}}))
    cfg = resolve_config(path, {"train": {"epochs": 9}, "data": {"train_classes": ["NORMAL", "DRUSEN"]}})
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.model.codebook_size) == (9, 4, 64)
    assert cfg.data.train_classes == ["NORMAL", "DRUSEN"]


def test_help_lists_seed_hyperparameters_with_aliases():
    result = runner.invoke(app, ["train", "vqvae", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in ("--batch-size", "--epochs", "--hidden-channels", "--n-hiddens", "--residual-channels", "--residual-layers",
                 "--embedding-dim", "--codebook-size", "--n-embeddings", "--beta", "--learning-rate", "--dropout", "--patience",
                 "--min-delta", "--device", "--image-size", "--precision", "--seed"):
        assert flag in result.output, flag


def test_bad_flag_value_is_a_one_line_error(tmp_path):
    result = runner.invoke(app, ["train", "vqvae", "--data", str(tmp_path), "--precision", "fp8"])
    assert result.exit_code == 2 and "precision" in result.output


def test_phantom_command(tmp_path):
    result = runner.invoke(app, ["phantom", "--out", str(tmp_path / "p"), "-n", "12", "--height", "64", "--width", "64"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "p").rglob("*.jpeg"))) == 12
    assert len(list((tmp_path / "p" / "masks").rglob("*.png"))) == 12


def test_version_flag():
    import medvq

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"medvq {medvq.__version__}"


def test_help_loads_neither_torch_nor_a_model():
    """`medvq --help` and every `medvq <cmd> --help` must start fast: the configs and the registry import no torch."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom medvq.cli import app\n"
        "for args in (['--help'], ['train', 'vqvae', '--help'], ['train', 'patchcore', '--help'], ['infer', '--help']):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
        "heavy = sorted(m for m in ('torch', 'lightning', 'vector_quantize_pytorch', 'scipy', 'matplotlib') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"--help imported {out}"


def test_a_method_fitted_in_one_pass_shows_no_gradient_training_flags():
    """`medvq train patchcore` fits in one pass: no epochs, optimiser, early stopping or --resume; a trained method keeps them."""
    fitted = runner.invoke(app, ["train", "patchcore", "--help"], env={"COLUMNS": "200"}).output
    trained = runner.invoke(app, ["train", "featvq", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--epochs", "--patience", "--min-delta", "--learning-rate", "--lr-schedule", "--resume", "--samples-per-epoch", "--strategy", "--zoom", "--hflip"):
        assert flag not in fitted and flag in trained, flag
    for flag in ("--batch-size", "--seed", "--device", "--coreset-ratio"):
        assert flag in fitted, flag
    result = runner.invoke(app, ["train", "patchcore", "--data", ".", "--epochs", "3"])
    assert result.exit_code == 2 and "No such option" in result.output


def test_every_declared_method_has_a_train_command_and_model_config():
    from medvq.config import build_config
    from medvq.models.registry import methods

    listed = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    for method in methods():
        assert method.name in listed
        assert runner.invoke(app, ["train", method.name, "--help"]).exit_code == 0
        assert isinstance(build_config({"method": method.name}).model, method.config)


def test_speed_flags_show_their_defaults_from_the_config():
    from medvq.config import InferenceConfig

    defaults = InferenceConfig()
    for command in ("evaluate", "infer"):
        text = " ".join(runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output.split())
        for name in ("batch_size", "workers", "precision"):  # the help dropped them (read as a markup tag)
            assert f"(default: {getattr(defaults, name)})" in text, (command, name)
    text = " ".join(runner.invoke(app, ["explain", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "gradient-weighted heads) (default: gradcam)" in text


def test_commands_that_run_a_model_default_to_the_training_device():
    for command in ("evaluate", "infer", "explain", "sample"):
        text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        assert "[default: auto]" in text, command
