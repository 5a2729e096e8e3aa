"""The registry finds each method's parts in its folder: the standard files and names, the folder's name."""

from __future__ import annotations

import pytest

from medvq.models.registry import _learning_file, get_method, methods


def test_every_method_is_named_after_its_folder_and_has_its_parts_there():
    for method in methods():
        assert method.package == f"medvq.models.{method.name}" and get_method(method.name) is method
        assert method.build_model.module == f"{method.package}.model" and method.compute_maps.module == f"{method.package}.anomaly_map"
        assert (method.training_module is None) == (method.training == "fit") == (method.fit is not None)
    assert get_method("patchcore").training == "fit" and get_method("vqvae").training == "train"


@pytest.mark.parametrize("files, message", [(("lightning.py", "fit.py"), "not lightning.py and fit.py"), ((), "not neither")])
def test_a_folder_holds_lightning_py_or_fit_py(tmp_path, monkeypatch, files, message):
    package = f"methods_{tmp_path.name}"  # a package name of its own for each case: imported packages stay in sys.modules
    folder = tmp_path / package / "broken"
    folder.mkdir(parents=True)
    for name in ("__init__.py", *files):
        (folder / name).write_text("")
    (folder.parent / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TypeError, match=message):
        _learning_file(f"{package}.broken")
