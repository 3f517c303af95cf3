"""The ImageNet-LT / iNaturalist 2018 readers (pipelines/sources/file_lists.py) and their build_dataset wiring:
the training list defines the classes and the test list is read onto them; stray labels, classes only in
the test list, missing classes and annotations of unknown images are errors naming the file and line.

The small fixtures under tests/fixtures/lists are made by tests/fixtures/make_fixtures.py in the real
formats; the tests of the real ImageNet-LT and iNaturalist lists (their counts, ids and format quirks are the
facts checked) read them where present and skip without them (tests/helpers/real_data.py).

    python -m pytest tests/test_file_lists.py -q
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mixtail.errors import DataError
from mixtail.pipelines.config import DataConfig
from mixtail.pipelines.sources.types import DataNotFound, ImageFiles
from mixtail.pipelines.sources.build import build_dataset, training_classes
from mixtail.pipelines.sources.file_lists import category_labels, read_file_list, read_inat_json, read_listed_dataset

from helpers.real_data import REAL_LISTS, require

FIXTURES = Path(__file__).resolve().parent / "fixtures"
IMAGES = FIXTURES / "images"
LISTS = FIXTURES / "lists"


# Check caches and bad-file listings go to each test's own folder, never to ~/.cache (conftest.py).
pytestmark = pytest.mark.usefixtures("private_cache")


def _real(name: str) -> Path:
    return require(REAL_LISTS / name, "the real list's contents (counts, ids, format quirks) are the facts checked")


# --------------------------------------------------------------------------------------------------
# Fixtures in the real formats
# --------------------------------------------------------------------------------------------------


def test_imagenet_lt_list_fixture():
    ds = read_file_list(LISTS / "imagenet_lt_train.txt", IMAGES)
    assert isinstance(ds, ImageFiles)
    assert len(ds) == 10 and np.bincount(ds.labels).tolist() == [6, 3, 1]
    assert ds.files[0] == str((IMAGES / "train/class_a/0.jpg").resolve())
    assert all(Path(f).is_absolute() and Path(f).is_file() for f in ds.files)
    assert ds.classes == ["class_a", "class_b", "class_c"]  # the parent folder of each class's images


def test_inat_json_fixture_labels_follow_numeric_category_ids():
    ds = read_inat_json(LISTS / "inat_train.json", IMAGES)
    # Category ids "594", "595", "1000" are strings, listed out of order; annotations use ints. Labels are
    # the numeric ranks (a string sort would put "1000" first).
    assert ds.classes == ["Species 594", "Species 595", "Species 1000"]
    assert np.bincount(ds.labels).tolist() == [6, 3, 1]
    assert ds.labels.tolist() == read_file_list(LISTS / "imagenet_lt_train.txt", IMAGES).labels.tolist()
    assert all(Path(f).is_file() for f in ds.files)


def test_category_labels_rule():
    label, names = category_labels([{"id": "10", "name": "b"}, {"id": 9, "name": "a"}, {"id": "x7"},
                                    {"id": "x10"}], "f.json")
    assert names == ["a", "b", "x10", "x7"]  # integers (also as strings) ascending, then other strings
    assert label == {(0, 9): 0, (0, 10): 1, (1, "x10"): 2, (1, "x7"): 3}


@pytest.mark.parametrize("dataset,train_list,test_list", [
    ("imagenet_lt", "imagenet_lt_train.txt", "imagenet_lt_test.txt"),
    ("inat2018", "inat_train.json", "inat_val.json"),
    ("inat2018", "imagenet_lt_train.txt", "imagenet_lt_test.txt"),  # iNaturalist18_val.txt-style list
])
def test_build_dataset_lists_are_not_subsampled(dataset, train_list, test_list):
    data = DataConfig(dataset=dataset, root=str(IMAGES), train_list=str(LISTS / train_list),
                      test_list=str(LISTS / test_list), imbalance_ratio=100.0)
    train = build_dataset(data, "train", decoded=False)
    test = build_dataset(data, "test", decoded=False)
    # ρ=100 would cut 6/3/1 down to 6/0/0 if the LT subset were applied: the lists are long-tailed already.
    assert np.bincount(train.labels).tolist() == [6, 3, 1]
    assert np.bincount(test.labels).tolist() == [2, 2, 2]
    assert test.classes == train.classes == training_classes(data)
    # The fixtures' true sizes (some are not square) are recorded by the check.
    assert train.sizes[:4].tolist() == [[32, 32], [40, 48], [32, 32], [36, 24]]
    decoded = build_dataset(data, "train", decoded=True)  # the torch backend's path: aspect kept on a canvas
    assert decoded.images.shape == (10, 48, 48, 3)
    assert decoded.sizes[:4].tolist() == [[32, 32], [32, 38], [32, 32], [48, 32]]


def test_build_dataset_empty_list_key_names_the_key():
    data = DataConfig(dataset="imagenet_lt", root=str(IMAGES))
    with pytest.raises(DataNotFound, match="data.train_list"):
        build_dataset(data, "train", decoded=False)
    with pytest.raises(DataNotFound, match="data.train_list"):  # the test split needs the training classes
        build_dataset(replace(data, test_list=str(LISTS / "imagenet_lt_test.txt")), "test", decoded=False)
    with pytest.raises(DataNotFound, match="does not exist"):
        read_listed_dataset("imagenet_lt", str(LISTS / "missing.txt"), "", "data.test_list")


# --------------------------------------------------------------------------------------------------
# Malformed input: errors name the file and the line or record
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,line,match", [
    ("a.jpg 0\nb.jpg\n", 2, "expected 'path label'"),
    ("a.jpg 0\n\nb.jpg one\n", 3, "not an integer"),
    ("a.jpg -1\n", 1, "out of range"),
])
def test_malformed_list_names_file_and_line(tmp_path, text, line, match):
    path = tmp_path / "list.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=match) as err:
        read_file_list(path)
    assert f"{path}:{line}:" in str(err.value)


def test_list_paths_may_hold_spaces_and_comments_are_skipped(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("# header\ndir one/a b.jpg 1\n\nc.jpg 0\n")
    ds = read_file_list(path, "/data")
    assert ds.files == ["/data/dir one/a b.jpg", "/data/c.jpg"] and ds.labels.tolist() == [1, 0]
    assert ds.classes == ["0", "dir one"]  # class 0's images have no parent folder


def _inat_doc():
    return {"images": [{"id": 1, "file_name": "a/1.jpg"}, {"id": 2, "file_name": "b/2.jpg"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 5}, {"id": 2, "image_id": 2, "category_id": "7"}],
            "categories": [{"id": "7", "name": "seven"}, {"id": 5, "name": "five"}]}


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.pop("annotations"), "missing or non-list key 'annotations'"),
    (lambda d: d["annotations"][1].update(category_id=99), r"annotations\[1\]: category_id 99 is not among"),
    (lambda d: d["annotations"].append({"image_id": 1, "category_id": 7}), r"annotations\[2\]: image 1 has a second"),
    (lambda d: d["annotations"].pop(), r"images\[1\] \(id 2, b/2.jpg\) has no annotation"),
    (lambda d: d["categories"].append({"id": 7}), r"categories\[2\] repeats the category id 7"),
    (lambda d: d["images"][0].pop("file_name"), r"images\[0\] needs 'id' and a string 'file_name'"),
    (lambda d: d["categories"][0].update(id=1.5), r"categories\[0\]: a category id must be an integer or a string"),
])
def test_malformed_inat_json_names_file_and_record(tmp_path, mutate, match):
    doc = _inat_doc()
    mutate(doc)
    path = tmp_path / "val.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=match) as err:
        read_inat_json(path)
    assert str(path) in str(err.value)


def test_inat_json_mixed_id_spellings(tmp_path):
    path = tmp_path / "val.json"
    path.write_text(json.dumps(_inat_doc()))
    ds = read_inat_json(path, "/r")
    assert ds.classes == ["five", "seven"] and ds.labels.tolist() == [0, 1]
    assert ds.files == ["/r/a/1.jpg", "/r/b/2.jpg"]


def test_not_json(tmp_path):
    path = tmp_path / "val.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match=f"{path}: not valid JSON"):
        read_inat_json(path)


# --------------------------------------------------------------------------------------------------
# The real lists (the project's shared data directory beside the repository)
# --------------------------------------------------------------------------------------------------


@pytest.mark.data
def test_real_imagenet_lt_val_list():
    ds = read_file_list(_real("ImageNet_LT_val.txt"), "/imagenet")
    assert len(ds) == 20_000 and len(ds.classes) == 1000
    assert np.bincount(ds.labels).tolist() == [20] * 1000  # the LT val set is balanced
    assert ds.files[0].startswith("/imagenet/train/n01440764/") and ds.labels[0] == 0
    # Class names (the WordNet folder) agree with the real class-name file, line by line.
    wnids = [line.split()[0] for line in _real("ImageNet_LT_classnames.txt").read_text().splitlines() if line.strip()]
    assert ds.classes == wnids


@pytest.mark.data
def test_real_imagenet_lt_test_list():
    ds = read_file_list(_real("ImageNet_LT_test.txt"))
    assert len(ds) == 50_000 and np.bincount(ds.labels).tolist() == [50] * 1000


@pytest.mark.data
def test_real_inaturalist_val_list():
    data = DataConfig(dataset="inat2018", root="/inat", train_list=str(_real("iNaturalist18_val.txt")),
                      test_list=str(_real("iNaturalist18_val.txt")))
    classes = training_classes(data)
    ds = read_listed_dataset("inat2018", data.test_list, data.root, "data.test_list", classes=classes)
    assert len(ds) == 24_426 and len(ds.classes) == 8142 and ds.classes == classes
    assert np.bincount(ds.labels, minlength=8142).tolist() == [3] * 8142
    assert ds.files[0] == "/inat/train_val2018/Plantae/7291/9f8ecb39e5f767e39e9b28e34488f179.jpg"
    assert ds.labels[0] == 7291 and ds.classes[7291] == "7291"  # the category-id folder names the class
    # The images themselves are not here: building the split says so in one line, naming data.root.
    with pytest.raises(DataNotFound, match=r"none of the 24426 test images .* exists .*check data.root"):
        build_dataset(data, "test", decoded=False)


@pytest.mark.data
def test_real_val_lep_json_string_category_ids():
    path = _real("val-lep.json")
    ds = read_inat_json(path, "/inat")
    doc = json.loads(path.read_text())
    assert len(ds) == 3702 and len(ds.classes) == 1234
    assert all(isinstance(c["id"], str) for c in doc["categories"])  # the format quirk this covers
    ids = sorted(int(c["id"]) for c in doc["categories"])
    label_of_id = {cid: k for k, cid in enumerate(ids)}
    by_image = {a["image_id"]: int(a["category_id"]) for a in doc["annotations"]}
    expected = [label_of_id[by_image[img["id"]]] for img in doc["images"]]
    assert ds.labels.tolist() == expected
    assert ds.files[0] == "/inat/" + doc["images"][0]["file_name"]
    names = {int(c["id"]): c["name"] for c in doc["categories"]}
    assert ds.classes == [names[i] for i in ids]


@pytest.mark.data
def test_real_train2018_records(tmp_path):
    """The verbatim train2018.json records (image, obfuscated category) assembled into a one-image file."""
    rec = json.loads(_real("verbatim_records_from_real_files.json").read_text())
    image = rec["train2018_json_first_image"]
    category = rec["obfuscated_category_example_inside_train_val_json"]
    ann = dict(rec["annotation_example"], image_id=image["id"], category_id=category["id"])
    path = tmp_path / "train2018.json"
    path.write_text(json.dumps({"info": {}, "images": [image], "annotations": [ann], "categories": [category],
                                "licenses": []}))
    ds = read_inat_json(path, "/inat")
    assert ds.files == ["/inat/train_val2018/Plantae/7477/3b60c9486db1d2ee875f11a669fbde4a.jpg"]
    assert ds.labels.tolist() == [0] and ds.classes == ["8133"]


@pytest.mark.data
def test_real_inat_categories_ids_are_labels():
    """For the official files (ids 0..8141) the rule gives label = category id."""
    cats = json.loads(_real("iNaturalist18_categories.json").read_text())
    label_of, names = category_labels(cats, "iNaturalist18_categories.json")
    assert len(names) == 8142
    assert all(label_of[(0, int(c["id"]))] == int(c["id"]) for c in cats)
    assert names[0] == "Hermodice carunculata"


# --------------------------------------------------------------------------------------------------
# One class map: the training list defines the classes, the test list is read onto them
# --------------------------------------------------------------------------------------------------


def write_list(path: Path, entries: list[tuple[str, int]]) -> Path:
    path.write_text("".join(f"{rel} {y}\n" for rel, y in entries))
    return path


def fixture_entries(split: str) -> list[tuple[str, int]]:
    return [tuple(line.rsplit(None, 1)) for line in (LISTS / f"imagenet_lt_{split}.txt").read_text().splitlines()]


def list_config(tmp_path: Path, train: list, test: list) -> DataConfig:
    return DataConfig(dataset="imagenet_lt", root=str(IMAGES),
                      train_list=str(write_list(tmp_path / "train.txt", train)),
                      test_list=str(write_list(tmp_path / "test.txt", test)))


def test_stray_label_in_a_training_list_is_named_by_line(tmp_path):
    """One stray label 9 in a 4-class list must not invent 6 phantom classes."""
    train = [(rel, int(y)) for rel, y in fixture_entries("train")]
    train.insert(4, ("train/class_a/5.jpg", 9))  # line 5
    data = list_config(tmp_path, train, fixture_entries("test"))
    with pytest.raises(DataError) as err:
        build_dataset(data, "train", decoded=False)
    assert f"{tmp_path / 'train.txt'}: labels 3..8 have no images" in str(err.value)
    assert "line 5 (label 9)" in str(err.value)
    with pytest.raises(DataError, match="labels 3..8 have no images"):  # the test split needs the same classes
        build_dataset(data, "test", decoded=False)


def test_test_list_class_outside_the_training_classes(tmp_path):
    test = fixture_entries("test") + [("test/class_c/0.jpg", 3)]  # a fourth class only in the test list
    data = list_config(tmp_path, fixture_entries("train"), test)
    assert len(build_dataset(data, "train", decoded=False).classes) == 3
    with pytest.raises(DataError, match=rf"{tmp_path / 'test.txt'}:7: label 3 is not a training class "
                                        rf"\(the training split has 3 classes, labels 0..2\)"):
        build_dataset(data, "test", decoded=False)


def test_test_list_missing_a_class(tmp_path):
    test = [(rel, y) for rel, y in fixture_entries("test") if int(y) != 1]
    data = list_config(tmp_path, fixture_entries("train"), test)
    with pytest.raises(DataError, match=rf"{tmp_path / 'test.txt'}: no images of 1 of the 3 training classes: "
                                        rf"1 \(class_b\)"):
        build_dataset(data, "test", decoded=False)


def test_bad_image_in_a_list_is_named(tmp_path):
    root = tmp_path / "images"
    (root / "train").mkdir(parents=True)
    for rel, _ in fixture_entries("train"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes((IMAGES / rel).read_bytes())
    (root / "train/class_b/1.jpg").write_bytes((IMAGES / "train/class_b/1.jpg").read_bytes()[:200])
    (root / "train/class_a/2.jpg").unlink()
    data = DataConfig(dataset="imagenet_lt", root=str(root), train_list=str(LISTS / "imagenet_lt_train.txt"),
                      test_list=str(LISTS / "imagenet_lt_test.txt"))
    with pytest.raises(DataError) as err:
        build_dataset(data, "train", decoded=False)
    msg = str(err.value)
    assert msg.startswith(f"2 of 10 train images of data.train_list={LISTS / 'imagenet_lt_train.txt'}")
    assert f"{root / 'train/class_a/2.jpg'}: does not exist" in msg
    assert f"{root / 'train/class_b/1.jpg'}: truncated" in msg
    train = build_dataset(replace(data, on_error="skip"), "train", decoded=False)
    assert len(train) == 8 and len(train.skipped) == 2 and np.bincount(train.labels).tolist() == [5, 2, 1]


def _write_json(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))
    return path


def test_inat_annotation_of_an_unknown_image_is_an_error(tmp_path):
    doc = _inat_doc()
    doc["annotations"].append({"id": 3, "image_id": 99, "category_id": 5})
    path = _write_json(tmp_path / "train.json", doc)
    with pytest.raises(DataError, match=rf"{path}: annotations\[2\]: image_id 99 is not among the 2 images"):
        read_inat_json(path)


def test_inat_category_without_images_is_an_error(tmp_path):
    doc = _inat_doc()
    doc["categories"].append({"id": 11, "name": "eleven"})
    path = _write_json(tmp_path / "train.json", doc)
    with pytest.raises(DataError, match=rf"{path}: 1 of the 3 categories have no images: id 11 \(eleven\)"):
        read_inat_json(path)


def test_inat_test_file_read_onto_the_training_categories(tmp_path):
    train = json.loads((LISTS / "inat_train.json").read_text())
    val = json.loads((LISTS / "inat_val.json").read_text())
    data = DataConfig(dataset="inat2018", root=str(IMAGES), train_list=str(LISTS / "inat_train.json"),
                      test_list=str(_write_json(tmp_path / "val.json", val)))
    assert build_dataset(data, "test", decoded=False).classes == ["Species 594", "Species 595", "Species 1000"]
    # A category only in the test file (with an image) changes the class set: an error, not a new label.
    val["categories"].append({"id": "2000", "name": "Species 2000"})
    val["annotations"][0]["category_id"] = 2000
    _write_json(tmp_path / "val.json", val)
    with pytest.raises(DataError, match=r"val.json: its 4 categories differ from the 3 training classes "
                                        r"\(here only: \['Species 2000'\]"):
        build_dataset(data, "test", decoded=False)
    assert len(train["categories"]) == 3


def _outside_copy(tmp_path: Path, rel: str) -> Path:
    """A copy of a fixture image outside IMAGES (the data.root of these tests)."""
    out = tmp_path / "elsewhere" / Path(rel).name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes((IMAGES / rel).read_bytes())
    return out


@pytest.mark.parametrize("kind", ["imagenet_lt", "inat2018"])
def test_entries_outside_data_root_are_counted_and_strict_root_refuses_them(tmp_path, capsys, kind):
    """A list naming files outside data.root (`../`, an absolute path) was read without a word."""
    absolute = _outside_copy(tmp_path, "train/class_a/0.jpg")
    dotdot = os.path.relpath(_outside_copy(tmp_path, "train/class_b/0.jpg"), IMAGES)
    assert dotdot.startswith("..")
    entries = fixture_entries("train") + [(str(absolute), 0), (dotdot, 1)]
    if kind == "imagenet_lt":
        path = write_list(tmp_path / "train.txt", entries)
    else:
        doc = json.loads((LISTS / "inat_train.json").read_text())
        for i, rel in enumerate((str(absolute), dotdot)):
            doc["images"].append({"id": 1000 + i, "file_name": rel})
            doc["annotations"].append({"id": 1000 + i, "image_id": 1000 + i,
                                       "category_id": doc["annotations"][0]["category_id"]})
        path = _write_json(tmp_path / "train.json", doc)
    data = DataConfig(dataset=kind, root=str(IMAGES), train_list=str(path), test_list=str(path))
    ds = build_dataset(data, "train", decoded=False)
    assert len(ds) == 12  # read all the same, but said at the start
    line = f"2 of the 12 entries of data.train_list={path} lie outside data.root={IMAGES} (the first, entry 11: {absolute})"
    out = capsys.readouterr().out
    assert out.count("lie outside data.root") == 1 and line in out
    with pytest.raises(DataError) as err:
        build_dataset(replace(data, strict_root=True), "train", decoded=False)
    assert str(err.value).startswith(line) and "data.strict_root=true" in str(err.value)
    # Inside the root, and with no root at all (lists of absolute paths), nothing is said.
    inside = LISTS / ("imagenet_lt_train.txt" if kind == "imagenet_lt" else "inat_train.json")
    build_dataset(replace(data, train_list=str(inside), strict_root=True), "train", decoded=False)
    from mixtail.pipelines.sources.file_lists import outside_root

    assert outside_root(ds, "", "the list", strict=True) is None
    assert "outside" not in capsys.readouterr().out


def test_a_list_of_one_class_is_refused_naming_the_list_and_root(tmp_path):
    """A one-class dataset trained to 100% and reported it."""
    data = list_config(tmp_path, [(rel, y) for rel, y in fixture_entries("train") if int(y) == 0],
                       fixture_entries("test"))
    with pytest.raises(DataError) as err:
        build_dataset(data, "train", decoded=False)
    assert str(err.value) == (f"data.train_list={tmp_path / 'train.txt'} (data.root={IMAGES}) has 1 class "
                              f"('class_a'): a classifier needs at least two")
