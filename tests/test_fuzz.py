"""Property-based fuzzing (hypothesis) of what a user hands the pipeline: params.yaml and an
image folder (``data.source: imagefolder``). Every case is accepted, or is one line naming
the key or the file; never a traceback.

The examples are derandomised and none is stored (``database=None``; hypothesis's cache of
constants, ``.hypothesis/``, is git-ignored), so each run tries the same cases; the
``@example`` cases are the faults named in RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
from pathlib import Path

import numpy as np
import yaml
from conftest import DEFAULT_PARAMS, section
from faults import decompression_bomb_png
from hypothesis import example, given, settings, strategies as st
from PIL import Image

from diffusion import cli
from diffusion.data.dataset import DatasetError
from diffusion.data.sources import load_source
from diffusion.models.configs import FAMILIES, FAMILY_OF

FUZZ = settings(database=None, deadline=None, derandomize=True)

# --------------------------------------------------------------------------- params.yaml

SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
KEYS = st.text(max_size=8) | st.integers(-3, 3) | st.booleans() | st.none()
GARBAGE = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3), max_leaves=6)

# Values near the valid ones reach the combination checks, where the tracebacks hide.
NAMES = sorted({v for s in DEFAULT_PARAMS.values() if isinstance(s, dict) for v in s.values() if isinstance(v, str)}
               | set(FAMILY_OF) | {"cuda", "cpu", "latent", "pixel", "linear", "ddim", "heun", "karras", "eps", "x0"})
NEAR = (
    st.integers(-3, 40) | st.sampled_from([0, 1, 2, 7, 28, 1000, 100_001]) | st.floats(-1, 3)
    | st.sampled_from(NAMES) | st.lists(st.integers(-1, 8), max_size=4) | st.none() | st.booleans()
)
OVERRIDE_KEYS = sorted({key for family in FAMILIES.values() for key in family.overridable})
PARAM_PATHS = [f"{s}.{k}" for s, keys in DEFAULT_PARAMS.items() if s != "sweep" for k in keys]
SEARCH_DIM = st.dictionaries(
    st.sampled_from(["type", "choices", "low", "high", "log", "step"]),
    st.sampled_from(["categorical", "float", "int"]) | st.lists(NEAR, max_size=3) | NEAR,
    max_size=5,
)
SPACE = st.dictionaries(
    st.sampled_from(PARAM_PATHS + ["model.name"] + [f"model.overrides.{k}" for k in OVERRIDE_KEYS]) | st.text(max_size=10),
    SEARCH_DIM | GARBAGE, max_size=3,
)


@st.composite
def mutated_params(draw) -> dict:
    """The committed params with 1 to 3 mutations: a key set to a near-valid value or to
    garbage, a key or a section deleted, an unknown key, a section that is not a mapping,
    random model overrides, a random sweep space."""
    params = copy.deepcopy(DEFAULT_PARAMS)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(DEFAULT_PARAMS)))
        sec = params.get(name)
        kind = draw(st.sampled_from(["near", "garbage", "delete", "unknown", "section", "overrides", "space"]))
        if kind == "section":
            params[name] = draw(GARBAGE | st.dictionaries(KEYS, GARBAGE, max_size=2))
        elif kind == "overrides":
            params["model"] = dict(params.get("model") or {}) | {
                "name": draw(st.sampled_from(sorted(FAMILY_OF))),
                "overrides": draw(st.dictionaries(st.sampled_from(OVERRIDE_KEYS) | st.text(max_size=6), NEAR | GARBAGE, max_size=3)),
            }
        elif kind == "space":
            params["sweep"] = dict(params.get("sweep") or {}) | {"space": draw(SPACE)}
        elif not isinstance(sec, dict) or not sec:
            params[name] = copy.deepcopy(DEFAULT_PARAMS[name])
        elif kind == "unknown":
            target = draw(st.sampled_from([params, sec]))
            target[draw((st.text(max_size=8) if target is params else KEYS).filter(lambda k: k not in target))] = draw(GARBAGE)
        else:
            key = draw(st.sampled_from(list(sec)))
            if kind == "delete":
                del sec[key]
            else:
                sec[key] = draw(NEAR if kind == "near" else GARBAGE)
    return params


def broken_yaml() -> st.SearchStrategy[bytes]:
    """Not a params mapping: YAML whose top level is no mapping, the committed file cut short
    or with a byte overwritten, text that is no YAML, bytes that are no UTF-8."""
    committed = (Path(__file__).resolve().parents[1] / "params.yaml").read_bytes()
    cut = st.integers(0, len(committed)).map(lambda n: committed[:n])
    overwritten = st.tuples(st.integers(0, len(committed) - 1), st.binary(min_size=1, max_size=1)).map(
        lambda t: committed[: t[0]] + t[1] + committed[t[0] + 1 :]
    )
    top_level = GARBAGE.map(lambda v: yaml.dump(v, Dumper=yaml.CSafeDumper, sort_keys=False).encode())
    return cut | overwritten | top_level | st.text(max_size=40).map(str.encode) | st.binary(max_size=40)


def validate(content: bytes, keys: tuple[str, ...] = ()) -> None:
    """``diffusion validate --params <file>`` on ``content``, in a folder of its own: exit 0
    with nothing said, or exit 1 or 2 with one line naming the file, then (if ``keys`` are
    given) a key that starts with one of them."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_bytes(content)
        err = io.StringIO()
        with contextlib.chdir(tmp), contextlib.redirect_stderr(err):
            code = cli.main(["validate", "--params", str(path)])
        written = (Path(tmp) / "data/params.ok").exists()
    said = err.getvalue()
    if code == 0:
        assert said == "" and written
        return
    assert code in (1, 2) and said.endswith("\n") and said.count("\n") == 1, (code, said)
    where = f"diffusion validate: error: {path}: " if code == 2 else "diffusion validate: error: "
    assert said.startswith(where), said
    assert not keys or said[len(where):].startswith(keys), said


@settings(FUZZ, max_examples=200)
@given(mutated_params())
@example({**DEFAULT_PARAMS, "sweep": {**DEFAULT_PARAMS["sweep"], "space": {"train.lr": {"type": "float", "low": 0.1, "high": 1, "lo": 0}}}})
@example({**DEFAULT_PARAMS, "sweep": {**DEFAULT_PARAMS["sweep"], "space": {"model.name": {"type": "categorical", "choices": [["unet-tiny"]]}}}})
def test_mutated_params_validate_or_fail_in_one_line(params: dict) -> None:
    # an unknown key as it is, or quoted where it holds a space or a control character ("\n")
    unknown = tuple(form for key in params if key not in DEFAULT_PARAMS for form in (str(key), repr(str(key))))
    content = yaml.dump(params, Dumper=yaml.CSafeDumper, sort_keys=False, allow_unicode=True).encode()
    validate(content, keys=tuple(DEFAULT_PARAMS) + tuple(OVERRIDE_KEYS) + unknown)


@settings(FUZZ, max_examples=150)
@given(broken_yaml())
@example(b"\xff\xfe not utf-8")
@example(b"- data\n- model\n")
def test_broken_or_non_mapping_params_files_fail_in_one_line(content: bytes) -> None:
    validate(content)


# --------------------------------------------------------------------------- image folders

# Each mode PIL writes, and the ImageFolder extensions it writes it as (PIL converts a few).
WRITES = {
    "1": ["png", "jpg", "bmp", "tiff", "webp", "ppm", "pgm"],
    "L": ["png", "jpg", "bmp", "tiff", "webp", "ppm", "pgm"],
    "LA": ["png", "tiff", "webp"],
    "P": ["png", "bmp", "tiff", "webp"],
    "PA": ["tiff", "webp"],
    "RGB": ["png", "jpg", "jpeg", "bmp", "tif", "webp", "ppm"],
    "RGBA": ["png", "bmp", "tiff", "webp"],
    "CMYK": ["jpg", "tiff"],
    "YCbCr": ["jpg", "tiff"],
    "LAB": ["tiff"],
    "I;16": ["png", "tiff", "pgm"],
    "I": ["tiff", "pgm"],
    "F": ["tiff", "pgm"],
}
FORMAT = {"jpg": "JPEG", "jpeg": "JPEG", "tif": "TIFF", "pgm": "PPM"}
BOMBS = [(10_000, 10_000), (20_000, 20_000)]  # past PIL's limit (it warns), past twice the limit (it raises)
DAMAGE = ["intact"] * 4 + ["truncated", "overwritten", "empty", "not an image", "bomb"]


def encode(mode: str, ext: str, width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    elif mode in ("I", "F"):
        image = Image.fromarray(rng.integers(0, 65536, (height, width)).astype(np.int32 if mode == "I" else np.float32))
    else:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    out = io.BytesIO()
    image.save(out, FORMAT.get(ext, ext.upper()))
    return out.getvalue()


@st.composite
def image_file(draw) -> tuple[str, bytes, str]:
    """(extension, content, damage): an image of any mode PIL writes, 1 to 40 pixels a side,
    left intact, cut short, with bytes overwritten, empty, not an image, or a decompression bomb."""
    mode = draw(st.sampled_from(sorted(WRITES)))
    ext = draw(st.sampled_from(WRITES[mode]))
    content = encode(mode, ext, draw(st.integers(1, 40)), draw(st.integers(1, 40)), draw(st.integers(0, 2**16)))
    damage = draw(st.sampled_from(DAMAGE))
    if damage == "truncated":
        content = content[: draw(st.integers(0, len(content) - 1))]
    elif damage == "overwritten":
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(content) - 1))
            content = content[:at] + draw(st.binary(min_size=1, max_size=8)) + content[at + 8 :]
    elif damage == "empty":
        content = b""
    elif damage == "not an image":
        content = draw(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
    elif damage == "bomb":
        ext, content = "png", decompression_bomb_png(*draw(st.sampled_from(BOMBS)))
    return ext, content, damage


@settings(FUZZ, max_examples=120)
@given(st.lists(st.lists(image_file(), max_size=3), max_size=3), st.booleans())
@example([[("png", decompression_bomb_png(*BOMBS[0]), "bomb")]], False)
@example([[("png", decompression_bomb_png(*BOMBS[1]), "bomb")]], False)
@example([[("pgm", b"P5 99999999999 1 255\n", "overwritten")]], False)  # PIL: ValueError, not OSError
@example([[("png", encode("I;16", "png", 5, 3, 0), "intact"), ("tiff", encode("CMYK", "tiff", 1, 1, 0), "intact")], []], True)
def test_image_folders_load_or_fail_in_one_line_naming_the_file(classes: list[list[tuple[str, bytes, str]]], notes: bool) -> None:
    """A folder of class folders (some empty, perhaps none) of such files, and perhaps a
    notes.txt in each (ImageFolder skips it): every intact image loads, else the error is one
    line naming the root or a damaged file; a decompression bomb never loads."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        damaged = set()
        for c, files in enumerate(classes):
            (root / f"class-{c}").mkdir()
            for i, (ext, content, damage) in enumerate(files):
                (root / f"class-{c}" / f"{i}.{ext}").write_bytes(content)
                if damage != "intact":
                    damaged.add(str(root / f"class-{c}" / f"{i}.{ext}"))
            if notes:
                (root / f"class-{c}" / "notes.txt").write_text("not an image")
        try:
            ds = load_source(section("data", source="imagefolder", root=str(root), image_size=8))
        except DatasetError as err:
            message = str(err)
            assert "\n" not in message
            if not classes or not all(classes):
                assert message.startswith("data.root: "), message
            else:
                assert message.split(": ")[0] in damaged, message
            return
    assert classes and all(classes)
    assert not any(damage == "bomb" for files in classes for _, _, damage in files)
    assert ds.images.shape == (sum(map(len, classes)), 3, 8, 8)
    assert ds.labels.tolist() == [c for c, files in enumerate(classes) for _ in files]
