import h5py
import numpy as np
import pytest

from openpluto.embed.writer import clean_slide_temps, is_complete, open_slide_h5, read_slide_h5


def _coords(n):
    return np.stack([np.arange(n) * 256, np.arange(n) * 128], axis=1)


def test_streamed_rows_attrs_and_clam_layout(tmp_path):
    out = tmp_path / "s.h5"
    feats = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    toks = np.random.default_rng(1).normal(size=(10, 4, 3)).astype(np.float32)
    attrs = {"mpp": 0.5, "tile_size": 224, "tile_size_level0": 448, "level": 1, "model": "m"}
    with open_slide_h5(out, _coords(10), 6, attrs, tissue_fraction=np.linspace(0.5, 1, 10),
                       token_shape=(4, 3), token_grid=(2, 2)) as w:
        assert not out.exists()  # only the temp file exists while writing
        for s in range(0, 10, 4):
            w.append(feats[s:s + 4], toks[s:s + 4])
    assert is_complete(out)
    d = read_slide_h5(out)
    np.testing.assert_array_equal(d["features"], feats)
    assert d["features"].dtype == np.float32 and d["coords"].dtype == np.int64
    np.testing.assert_array_equal(d["coords"], _coords(10))
    np.testing.assert_allclose(d["patch_tokens"], toks, atol=2e-3)
    assert d["patch_tokens"].dtype == np.float16
    assert d["attrs"]["mpp"] == 0.5 and d["attrs"]["tile_size_level0"] == 448 and d["attrs"]["model"] == "m"
    with h5py.File(out) as f:  # CLAM reads these from the coords dataset
        assert f["coords"].attrs["patch_size"] == 224 and f["coords"].attrs["patch_level"] == 1
        assert (f["patch_tokens"].attrs["grid_h"], f["patch_tokens"].attrs["grid_w"]) == (2, 2)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_failure_or_missing_rows_leave_no_file(tmp_path):
    out = tmp_path / "s.h5"
    with pytest.raises(RuntimeError, match="wrote 2 of 5"), open_slide_h5(out, _coords(5), 3, {}) as w:
        w.append(np.zeros((2, 3), np.float32))
    with pytest.raises(KeyError), open_slide_h5(out, _coords(5), 3, {}) as w:
        w.append(np.zeros((5, 3), np.float32))
        raise KeyError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="6 rows for 5"), open_slide_h5(out, _coords(5), 3, {}) as w:
        w.append(np.zeros((6, 3), np.float32))


def test_is_complete_and_temp_cleaning(tmp_path):
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    assert not is_complete(tmp_path / "junk.h5") and not is_complete(tmp_path / "missing.h5")
    with h5py.File(tmp_path / "nocomplete.h5", "w") as f:
        f["features"] = np.zeros((1, 2))
        f["coords"] = np.zeros((1, 2))
    assert not is_complete(tmp_path / "nocomplete.h5")
    mine = [tmp_path / ".a.x1y2z3.h5.tmp", tmp_path / ".a.q_9.h5.tmp"]
    other = [tmp_path / ".a.b.k3.h5.tmp", tmp_path / ".ab.k3.h5.tmp"]  # slides "a.b" and "ab"
    for p in mine + other:
        p.write_bytes(b"")
    assert clean_slide_temps(tmp_path, "a") == 2
    assert all(not p.exists() for p in mine) and all(p.exists() for p in other)
