import pytest
import yaml

from medvq.config import RunConfig, build_config, dump_config, load_config
from medvq.errors import MedvqError


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = build_config({"model": {"codebook_size": 64}, "train": {"epochs": 3}})
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again == cfg
    assert again.model.codebook_size == 64 and again.train.epochs == 3
    assert again.data.image_size == RunConfig().data.image_size


def test_unknown_key_is_an_error_naming_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"epoch": 3}}))
    with pytest.raises(MedvqError, match="train.epoch"):
        load_config(path)


def test_image_size_must_fit_model_stride():
    with pytest.raises(MedvqError, match="multiple of the model stride 8"):
        build_config({"data": {"image_size": 100}, "model": {"downsample_layers": 3}})


def test_bad_values_rejected():
    with pytest.raises(MedvqError, match="precision"):
        build_config({"train": {"precision": "fp8"}})
    with pytest.raises(MedvqError, match="val_fraction"):
        build_config({"data": {"val_fraction": 0.6, "test_fraction": 0.5}})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(MedvqError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(MedvqError, match="mapping"):
        load_config(bad)
