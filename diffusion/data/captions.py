"""Captions: measured from a digit's pixels, or read from an image folder's metadata file.

**Measured captions** (``data.captions: measured``, the digit sources) name the digit and
one word per attribute, in the order of :data:`CAPTION_VOCABULARY` ("a large, thick,
right-leaning seven"). The attributes are measured on the ink, the pixels ``>= INK``:

- ``thickness``, in pixels of a 28-row image: the ink area ``A`` over the length of its
  skeleton (Zhang & Suen 1984, "A fast parallel algorithm for thinning digital patterns",
  CACM 27(3)). Thinning stops about ``t/2`` short of each end of a stroke of width ``t``,
  so ``A = t (S + t)`` for a straight stroke whose skeleton is ``S`` long; ``t`` is its
  positive root, ``A / S`` less the caps. ``S`` counts skeleton pixels, a diagonal step
  as ``√2``.
- ``slant``: the shear of the ink from its second central moments, ``-μ11 / μ02`` with x to
  the right and y down, so a stroke leaning right ("/") is positive; a bar sheared so that
  each row up moves it ``s`` to the right has slant ``s``.
- ``size``: ``√(height × width)`` of the ink's bounding box over the image side (MNIST
  scales every digit to 20 rows, so height alone says little).

The words and thresholds are data (``caption_vocabulary.json``, how they were chosen
is written there). :func:`parse_caption` reads back what :func:`measured_captions`
writes, and a prompt typed by hand: what the text-faithfulness metrics ask of a sample.

**Captions as data** (``data.captions: metadata``, source ``imagefolder``): a
``metadata.jsonl`` or ``metadata.csv`` at the folder's root, as Hugging Face's
``imagefolder``: one record per image with ``file_name`` (relative to the root) and
``text``. :func:`metadata_captions` checks it whole and returns the captions in the order
of the images; each fault is one line naming the file and its line. The validate stage
runs it on the folder's listing (:func:`folder_captions`), before DVC removes any output.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from diffusion.data.sizes import DatasetError, source_root

if TYPE_CHECKING:
    from diffusion.config import DataParams

VOCABULARY_FILE = Path(__file__).with_name("caption_vocabulary.json")
CAPTION_VOCABULARY: dict = json.loads(VOCABULARY_FILE.read_text())
"""``digits``: the digits' names, 0..9; ``attributes``: per attribute, in caption order, its
``words`` (low to high) and the ``thresholds`` between them (one fewer)."""

INK = 128
"""A pixel is ink when its value (uint8) is at least this."""
REFERENCE_SIDE = 28
"""Thickness is in pixels of an image this many rows high (MNIST's)."""
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_CHUNK = 8192  # images measured at a time (bounds the thinning's int64 neighbourhood codes)


# --------------------------------------------------------------------------- measuring


def _neighbours(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 neighbours of each pixel of ``[..., H, W]`` (zero outside), in Zhang–Suen's order
    P2..P9: north, north-east, east, south-east, south, south-west, west, north-west."""
    padded = F.pad(x, (1, 1, 1, 1))
    h, w = x.shape[-2:]
    steps = [(-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1)]
    return [padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in steps]


def _deletable(first: bool) -> torch.Tensor:
    """Zhang–Suen's deletion rule as a table over the 256 neighbourhoods (bit i = P(i+2)):
    2 <= B <= 6 neighbours, A = 1 rise 0 -> 1 around P2..P9, P2, and P2·P4·P6 = P4·P6·P8 = 0
    (first sub-iteration) or P2·P4·P8 = P2·P6·P8 = 0 (second)."""
    table = torch.zeros(256, dtype=torch.bool)
    for code in range(256):
        p = [(code >> i) & 1 for i in range(8)]  # P2..P9
        p2, _, p4, _, p6, _, p8, _ = p
        rises = sum(1 for i in range(8) if not p[i] and p[(i + 1) % 8])
        side = (p2 * p4 * p6 == 0 and p4 * p6 * p8 == 0) if first else (p2 * p4 * p8 == 0 and p2 * p6 * p8 == 0)
        table[code] = 2 <= sum(p) <= 6 and rises == 1 and side
    return table


_DELETABLE = (_deletable(True), _deletable(False))


def skeleton(ink: torch.Tensor) -> torch.Tensor:
    """Zhang–Suen thinning of a batch of binary images ``[N, H, W]`` (bool or 0/1), all at
    once: both sub-iterations repeat on the images that changed until none does."""
    x = ink.to(torch.uint8).clone()
    weights = [1 << i for i in range(8)]
    active = torch.arange(len(x))
    while len(active):
        part, changed = x[active], torch.zeros(len(active), dtype=torch.bool)
        for table in _DELETABLE:
            code = sum(n * w for n, w in zip(_neighbours(part), weights))  # uint8: bit i is P(i+2)
            delete = (part == 1) & torch.take(table, code.long())
            part = part.masked_fill(delete, 0)
            changed |= delete.flatten(1).any(1)
        x[active] = part
        active = active[changed]
    return x


def _skeleton_length(skel: torch.Tensor) -> torch.Tensor:
    """Pixels of a skeleton ``[N, H, W]``, each diagonal step (one with no pixel in its corner)
    counting ``√2``: a chain of n pixels in a row or column is n long, a diagonal one 1 + √2 (n - 1)."""
    s = skel.double()
    _, _, p4, p5, p6, p7, p8, _ = _neighbours(s)
    diagonal = s * p5 * (1 - p4) * (1 - p6) + s * p7 * (1 - p6) * (1 - p8)
    return s.sum((-1, -2)) + (math.sqrt(2) - 1) * diagonal.sum((-1, -2))


def measure_attributes(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """``thickness``, ``slant`` and ``size`` (float64 ``[N]``) of uint8 images ``[N, 1, H, W]``
    (see the module docstring); an image without ink measures 0 on each."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 1:
        raise DatasetError(f"captions: measured captions need uint8 [N, 1, H, W] digits; got {images.dtype} {tuple(images.shape)}")
    if len(images) > _CHUNK:
        parts = [measure_attributes(chunk) for chunk in images.split(_CHUNK)]
        return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
    ink = images[:, 0] >= INK
    n, h, w = ink.shape
    area = ink.double().sum((-1, -2))
    length = _skeleton_length(skeleton(ink))
    thickness = (torch.sqrt(length**2 + 4 * area) - length) / 2 * (REFERENCE_SIDE / h)

    weight = ink.double()
    mass = area.clamp(min=1)
    y = torch.arange(h, dtype=torch.float64).view(1, h, 1)
    x = torch.arange(w, dtype=torch.float64).view(1, 1, w)
    mean_y = (weight * y).sum((-1, -2)) / mass
    mean_x = (weight * x).sum((-1, -2)) / mass
    dy, dx = y - mean_y.view(n, 1, 1), x - mean_x.view(n, 1, 1)
    mu11 = (weight * dx * dy).sum((-1, -2))
    mu02 = (weight * dy * dy).sum((-1, -2))
    slant = torch.where(mu02 > 0, -mu11 / mu02.clamp(min=1e-12), torch.zeros_like(mu02))

    rows, cols = ink.any(-1), ink.any(-2)
    height = _extent(rows, h)
    width = _extent(cols, w)
    size = torch.sqrt(height * width) / max(h, w)
    return {"thickness": thickness, "slant": slant, "size": size}


def _extent(present: torch.Tensor, side: int) -> torch.Tensor:
    """Last minus first index where ``present`` ``[N, side]`` is True, plus one (0 when none)."""
    index = torch.arange(side)
    last = torch.where(present, index, -1).amax(-1)
    first = torch.where(present, index, side).amin(-1)
    return (last - first + 1).clamp(min=0).double()


# --------------------------------------------------------------------------- words


def attribute_words(values: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """The word of each attribute for each value: ``words[i]`` for values from ``thresholds[i-1]``
    (inclusive) to ``thresholds[i]`` (exclusive)."""
    out = {}
    for name, spec in CAPTION_VOCABULARY["attributes"].items():
        edges = torch.tensor(spec["thresholds"], dtype=torch.float64)
        index = torch.bucketize(values[name].double(), edges, right=True)
        out[name] = [spec["words"][i] for i in index.tolist()]
    return out


def caption(digit: str, words: Sequence[str]) -> str:
    """``a``/``an``, the words joined by commas, then the digit's name: "a large, thick, upright seven"."""
    phrase = f"{', '.join(words)} {digit}".strip()
    return f"{'an' if phrase[0].lower() in 'aeiou' else 'a'} {phrase}"


def measured_captions(images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> list[str]:
    """One caption per digit image: the name of its label (label d is the digit d, as in every
    MNIST source, whatever ``class_names`` spells) and the word of each measured attribute."""
    names = CAPTION_VOCABULARY["digits"]
    if len(class_names) != len(names):
        raise DatasetError(f"data.captions: measured captions name the {len(names)} digits; the data has {len(class_names)} classes")
    words = attribute_words(measure_attributes(images))
    order = list(CAPTION_VOCABULARY["attributes"])
    return [caption(names[label], [words[a][i] for a in order]) for i, label in enumerate(labels.tolist())]


@dataclass(frozen=True)
class AskedCaption:
    """What a caption asks for: a digit (0..9, or None when it names none, or two) and the word
    of each attribute it names (an attribute named with two different words is left out)."""

    digit: int | None
    words: dict[str, str] = field(default_factory=dict)


def _tokens(text: str) -> list[str]:
    """Lower-case runs of letters and digits: case, punctuation, hyphens and spacing do not matter."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _phrases() -> dict[tuple[str, ...], tuple[str, int | str]]:
    """Each name of the vocabulary as tokens -> ("digit", d) or (attribute, word)."""
    digits = CAPTION_VOCABULARY["digits"]
    phrases = {tuple(_tokens(name)): ("digit", d) for d, name in enumerate(digits)}
    phrases |= {(str(d),): ("digit", d) for d in range(len(digits))}
    for attribute, spec in CAPTION_VOCABULARY["attributes"].items():
        phrases |= {tuple(_tokens(word)): (attribute, word) for word in spec["words"]}
    return phrases


_PHRASES = _phrases()
_LONGEST = max(map(len, _PHRASES))


def parse_caption(text: str) -> AskedCaption:
    """The digit (its name, or a numeral 0..9) and attribute words a caption names, the longest
    name first; unknown words are skipped. Reads back every caption :func:`measured_captions` writes."""
    tokens, found, i = _tokens(text), {}, 0
    while i < len(tokens):
        for k in range(min(_LONGEST, len(tokens) - i), 0, -1):
            hit = _PHRASES.get(tuple(tokens[i : i + k]))
            if hit:
                found.setdefault(hit[0], set()).add(hit[1])
                i += k
                break
        else:
            i += 1
    asked = {key: next(iter(values)) for key, values in found.items() if len(values) == 1}
    digit = asked.pop("digit", None)
    return AskedCaption(digit, asked)


# --------------------------------------------------------------------------- metadata files


def metadata_file(root: Path) -> Path:
    """The one metadata file at ``root``; :class:`DatasetError` when there is none, or both."""
    present = [root / name for name in METADATA_FILES if (root / name).is_file()]
    if len(present) != 1:
        got = "both" if present else "neither"
        raise DatasetError(
            f"data.captions: metadata needs one of {root / METADATA_FILES[0]} or {root / METADATA_FILES[1]} "
            f"(file_name, text per image); found {got}"
        )
    return present[0]


def _records(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of each row of a metadata file; malformed rows are one line each."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot read ({type(err).__name__}); expected UTF-8 text") from None
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise DatasetError(f"{path}:{number}: not JSON ({err.args[0].split(':')[0]}); expected one object per line") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{path}:{number}: a JSON {type(record).__name__}; expected an object with file_name and text")
            records.append((number, record))
        return records
    rows = csv.reader(text.splitlines(keepends=True), strict=True)
    number = 1  # the line the row being read starts on (a quoted text may span lines)
    try:
        header = next(rows, [])
        if not {"file_name", "text"} <= set(header):
            raise DatasetError(f"{path}:1: header {header}; expected columns file_name and text")
        records, number = [], rows.line_num + 1
        for row in rows:
            if row and len(row) != len(header):
                raise DatasetError(
                    f"{path}:{number}: {len(row)} fields where the header has {len(header)}; quote a text that holds commas"
                )
            if row:
                records.append((number, dict(zip(header, row))))
            number = rows.line_num + 1
    except csv.Error as err:
        raise DatasetError(f"{path}:{number}: malformed CSV row ({err})") from None
    return records


def metadata_captions(root: Path, images: Sequence[str]) -> list[str]:
    """The caption of each of ``images`` (paths of the folder's image files) from the metadata
    file at ``root``; :class:`DatasetError` naming the file and line for a malformed record, a
    missing ``file_name`` or ``text``, an empty or non-string text, a ``file_name`` that is not
    one of the images, a duplicate, and for an image without a caption."""
    path = metadata_file(root)
    wanted = {os.path.normpath(image): i for i, image in enumerate(images)}
    captions: list[str | None] = [None] * len(images)
    lines: dict[int, int] = {}
    for number, record in _records(path):
        where = f"{path}:{number}"
        for key in ("file_name", "text"):
            if key not in record:
                raise DatasetError(f"{where}: no {key}; each record needs file_name and text")
        name, text = record["file_name"], record["text"]
        if not isinstance(name, str) or not name.strip():
            raise DatasetError(f"{where}: file_name {name!r}; expected a path relative to {root}")
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{where}: text {text!r} for {name}; each image needs one non-empty caption (a string)")
        file = os.path.normpath(root / name)
        if file not in wanted:
            why = f"not one of the images (<class>/<image>) of {root}" if os.path.isfile(file) else f"no such file in {root}"
            raise DatasetError(f"{where}: file_name {name}: {why}")
        index = wanted[file]
        if index in lines:
            raise DatasetError(f"{where}: file_name {name} again (line {lines[index]}); allowed one caption per image")
        lines[index] = number
        captions[index] = text.strip()
    missing = [images[i] for i, text in enumerate(captions) if text is None]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        relative = os.path.relpath(missing[0], root)
        raise DatasetError(f"{path}: no caption for {relative}{more}; each image needs one record (file_name, text)")
    return captions


def folder_captions(params: DataParams) -> list[str] | None:
    """The captions of the image folder at ``data.root`` in the order torchvision's
    ``ImageFolder`` lists its images (:func:`metadata_captions`); None when it lists none,
    which prepare then names."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = source_root(params)
    metadata_file(root)
    try:
        _, class_to_idx = find_classes(str(root))
        images = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
    except (OSError, ValueError):  # FileNotFoundError: no class folders, or one without images
        return None
    return metadata_captions(root, [file for file, _ in images])
