"""The ``photos`` dataset, the ImageNet class table and folders named by ImageNet class."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from invariscope.data import create_dataset, list_datasets
from invariscope.data.imagenet import (
    imagenet_classes,
    imagenet_index,
    imagenet_label_map,
    imagenet_synonyms,
    imagenet_wnids,
    is_imagenet_classes,
)
from invariscope.data.photos import PHOTOS, load_photo, photo_crops
from invariscope.errors import InvariscopeError

LABELLED = {p.name: p.label for p in PHOTOS if p.label is not None}


@pytest.fixture(scope="module")
def photos():
    return {s: create_dataset("photos", s) for s in ("train", "test")}


# ------------------------------------------------------------------------ ImageNet table
def test_imagenet_table_is_complete_and_consistent():
    names, wnids, synonyms = imagenet_classes(), imagenet_wnids(), imagenet_synonyms()
    assert len(names) == len(wnids) == len(synonyms) == 1000
    assert len(set(names)) == 1000 and len({n.casefold() for n in names}) == 1000
    assert wnids == sorted(wnids) and len(set(wnids)) == 1000  # the standard index order
    assert all(w.startswith("n") and len(w) == 9 and w[1:].isdigit() for w in wnids)
    # well-known anchors of the ImageNet-1k index
    assert (wnids[0], names[0]) == ("n01440764", "tench")
    assert (wnids[281], names[281], synonyms[281]) == ("n02123045", "tabby", ("tabby", "tabby cat"))
    assert (wnids[652], names[652]) == ("n03763968", "military uniform")
    assert (names[967], names[968]) == ("espresso", "cup")
    # every class is found by its wnid, its name and its full synset text (but "crane",
    # the whole synset text of both 134 and 517)
    for i in range(1000):
        assert imagenet_index(wnids[i]) == imagenet_index(names[i]) == i
        full = imagenet_index(", ".join(synonyms[i]))
        assert full == (None if i in (134, 517) else i)


def test_imagenet_lookup_ignores_case_underscores_and_spaces():
    assert imagenet_index("N02123045") == 281
    assert imagenet_index("Tabby_Cat") == imagenet_index("  tabby   cat ") == 281
    assert imagenet_index("great_white_shark") == 2
    assert imagenet_index("crane") is None  # a bird (134) and a machine (517)
    assert (imagenet_index("crane (bird)"), imagenet_index("crane_(machine)")) == (134, 517)
    assert imagenet_index("no such class") is None


def test_imagenet_class_lists_and_label_map():
    assert is_imagenet_classes(imagenet_classes()) and is_imagenet_classes(imagenet_wnids())
    keras_like = [s[0] for s in imagenet_synonyms()]  # repeats "crane" and "maillot"
    assert len(set(keras_like)) < 1000 and is_imagenet_classes(keras_like)
    assert not is_imagenet_classes([str(i) for i in range(1000)])
    assert not is_imagenet_classes(imagenet_classes()[::-1])
    assert imagenet_label_map(["n03763968", "Tabby"], imagenet_classes()) == [652, 281]
    assert imagenet_label_map(["n03763968", "unknown"], imagenet_classes()) is None
    assert imagenet_label_map(["tench"], [str(i) for i in range(1000)]) is None
    with pytest.raises(InvariscopeError, match="both name ImageNet class 281"):
        imagenet_label_map(["tabby", "n02123045"], imagenet_classes())


# ------------------------------------------------------------------------------- photos
def test_photos_are_listed_and_shaped_like_the_listing(photos):
    info = next(i for i in list_datasets() if i.name == "photos")
    assert (info.channels, info.image_size, info.num_classes) == (3, 224, 1000)
    for split, ds in photos.items():
        assert ds.name == "photos" and ds.split == split
        assert ds.images.shape[1:] == (3, 224, 224) and ds.images.dtype == torch.float32
        assert 0.0 <= float(ds.images.min()) and float(ds.images.max()) <= 1.0
        assert ds.classes == imagenet_classes()
        assert len(ds.crops) == len(ds) == len(ds.labels)
        # each image's label is its photo's, and every labelled photo is there
        assert [LABELLED[p] for p in ds.crops.photo] == ds.labels.tolist()
        assert set(ds.crops.photo) == set(LABELLED)
    assert len(photos["train"]) + len(photos["test"]) == 145  # 68 + 77 (docstring)


def test_photo_splits_are_disjoint_views_and_test_holds_every_full_view(photos):
    def views(ds):
        return set(map(tuple, ds.crops[["photo", "scale", "u_y", "u_x"]].to_numpy().tolist()))

    train, test = views(photos["train"]), views(photos["test"])
    assert not train & test
    assert all((y + x) % 2 == 0 for _, _, y, x in test)
    assert all((y + x) % 2 == 1 for _, _, y, x in train)
    assert {(p, 1.0, 0, 0) for p in LABELLED} <= test  # the centred view at scale 1


def test_photos_are_deterministic_with_a_seeded_subset(photos):
    again = create_dataset("photos", "test")
    assert again.fingerprint == photos["test"].fingerprint
    assert torch.equal(again.images, photos["test"].images)
    assert photos["train"].fingerprint != photos["test"].fingerprint
    a = create_dataset("photos", "test", size=5, seed=1, image_size=32)
    b = create_dataset("photos", "test", size=5, seed=1, image_size=32)
    c = create_dataset("photos", "test", size=5, seed=2, image_size=32)
    assert a.images.shape == (5, 3, 32, 32) and a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint
    with pytest.raises(InvariscopeError, match="image_size"):
        create_dataset("photos", image_size=8)


def test_photo_crop_grid_is_exact():
    image = np.arange(300 * 400 * 3, dtype=np.uint8).reshape(300, 400, 3)
    crops, rows = photo_crops(image, 100, scales=(3.0,))  # no resize: 300 x 400
    assert crops.shape == (9, 100, 100, 3)
    assert [(r["top"], r["left"]) for r in rows[:3]] == [(0, 0), (0, 150), (0, 300)]
    assert np.array_equal(crops[4], image[100:200, 150:250])  # u_y = u_x = 0
    assert np.array_equal(crops[8], image[200:, 300:])
    square = np.zeros((64, 64, 3), np.uint8)
    assert photo_crops(square, 64, scales=(1.0,))[0].shape[0] == 1  # no room: one view
    assert load_photo("camera").shape == (512, 512, 3)  # gray, given as RGB
    with pytest.raises(InvariscopeError, match="unknown photo"):
        load_photo("lena")


# --------------------------------------------------------------- folders of ImageNet ids
def _folder(root, classes, n=2, size=12):
    rng = np.random.default_rng(0)
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(n):
            pixels = (rng.random((size, size, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


class _ImageNetStub(torch.nn.Module):
    """A fixed random 1000-class classifier of 3x12x12 images with ImageNet names."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc = torch.nn.Linear(3 * 12 * 12, 1000)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(self.fc.weight.shape, generator=g))
        self.class_names = imagenet_classes()
        self.num_classes = 1000

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_folder_named_by_wnid_maps_onto_the_imagenet_outputs(tmp_path, caplog):
    from invariscope.engine import run
    from invariscope.measure.sweep import SweepAnalysis

    root = _folder(tmp_path / "imgs", ["n03763968", "n02123045"])  # 652, 281
    data = create_dataset(f"folder:{root}", "test")
    assert data.classes == ["n02123045", "n03763968"]  # sorted: folder labels 0, 1
    analysis = SweepAnalysis(["rotation"], {"rotation": (0, 10, 10)})
    with caplog.at_level("WARNING"):
        result = run(analysis, _ImageNetStub(), data, batch_size=4)
    assert "n02123045 -> 281 (tabby)" in caplog.text and "n03763968 -> 652" in caplog.text
    records = result.table("records")
    records = records[records.magnitude == 0].sort_values("index")
    assert records["label"].tolist() == [281, 281, 652, 652]
    assert result.config["labels"] == "dataset"

    other = create_dataset(f"folder:{_folder(tmp_path / 'x', ['cats', 'n02123045'])}", "test")
    with pytest.raises(InvariscopeError, match=r"1000 classes but the dataset has 2.*not: cats"):
        run(analysis, _ImageNetStub(), other)


def test_unlabeled_folder_needs_labels_from_the_model(tmp_path):
    from invariscope.engine import run
    from invariscope.measure.sweep import SweepAnalysis

    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = (rng.random((12, 12, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    with pytest.raises(InvariscopeError, match="labels='model'") as err:
        create_dataset(f"folder:{tmp_path}")
    assert "\n" not in str(err.value)
    data = create_dataset(f"folder:{tmp_path}", unlabeled=True)
    assert (data.labelled, data.classes, data.labels.tolist()) == (False, [], [-1, -1, -1])
    analysis = SweepAnalysis(["rotation"], {"rotation": (0, 10, 10)})
    with pytest.raises(InvariscopeError, match="has no labels"):
        run(analysis, _ImageNetStub(), data)
    model = _ImageNetStub()
    result = run(analysis, model, data, labels="model")
    x = torch.stack([data[i][0] for i in range(3)])
    records = result.table("records")
    records = records[records.magnitude == 0].sort_values("index")
    assert records["label"].tolist() == model(x).argmax(1).tolist()
    assert records["correct"].all()
