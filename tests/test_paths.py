"""package:// paths, including a zip archive split over several installed packages."""
import io
import os
import zipfile

import pytest

from engine.paths import MissingPackageError, PackagePartsError, cache_root, resolve

FILES = {"weights/config.json": b'{"a": 1}', "weights/model.bin": os.urandom(5000), "weights/sub/vocab.txt": b"x\ny\n"}
URI = "package://fake-model-part_*/input/fake-model.zip/weights"


def split_packages(root, n_parts=3, skip=(), name="fake-model"):
    """Fake installed packages `fake-model-part_00N/input/fake-model.zip.00N` holding a split zip."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for path, data in FILES.items():
            z.writestr(path, data)
    blob = buf.getvalue()
    size = -(-len(blob) // n_parts)
    for i in range(n_parts):
        if i + 1 in skip:
            continue
        pkg = root / f"{name}-part_{i + 1:03d}"
        (pkg / "input").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "input" / f"{name}.zip.{i + 1:03d}").write_bytes(blob[i * size:(i + 1) * size])
    return root


@pytest.fixture
def site(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    return root


def test_parts_are_joined_unzipped_once_and_reused(site):
    split_packages(site)
    folder = resolve(URI)
    assert folder.startswith(str(cache_root()))
    for path, data in FILES.items():
        with open(os.path.join(folder, path.split("/", 1)[1]), "rb") as f:
            assert f.read() == data
    marker = os.path.join(os.path.dirname(folder), ".complete")
    stamp = os.stat(marker).st_mtime_ns
    assert resolve(URI) == folder and os.stat(marker).st_mtime_ns == stamp  # not assembled again
    assert not list(cache_root().glob("*.tmp*"))  # no half-written folder left behind


def test_a_missing_middle_part_is_named(site):
    split_packages(site, skip=(2,))
    with pytest.raises(PackagePartsError, match="piece.s. 002 of fake-model.zip missing"):
        resolve(URI)


def test_a_missing_last_part_is_not_a_zip(site):
    split_packages(site, skip=(3,))
    with pytest.raises(PackagePartsError, match="not a valid zip"):
        resolve(URI)
    assert not list(cache_root().glob("fake-model-*/.complete"))


def test_no_package_installed(site):
    with pytest.raises(MissingPackageError, match="no installed package matches 'fake-model-part_\\*'"):
        resolve(URI)


def test_a_glob_must_name_a_zip(site):
    split_packages(site)
    with pytest.raises(PackagePartsError, match="name it"):
        resolve("package://fake-model-part_*/input")


def test_model_loads_through_a_multi_part_package(site, tiny_bert):
    """The whole path a recipe takes: model.name_or_path=package://...*/x.zip/folder."""
    from pathlib import Path

    from engine.config import ModelConfig
    from engine.modeling import load_model, load_tokenizer

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in Path(tiny_bert).iterdir():
            z.write(f, f"tiny/{f.name}")
    blob = buf.getvalue()
    half = len(blob) // 2
    for i, chunk in enumerate((blob[:half], blob[half:]), 1):
        pkg = site / f"tiny-part_{i:03d}"
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        (pkg / f"tiny.zip.{i:03d}").write_bytes(chunk)
    cfg = ModelConfig(name_or_path="package://tiny-part_*/tiny.zip/tiny")
    model = load_model(cfg, ["neg", "pos"], load_tokenizer(cfg))
    assert model.config.num_labels == 2
