"""diffusion.data.captions: measured captions of drawn and MNIST digits, and captions files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import full_params, section
from diffusion.config import ConfigError, parse_params
from diffusion.data import captions as cap, dataset as data, sources
from diffusion.data.dataset import Dataset, DatasetError

VOCABULARY = cap.CAPTION_VOCABULARY["attributes"]


def pixel_grid(size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centres (y down, x right)."""
    return torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")


def bar(width: int, length: int, shear: float = 0.0, size: int = 28) -> torch.Tensor:
    """A "1": a bar ``width`` x ``length`` pixels, sheared so that each row up moves it ``shear`` right."""
    y, x = pixel_grid(size)
    centre = size / 2 + (width % 2) * 0.5 + shear * (size / 2 - y)  # odd widths centred on a pixel
    ink = ((x - centre).abs() < width / 2) & ((y - size / 2).abs() < length / 2)
    return (ink.to(torch.uint8) * 255)[None, None]


def ring(a: float, b: float, width: float, size: int = 28) -> torch.Tensor:
    """A "0": the ellipse of half-axes a (x), b (y) less the one ``width`` inside it."""
    y, x = pixel_grid(size)
    u, v = x - size / 2, y - size / 2
    ink = ((u / a) ** 2 + (v / b) ** 2 <= 1) & ((u / (a - width)) ** 2 + (v / (b - width)) ** 2 > 1)
    return (ink.to(torch.uint8) * 255)[None, None]


@pytest.fixture(scope="module")
def mnist5k() -> Dataset:
    return sources.load_source(section("data"))  # data.captions: measured (params.yaml)


# --------------------------------------------------------------------------- measuring


@pytest.mark.parametrize("width", [2, 3, 4, 5])
def test_an_upright_bar_is_as_thick_as_drawn(width: int) -> None:
    """Zhang-Suen leaves L - w pixels of a w x L bar, so t (S + t) = w L has the root t = w exactly;
    its size is sqrt(w L) / 28 and its slant 0 (mirror symmetric)."""
    m = cap.measure_attributes(bar(width, 20))
    assert m["thickness"].item() == pytest.approx(width, abs=1e-9)
    assert m["size"].item() == pytest.approx(math.sqrt(width * 20) / 28, abs=1e-12)
    assert m["slant"].item() == pytest.approx(0, abs=1e-12)


def test_a_one_pixel_line_is_its_own_skeleton() -> None:
    """Nothing is thinned: S = L = A, so t is the root of t^2 + L t - L."""
    assert cap.measure_attributes(bar(1, 20))["thickness"].item() == pytest.approx((math.sqrt(20**2 + 4 * 20) - 20) / 2, abs=1e-9)


@pytest.mark.parametrize("shear", [-0.4, -0.2, 0.3, 0.5])
@pytest.mark.parametrize("width", [2, 4])
def test_a_sheared_bar_has_its_shear_as_slant_and_its_width_as_thickness(width: int, shear: float) -> None:
    """Slant: the least-squares line of the rows' ink centres, each within half a pixel of the
    drawn line, so off by at most 0.5 * sum|y| / sum y^2 = 1.5 / L over L rows. Thickness: the
    stroke's width across it is w / sqrt(1 + s^2); its skeleton is a staircase no longer than the
    line by (1 + |s|) / sqrt(1 + s^2) (steps across and along), and no shorter."""
    m = cap.measure_attributes(bar(width, 20, shear))
    assert abs(m["slant"].item() - shear) <= 1.5 / 20
    across = width / math.sqrt(1 + shear**2)
    assert across * math.sqrt(1 + shear**2) / (1 + abs(shear)) <= m["thickness"].item() <= across


def test_a_ring_is_upright_by_symmetry_and_thickness_grows_with_its_width() -> None:
    thin, thick = cap.measure_attributes(torch.cat([ring(9, 10, 2), ring(9, 10, 4)]))["thickness"].tolist()
    m = cap.measure_attributes(ring(9, 10, 3))
    assert m["slant"].item() == pytest.approx(0, abs=1e-12)
    assert m["size"].item() == pytest.approx(math.sqrt(18 * 20) / 28, abs=1e-12)  # the box: 18 x 20 pixels
    assert 1.5 < thick / thin <= 2


def test_thickness_is_in_pixels_of_a_28_row_image() -> None:
    """The same bar drawn at twice the resolution measures the same (its skeleton, L - w, scales too)."""
    assert cap.measure_attributes(bar(6, 40, size=56))["thickness"].item() == pytest.approx(3, abs=1e-9)


def test_measuring_in_chunks_changes_nothing(mnist5k: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = cap.measure_attributes(mnist5k.images[:7])
    monkeypatch.setattr(cap, "_CHUNK", 3)
    chunked = cap.measure_attributes(mnist5k.images[:7])
    assert all(torch.equal(whole[name], chunked[name]) for name in whole)


def test_an_empty_image_measures_zero() -> None:
    m = cap.measure_attributes(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
    assert [m[k].item() for k in ("thickness", "slant", "size")] == [0, 0, 0]


def test_drawn_digits_get_the_words_drawn() -> None:
    images = torch.cat([bar(2, 20), bar(5, 20, 0.4), bar(4, 20, -0.3), ring(9, 10, 4)])
    captions = cap.measured_captions(images, torch.tensor([1, 1, 1, 0]), [str(d) for d in range(10)])
    assert captions == [
        "a small, thin, upright one",
        "a small, thick, right-leaning one",
        "a small, thick, left-leaning one",
        "a large, thick, upright zero",
    ]
    assert cap.caption("eight", []) == "an eight" and cap.parse_caption("An eight.") == cap.AskedCaption(8, {})


# --------------------------------------------------------------------------- MNIST-5k


def test_the_vocabulary_records_what_mnist5k_measures(mnist5k: Dataset) -> None:
    """The terciles and word shares in caption_vocabulary.json are those of the 5,000 digits, and
    each word describes at least a quarter of them."""
    values = cap.measure_attributes(mnist5k.images)
    words = cap.attribute_words(values)
    for name, spec in VOCABULARY.items():
        terciles = torch.quantile(values[name], torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)).tolist()
        assert terciles == pytest.approx(spec["mnist5k_terciles"], abs=1e-4)
        shares = [words[name].count(word) / len(mnist5k.images) for word in spec["words"]]
        assert shares == pytest.approx(spec["mnist5k_shares"], abs=1e-4)
        assert min(shares) >= 0.25


def test_parse_reads_back_every_mnist5k_caption(mnist5k: Dataset) -> None:
    words = cap.attribute_words(cap.measure_attributes(mnist5k.images))
    assert mnist5k.captions is not None and len(set(mnist5k.captions)) > 200
    for i, text in enumerate(mnist5k.captions):
        asked = cap.parse_caption(text)
        assert asked.digit == mnist5k.labels[i].item()
        assert asked.words == {name: words[name][i] for name in VOCABULARY}


@pytest.mark.parametrize(
    ("text", "digit", "words"),
    [
        ("  A LARGE,thick   Right leaning SEVEN!! ", 7, {"size": "large", "thickness": "thick", "slant": "right-leaning"}),
        ("an upright 3, please", 3, {"slant": "upright"}),
        ("a thin, thick eight", 8, {}),  # two words of one attribute: it asks for neither
        ("one or two", None, {}),
        ("a fluffy cat", None, {}),
        ("", None, {}),
    ],
)
def test_parse_tolerates_case_spacing_punctuation_and_unknown_words(text: str, digit: int | None, words: dict) -> None:
    assert cap.parse_caption(text) == cap.AskedCaption(digit, words)


def test_split_and_files_keep_captions_aligned(mnist5k: Dataset, tmp_path: Path) -> None:
    splits = data.split(mnist5k, section("data", holdout=50, reference_images=20))
    assert splits.heldout.captions == cap.measured_captions(splits.heldout.images, splits.heldout.labels, mnist5k.class_names)
    back = data.load_dataset(data.save_dataset(tmp_path / "heldout.npz", splits.heldout))
    assert back.captions == splits.heldout.captions and torch.equal(back.labels, splits.heldout.labels)
    manifest = tmp_path / "manifest.json"
    data.write_manifest(manifest, section("data"), splits, {})
    assert json.loads(manifest.read_text())["captions"] == {"source": "measured", "count": 5000 - 50}


def test_a_file_without_captions_loads_and_a_wrong_count_is_named(tmp_path: Path) -> None:
    images = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    path = data.save_dataset(tmp_path / "old.npz", Dataset(images, torch.zeros(3, dtype=torch.int64), ["a"], "x", "file:///x"))
    assert data.load_dataset(path).captions is None
    with np.load(path) as npz:
        arrays = dict(npz)
    np.savez(path, **arrays, captions=np.array(["a", "b"]))
    with pytest.raises(DatasetError, match=rf"^{path}: captions must be 3 strings, one per image; got <U1 \(2,\)$"):
        data.load_dataset(path)


# --------------------------------------------------------------------------- captions files


def image_folder(root: Path) -> None:
    for name in ("cat/a.png", "cat/b.png", "dog/c.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / name)
    (root / "notes.txt").write_text("not an image")


def metadata_params(root: Path) -> dict:
    return full_params({
        "data": {"source": "imagefolder", "root": str(root), "image_size": 8, "holdout": 1, "reference_images": 2, "captions": "metadata"},
        "evaluate": {"prdc_k": 1},
    })


GOOD = [("cat/a.png", "a black cat"), ("dog/c.png", "a dog"), ("cat/b.png", "another, darker cat")]


def test_jsonl_and_csv_captions_follow_the_images(tmp_path: Path) -> None:
    image_folder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": t}) + "\n" for f, t in GOOD) + "\n")
    params = parse_params(metadata_params(tmp_path))
    assert sources.load_source(params.data).captions == ["a black cat", "another, darker cat", "a dog"]
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("file_name,text,extra\n" + "".join(f'{f},"{t}",1\n' for f, t in GOOD))
    assert sources.load_source(params.data).captions == ["a black cat", "another, darker cat", "a dog"]


def jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


A, B, C = ({"file_name": f, "text": t} for f, t in GOOD)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("metadata.jsonl", jsonl(A, "{file_name: 1", C), r"metadata.jsonl:2: not JSON \(Expecting property name enclosed in double quotes\); expected one object per line"),
        ("metadata.jsonl", jsonl(A, ["cat/b.png", "x"]), r"metadata.jsonl:2: a JSON list; expected an object with file_name and text"),
        ("metadata.jsonl", jsonl(A, {"file_name": "cat/b.png"}), r"metadata.jsonl:2: no text; each record needs file_name and text"),
        ("metadata.jsonl", jsonl(A, {"text": "x"}), r"metadata.jsonl:2: no file_name; each record needs file_name and text"),
        ("metadata.jsonl", jsonl(A, B, {"file_name": "dog/c.png", "text": "  "}), r"metadata.jsonl:3: text '  ' for dog/c.png; each image needs one non-empty caption \(a string\)"),
        ("metadata.jsonl", jsonl(A, B, {"file_name": "dog/c.png", "text": 7}), r"metadata.jsonl:3: text 7 for dog/c.png; each image needs one non-empty caption \(a string\)"),
        ("metadata.jsonl", jsonl(A, {"file_name": "cat/z.png", "text": "x"}), r"metadata.jsonl:2: file_name cat/z.png: no such file in .*"),
        ("metadata.jsonl", jsonl(A, {"file_name": "notes.txt", "text": "x"}), r"metadata.jsonl:2: file_name notes.txt: not one of the images \(<class>/<image>\) of .*"),
        ("metadata.jsonl", jsonl(A, B, C, {"file_name": "./cat/a.png", "text": "x"}), r"metadata.jsonl:4: file_name ./cat/a.png again \(line 1\); allowed one caption per image"),
        ("metadata.jsonl", jsonl(A, C), r"metadata.jsonl: no caption for dog/c.png; each image needs one record \(file_name, text\)"),
        ("metadata.csv", "file_name,caption\ncat/a.png,x\n", r"metadata.csv:1: header \['file_name', 'caption'\]; expected columns file_name and text"),
        ("metadata.csv", 'file_name,text\ncat/a.png,x\ncat/b.png,a, b\n', r"metadata.csv:3: 3 fields where the header has 2; quote a text that holds commas"),
        ("metadata.csv", 'file_name,text\ncat/a.png,x\ncat/b.png,"x\n', r"metadata.csv:3: malformed CSV row \(unexpected end of data\)"),
        ("metadata.csv", "file_name,text\ncat/a.png,x\ncat/b.png,\ndog/c.png,y\n", r"metadata.csv:3: text '' for cat/b.png; each image needs one non-empty caption \(a string\)"),
    ],
)
def test_a_bad_captions_file_is_one_line_at_validate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, text: str, expected: str) -> None:
    from diffusion.stages import validate

    root = tmp_path / "images"
    image_folder(root)
    (root / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match=rf"^{root}/{expected}$"):
        validate.run(parse_params(metadata_params(root)))
    assert not (tmp_path / "data").exists()  # nothing written: dvc repro stops before prepare
    with pytest.raises(DatasetError, match=rf"^{root}/{expected}$"):
        sources.load_source(parse_params(metadata_params(root)).data)  # prepare's own check


def test_both_files_or_neither_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusion.stages import validate

    image_folder(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    params = parse_params(metadata_params(tmp_path / "images"))
    root = tmp_path / "images"
    with pytest.raises(DatasetError, match=rf"^data.captions: metadata needs one of {root}/metadata.jsonl or {root}/metadata.csv \(file_name, text per image\); found neither$"):
        validate.run(params)
    (root / "metadata.jsonl").write_text(jsonl(A, B, C))
    (root / "metadata.csv").write_text("file_name,text\n")
    with pytest.raises(DatasetError, match=r"; found both$"):
        validate.run(params)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"source": "imagefolder", "root": "x", "captions": "measured"},
         "data.captions: measured captions need data.source mnist5k or mnist; with imagefolder allowed: metadata | null"),
        ({"source": "cifar10", "captions": "measured"}, "data.captions: measured captions need data.source mnist5k or mnist; with cifar10 allowed: null"),
        ({"source": "mnist5k", "captions": "metadata"},
         "data.captions: metadata captions need data.source imagefolder; with mnist5k allowed: measured | null"),
        ({"captions": "words"}, "data.captions: got 'words'; input should be 'measured' or 'metadata'"),
    ],
)
def test_captions_that_the_source_cannot_give_are_one_line(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_params(full_params({"data": data}), "params.yaml")
    assert str(err.value) == f"params.yaml: {expected}"
