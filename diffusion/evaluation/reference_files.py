"""Reference statistics you can bring and take: ADM's and clean-fid's files, read and written.

The FID reference is a mean ``mu`` ``[2048]`` and a covariance ``sigma`` ``[2048, 2048]`` of
Inception pool features. Three files hold one:

- ours, ``data/reference.npz`` (the prepare stage, :func:`diffusion.evaluation.metrics.save_reference`):
  ``mu``, ``sigma`` and the ``features`` they came from;
- ADM's evaluator (Dhariwal & Nichol 2021; openai/guided-diffusion ``evaluations/evaluator.py``,
  ``FIDStatistics``): an ``.npz`` whose ``mu`` and ``sigma`` are the statistics. Its published
  reference batches also hold the images (``arr_0``) and spatial statistics (``mu_s``,
  ``sigma_s``, for sFID), which are read past here;
- clean-fid's custom statistics (Parmar et al. 2022; ``cleanfid.fid.make_custom_stats``):
  an ``.npz`` of ``mu`` and ``sigma`` named ``<cleanfid>/stats/{name}_{mode}_custom_na.npz``
  (lowercased), beside ``..._kid.npz`` holding the features (``feats``), which
  ``cleanfid.fid.compute_fid(folder, dataset_name=name, mode="clean", dataset_split="custom")``
  and ``compute_kid`` read.

:func:`load_reference_statistics` reads any of them (``evaluate.reference`` names such a file
in place of ``data/reference.npz``); ``diffusion reference export`` (:func:`main`) writes ours
in ADM's or clean-fid's layout, dtypes kept (ours: float64), atomically; ``diffusion reference check``
reads one and says what it holds. The protocol records a reference file's sha256 by
:func:`diffusion.files.file_digest`.

Caveats:

- ADM's evaluator computes its features with TensorFlow's Inception graph, fed images that
  TensorFlow resizes; ours are clean-fid's "clean" features (PIL bicubic resize, the same
  network as TorchScript). Parmar et al. 2022 ("On Aliased Resizing and Surprising Subtleties
  in GAN Evaluation") show such resizing differences move FID noticeably, so FIDs against an
  ADM batch's statistics are close to, not the same as, FIDs against statistics of the same
  images computed here: compare numbers measured against one reference file only (the
  protocol's ``reference_sha256``).
- ADM's ``evaluator.py`` itself reads a reference batch's images (``arr_0``) and its
  ``mu_s``/``sigma_s`` besides ``mu``/``sigma``; ``data/reference.npz`` holds neither, so an
  exported file serves what reads ADM-style ``mu``/``sigma``, not that script as it stands.
- A reference of statistics alone (ADM, clean-fid) gives FID but no KID, no precision,
  recall, density or coverage, and no bootstrap over the reference side: those need its features.
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from pathlib import Path
from typing import NoReturn

import numpy as np

from diffusion.data.dataset import quote_error
from diffusion.errors import UserError
from diffusion.evaluation.metrics import FEATURE_DIM, MODE
from diffusion.files import atomic_write, file_digest
from diffusion.stages.paths import REFERENCE

FORMATS = ("adm", "clean-fid")
"""The layouts ``diffusion reference export`` writes."""
SYMMETRY_RTOL = 1e-5
"""``sigma`` is symmetric when ``max |sigma - sigma^T| <= SYMMETRY_RTOL * max |sigma|``: the
rounding of a covariance stored in float32 (2^-24 relative) passes, a matrix that is not one fails."""
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""A clean-fid dataset name: it becomes part of a file name in clean-fid's stats folder."""


class ReferenceFileError(UserError, ValueError):
    """A reference file or an export that cannot be used; one line naming the file."""


def load_reference_statistics(path: str | Path) -> dict:
    """``{"mu", "sigma", "features", "format"}`` of a reference file of any of the three kinds
    (module doc), arrays as stored: ``features`` is None for a file of statistics alone;
    ``format`` is ``"diffusion"`` (ours), ``"adm"`` (an ADM reference batch: ``arr_0``,
    ``mu_s`` or ``sigma_s`` beside ``mu``/``sigma``) or ``"statistics"`` (``mu`` and ``sigma``
    alone: clean-fid's custom statistics, or ADM's as this module exports them).
    :class:`ReferenceFileError` naming the file when it is missing, corrupt, lacks ``mu`` or
    ``sigma``, or holds arrays of the wrong shape, non-finite values or an asymmetric ``sigma``."""
    path = Path(path)
    if not path.is_file():
        raise ReferenceFileError(f"{path}: no such reference file")
    if not zipfile.is_zipfile(path):  # np.load would try it as a pickle
        raise ReferenceFileError(f"{path}: not a readable .npz file (not a whole zip archive: truncated, or another kind of file)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
            arrays = {name: npz[name] for name in ("mu", "sigma", "features") if name in names}
    except Exception as err:  # zipfile and numpy raise many types for damaged files
        raise ReferenceFileError(f"{path}: not a readable .npz file ({quote_error(err)})") from None
    missing = [name for name in ("mu", "sigma") if name not in arrays]
    if missing:
        raise ReferenceFileError(
            f"{path}: not a reference file: missing {' and '.join(missing)}; it holds {', '.join(sorted(names)) or 'nothing'} "
            "(expected mu and sigma, as ours, ADM's and clean-fid's statistics files hold)"
        )
    mu, sigma, features = arrays["mu"], arrays["sigma"], arrays.get("features")
    _check_statistics(mu, sigma, path)
    if features is not None:
        if features.ndim != 2 or features.shape[1] != FEATURE_DIM or len(features) < 2 or not np.isfinite(features).all():
            raise ReferenceFileError(
                f"{path}: features must be finite [N >= 2, {FEATURE_DIM}]; got {features.dtype} {features.shape}"
            )
        kind = "diffusion"
    else:
        kind = "adm" if names & {"arr_0", "mu_s", "sigma_s"} else "statistics"
    return {"mu": mu, "sigma": sigma, "features": features, "format": kind}


def _check_statistics(mu: np.ndarray, sigma: np.ndarray, path: Path) -> None:
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise ReferenceFileError(
            f"{path}: mu must be [{FEATURE_DIM}] and sigma [{FEATURE_DIM}, {FEATURE_DIM}] (Inception pool features); "
            f"got {list(mu.shape)} and {list(sigma.shape)}"
        )
    for name, array in (("mu", mu), ("sigma", sigma)):
        if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            raise ReferenceFileError(f"{path}: {name} must hold finite floats; got {array.dtype} with values that are not")
    scale = float(np.abs(sigma).max())
    if float(np.abs(sigma - sigma.T).max()) > SYMMETRY_RTOL * scale:
        raise ReferenceFileError(f"{path}: sigma is not symmetric, so not a covariance")
    if (np.diagonal(sigma) < 0).any():
        raise ReferenceFileError(f"{path}: sigma has negative variances on its diagonal, so not a covariance")


def write_adm(reference: dict, out: str | Path) -> Path:
    """``reference``'s ``mu`` and ``sigma`` as ADM's evaluator names them, into ``out``."""
    with atomic_write(out) as fh:
        np.savez(fh, mu=reference["mu"], sigma=reference["sigma"])
    return Path(out)


def clean_fid_files(name: str) -> tuple[Path, Path]:
    """The FID and KID files that ``cleanfid.fid.get_reference_statistics(name, res, mode="clean",
    split="custom")`` reads: ``<cleanfid>/stats/{name}_clean_custom_na.npz`` and ``..._kid.npz``,
    lowercased as it lowercases them."""
    import cleanfid

    stem = f"{name}_{MODE}_custom_na".lower()
    folder = Path(cleanfid.__file__).parent / "stats"
    return folder / f"{stem}.npz", folder / f"{stem}_kid.npz"


def write_clean_fid(reference: dict, name: str, *, overwrite: bool = False) -> list[Path]:
    """``reference`` as clean-fid's custom statistics ``name`` (``make_custom_stats``' layout):
    ``mu`` and ``sigma``, and the features for KID when it has them. Returns the files written;
    :class:`ReferenceFileError` for a name that is not a file name, or one clean-fid already
    holds (unless ``overwrite``)."""
    if not NAME.fullmatch(name):
        raise ReferenceFileError(f"--name: {name!r}; allowed: letters, digits, '.', '_' and '-', starting with a letter or digit")
    fid_file, kid_file = clean_fid_files(name)
    if fid_file.exists() and not overwrite:
        raise ReferenceFileError(f"--name {name}: {fid_file} exists; choose another name, or --overwrite to replace it")
    written = [fid_file]
    with atomic_write(fid_file) as fh:  # uncompressed: np.load reads either, and a covariance hardly compresses
        np.savez(fh, mu=reference["mu"], sigma=reference["sigma"])
    if reference["features"] is not None:
        with atomic_write(kid_file) as fh:
            np.savez(fh, feats=reference["features"])
        written.append(kid_file)
    elif kid_file.exists():  # another reference's features under this name would give a KID against it
        kid_file.unlink()
    return written


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are a :class:`ReferenceFileError`: one line, as every other bad argument is."""

    def error(self, message: str) -> NoReturn:
        raise ReferenceFileError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffusion reference", description="Read and write FID reference statistics in ADM's and clean-fid's formats.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    export = commands.add_parser("export", help="write the reference's mu and sigma in ADM's or clean-fid's format")
    export.add_argument("--format", required=True, choices=FORMATS, help="adm: an .npz with mu and sigma; clean-fid: custom statistics --name")
    export.add_argument("out", nargs="?", help="the .npz to write (--format adm)")
    export.add_argument("--name", help="clean-fid's dataset name (--format clean-fid): compute_fid(dataset_name=NAME, dataset_split='custom')")
    export.add_argument("--overwrite", action="store_true", help="replace clean-fid statistics of that name")
    export.add_argument("--reference", default=str(REFERENCE), help=f"the reference file to read, of any format (default: {REFERENCE})")
    check = commands.add_parser("check", help="read a reference file (ours, ADM's or clean-fid's) and say what it holds")
    check.add_argument("reference", help="the .npz to read")
    return parser


def _export(args: argparse.Namespace) -> list[Path]:
    if args.format == "adm" and (args.out is None or args.name is not None or args.overwrite):
        raise ReferenceFileError("--format adm: give the file to write (OUT.npz), and no --name or --overwrite (clean-fid's)")
    if args.format == "clean-fid" and (args.name is None or args.out is not None):
        raise ReferenceFileError("--format clean-fid: give --name NAME (it writes into clean-fid's stats folder), and no OUT")
    if args.reference == str(REFERENCE) and not REFERENCE.is_file():
        raise ReferenceFileError(f"{REFERENCE}: no such reference file (the prepare stage writes it); or give --reference FILE")
    reference = load_reference_statistics(args.reference)
    try:
        if args.format == "adm":
            return [write_adm(reference, args.out)]
        return write_clean_fid(reference, args.name, overwrite=args.overwrite)
    except OSError as err:  # a folder that cannot be written: the venv's clean-fid, or OUT's
        raise ReferenceFileError(f"{err.filename or args.out}: cannot write there ({err.strerror or err})") from None


def main(argv: list[str]) -> int:
    """``diffusion reference export|check``; 0, or 1 after one error line (2 for bad arguments)."""
    try:
        args = _parser().parse_args(argv)
    except ReferenceFileError as err:
        print(f"diffusion reference: error: {err}", file=sys.stderr)
        return 2
    try:
        if args.command == "check":
            reference = load_reference_statistics(args.reference)
            features = reference["features"]
            held = "no features (FID only)" if features is None else f"{len(features)} features (FID, KID, precision/recall)"
            print(
                f"diffusion reference: {args.reference}: format {reference['format']}, mu {reference['mu'].dtype}, "
                f"sigma {reference['sigma'].dtype}, {held}, sha256 {file_digest(args.reference)}"
            )
            return 0
        written = _export(args)
    except UserError as err:  # ReferenceFileError, or a full disk
        print(f"diffusion reference: error: {err}", file=sys.stderr)
        return 1
    print(f"diffusion reference: {args.reference} as {args.format}: wrote {', '.join(map(str, written))}")
    return 0
