"""Reference statistics brought and taken (diffusion/evaluation/reference_files.py): our file
exported in ADM's and clean-fid's layouts and read back bit for bit, by us and by clean-fid
itself; the FID against a statistics file equals the FID against the features it came from;
bad files and a bad `evaluate.reference` are one line, before any work."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from conftest import full_params
from diffusion import cli
from diffusion.config import ConfigError, parse_params
from diffusion.evaluation.metrics import fid_from_features, fid_from_statistics, save_reference
from diffusion.evaluation.reference_files import ReferenceFileError, load_reference_statistics

EXPORT_ADM = ["diffusion", "reference", "export", "--format", "adm", "reference-adm.npz"]
EXPORT_CLEAN_FID = ["diffusion", "reference", "export", "--format", "clean-fid", "--name", "MNIST5k-500"]
CHECK = ["diffusion", "reference", "check", "reference-adm.npz"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Our reference file of 300 synthetic 2048-d float32 features (the prepare stage's writer)."""
    rng = np.random.default_rng(0)
    features = (rng.standard_normal((300, 2048)) * rng.uniform(0.5, 2, 2048) + 0.3).astype(np.float32)
    path = save_reference(tmp_path_factory.mktemp("reference") / "reference.npz", features)
    with np.load(path) as npz:
        return path, features, npz["mu"], npz["sigma"]


@pytest.fixture
def clean_fid_stats(tmp_path, monkeypatch):
    """clean-fid's stats folder moved into tmp_path: clean-fid finds it from ``cleanfid.__file__``
    (make_custom_stats and get_reference_statistics alike), so its package folder is untouched."""
    import cleanfid

    monkeypatch.setattr(cleanfid, "__file__", str(tmp_path / "cleanfid" / "__init__.py"))
    return tmp_path / "cleanfid" / "stats"


def test_round_trip_through_adms_format(reference, tmp_path, monkeypatch, capsys):
    path, features, mu, sigma = reference
    monkeypatch.chdir(tmp_path)
    assert cli.main([*EXPORT_ADM[1:], "--reference", str(path)]) == 0
    assert capsys.readouterr().out == f"diffusion reference: {path} as adm: wrote reference-adm.npz\n"
    with np.load("reference-adm.npz") as npz:  # the names ADM's FIDStatistics reads, and nothing else
        assert sorted(npz.files) == ["mu", "sigma"]
    loaded = load_reference_statistics("reference-adm.npz")
    assert loaded["format"] == "statistics" and loaded["features"] is None
    for name, array in (("mu", mu), ("sigma", sigma)):
        assert loaded[name].dtype == array.dtype == np.float64
        assert np.array_equal(loaded[name], array)

    assert cli.main(CHECK[1:]) == 0
    digest = hashlib.sha256((tmp_path / "reference-adm.npz").read_bytes()).hexdigest()
    assert capsys.readouterr().out == (
        "diffusion reference: reference-adm.npz: format statistics, mu float64, sigma float64, no features (FID only), "
        f"sha256 {digest}\n"
    )


def test_round_trip_through_clean_fids_custom_statistics(reference, clean_fid_stats, capsys):
    """clean-fid's own reader (what compute_fid/compute_kid with dataset_split="custom" call)
    gets back our mu, sigma and features exactly."""
    from cleanfid.features import get_reference_statistics

    path, features, mu, sigma = reference
    assert cli.main([*EXPORT_CLEAN_FID[1:], "--reference", str(path)]) == 0
    fid_file, kid_file = clean_fid_stats / "mnist5k-500_clean_custom_na.npz", clean_fid_stats / "mnist5k-500_clean_custom_na_kid.npz"
    assert capsys.readouterr().out == f"diffusion reference: {path} as clean-fid: wrote {fid_file}, {kid_file}\n"
    got_mu, got_sigma = get_reference_statistics("MNIST5k-500", 28, mode="clean", split="custom")
    assert got_mu.dtype == got_sigma.dtype == np.float64
    assert np.array_equal(got_mu, mu) and np.array_equal(got_sigma, sigma)
    feats = get_reference_statistics("MNIST5k-500", 28, mode="clean", split="custom", metric="KID")
    assert feats.dtype == np.float32 and np.array_equal(feats, features)
    loaded = load_reference_statistics(fid_file)
    assert loaded["format"] == "statistics" and np.array_equal(loaded["sigma"], sigma)

    assert cli.main([*EXPORT_CLEAN_FID[1:], "--reference", str(path)]) == 1  # clean-fid refuses to replace, as do we
    assert capsys.readouterr().err == (
        f"diffusion reference: error: --name MNIST5k-500: {fid_file} exists; choose another name, or --overwrite to replace it\n"
    )
    assert cli.main([*EXPORT_CLEAN_FID[1:], "--reference", str(fid_file), "--overwrite"]) == 0
    assert not kid_file.exists()  # statistics alone: no features left under the name for KID
    assert cli.main(["reference", "export", "--format", "clean-fid", "--name", "../up", "--reference", str(path)]) == 1
    assert "--name: '../up'; allowed: letters, digits" in capsys.readouterr().err


def test_fid_against_a_statistics_file_equals_fid_against_its_features(reference, tmp_path):
    """Both are the Frechet distance of one float64 mean and covariance; they differ by rounding
    alone: the covariance's eigendecomposition (backward error ~ 2048 * 2^-52 of its norm, about
    5e-13) against the features' exact factor. rtol 1e-9 leaves it three orders of room, and
    fails on any real difference (another ddof moves the FID by ~1/300)."""
    path, features, _, _ = reference
    rng = np.random.default_rng(1)
    samples = (rng.standard_normal((200, 2048)) * 1.2 + 0.35).astype(np.float32)
    loaded = load_reference_statistics(_adm_batch(tmp_path / "adm.npz", path))  # equal to ours: the round-trip tests
    assert fid_from_statistics(samples, loaded["mu"], loaded["sigma"]) == pytest.approx(
        fid_from_features(samples, features), rel=1e-9
    )


def _adm_batch(out, path):
    """An ADM reference batch: images (arr_0), mu and sigma, and the spatial mu_s, sigma_s."""
    with np.load(path) as npz:
        np.savez(out, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=npz["mu"], sigma=npz["sigma"],
                 mu_s=np.zeros(7), sigma_s=np.eye(7))
    return out


def test_reads_an_adm_reference_batch(reference, tmp_path):
    path, _, mu, sigma = reference
    loaded = load_reference_statistics(_adm_batch(tmp_path / "VIRTUAL_mnist.npz", path))
    assert loaded["format"] == "adm" and loaded["features"] is None
    assert np.array_equal(loaded["mu"], mu) and np.array_equal(loaded["sigma"], sigma)
    ours = load_reference_statistics(path)
    assert ours["format"] == "diffusion" and ours["features"].shape == (300, 2048)


def _bad_files(folder, path):
    with np.load(path) as npz:
        mu, sigma = npz["mu"], npz["sigma"]
    asymmetric = sigma.copy()
    asymmetric[0, 1] += 1.0
    nan = mu.copy()
    nan[3] = np.nan
    files = {
        "missing.npz": None,
        "text.npz": b"not a zip",
        "truncated.npz": path.read_bytes()[:100_000],
        "only-mu.npz": {"mu": mu},
        "short-mu.npz": {"mu": mu[:10], "sigma": sigma},
        "nan-mu.npz": {"mu": nan, "sigma": sigma},
        "asymmetric.npz": {"mu": mu, "sigma": asymmetric},
        "negative-variance.npz": {"mu": mu, "sigma": -sigma},
        "short-features.npz": {"mu": mu, "sigma": sigma, "features": np.zeros((1, 2048), np.float32)},
    }
    for name, content in files.items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        elif content is not None:
            np.savez(folder / name, **content)
    return list(files)


BAD = {
    "missing.npz": "no such reference file",
    "text.npz": "not a readable .npz file (not a whole zip archive: truncated, or another kind of file)",
    "truncated.npz": "not a readable .npz file (not a whole zip archive: truncated, or another kind of file)",
    "only-mu.npz": "not a reference file: missing sigma; it holds mu (expected mu and sigma",
    "short-mu.npz": "mu must be [2048] and sigma [2048, 2048] (Inception pool features); got [10] and [2048, 2048]",
    "nan-mu.npz": "mu must hold finite floats",
    "asymmetric.npz": "sigma is not symmetric, so not a covariance",
    "negative-variance.npz": "sigma has negative variances on its diagonal, so not a covariance",
    "short-features.npz": "features must be finite [N >= 2, 2048]; got float32 (1, 2048)",
}


def test_bad_files_are_one_line_naming_the_file(reference, tmp_path, capsys):
    names = _bad_files(tmp_path, reference[0])
    assert set(names) == set(BAD)
    for name, why in BAD.items():
        file = tmp_path / name
        with pytest.raises(ReferenceFileError) as err:
            load_reference_statistics(file)
        message = str(err.value)
        assert message.startswith(f"{file}: {why}") and "\n" not in message, message
        assert cli.main(["reference", "check", str(file)]) == 1
        assert capsys.readouterr().err == f"diffusion reference: error: {message}\n"


def test_evaluate_reference_is_checked_before_any_work(reference, tmp_path, monkeypatch):
    """config: the file exists (a missing one is one line naming the key); validate, the stage
    before every other: it loads, and holds more features than evaluate.prdc_k."""
    from diffusion.stages import validate

    path = reference[0]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        parse_params(full_params({"evaluate": {"reference": "refs/none.npz"}}))
    assert str(err.value).startswith("params: evaluate.reference: refs/none.npz: no such file; allowed: null")
    (tmp_path / "text.npz").write_bytes(b"not a zip")
    with pytest.raises(ReferenceFileError) as err:
        validate.run(parse_params(full_params({"evaluate": {"reference": "text.npz"}})))
    assert str(err.value) == (
        "evaluate.reference: text.npz: not a readable .npz file (not a whole zip archive: truncated, or another kind of file)"
    )
    with pytest.raises(ReferenceFileError) as err:
        validate.run(parse_params(full_params({"evaluate": {"reference": str(path), "prdc_k": 300}})))
    assert str(err.value) == (
        f"evaluate.prdc_k: 300 needs more than 300 images, but evaluate.reference {path} holds 300 features; allowed 1..299"
    )
    assert not (tmp_path / "data").exists()
    # k is checked against the file's features, not data.reference_images; statistics alone pass
    validate.run(parse_params(full_params({"evaluate": {"reference": str(path), "prdc_k": 299}})))
    validate.run(parse_params(full_params({"evaluate": {"reference": str(_adm_batch(tmp_path / "adm.npz", path))}})))
    assert (tmp_path / "data" / "params.ok").is_file()
