"""The ImageNet-LT / iNaturalist 2018 readers (pipelines/file_lists.py) and their build_dataset wiring.

The small fixtures under tests/fixtures/lists are made by tests/fixtures/make_fixtures.py in the real
formats; the real lists under ../shared/data/lists are read where present (skipped otherwise).

    python -m pytest tests/test_file_lists.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mixtail.pipelines.datasets import ImageFiles, build_dataset
from mixtail.pipelines.file_lists import category_labels, read_file_list, read_inat_json, read_listed_dataset
from mixtail.trainer.config import DataConfig

FIXTURES = Path(__file__).resolve().parent / "fixtures"
IMAGES = FIXTURES / "images"
LISTS = FIXTURES / "lists"
REAL_LISTS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "lists"


def _real(name: str) -> Path:
    path = REAL_LISTS / name
    if not path.is_file():
        pytest.skip(f"real list {path} is absent (tests read ../shared/data beside the repository)")
    return path


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
    decoded = build_dataset(data, "train", decoded=True)  # the torch backend's path
    assert decoded.images.shape == (10, 32, 32, 3)


def test_build_dataset_empty_list_key_names_the_key():
    data = DataConfig(dataset="imagenet_lt", root=str(IMAGES))
    with pytest.raises(FileNotFoundError, match="data.train_list"):
        build_dataset(data, "train", decoded=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
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
    with pytest.raises(ValueError, match=match) as err:
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
    with pytest.raises(ValueError, match=match) as err:
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
    with pytest.raises(ValueError, match=f"{path}: not valid JSON"):
        read_inat_json(path)


# --------------------------------------------------------------------------------------------------
# The real lists (../shared/data/lists)
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
    ds = build_dataset(data, "test", decoded=False)
    assert len(ds) == 24_426 and len(ds.classes) == 8142
    assert np.bincount(ds.labels, minlength=8142).tolist() == [3] * 8142
    assert ds.files[0] == "/inat/train_val2018/Plantae/7291/9f8ecb39e5f767e39e9b28e34488f179.jpg"
    assert ds.labels[0] == 7291 and ds.classes[7291] == "7291"  # the category-id folder names the class


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
