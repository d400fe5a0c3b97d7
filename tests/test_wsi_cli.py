"""``cytoagent wsi ...`` CLI plugin (exercised through its own argparse parser)."""

from __future__ import annotations

import argparse
import json

import pandas as pd

from servers.common import synthetic
from servers.wsi import cli


def _run(argv, capsys):
    p = argparse.ArgumentParser()
    cli.add_parser(p.add_subparsers())
    a = p.parse_args(argv)
    rc = a.func(a)
    return rc, capsys.readouterr()


def test_cli_info_tissue_tiles(tmp_path, capsys):
    synthetic.pyramidal_tiff(tmp_path / "a.tif", shape=(1024, 1024), mpp=0.5, levels=2)
    rc, out = _run(["wsi", "info", str(tmp_path / "a.tif")], capsys)
    assert rc == 0 and json.loads(out.out)["mpp"] == 0.5
    rc, out = _run(["wsi", "tissue", str(tmp_path / "a.tif"), "--out", str(tmp_path / "t.geojson")], capsys)
    assert rc == 0 and json.loads(out.out)["n_pieces"] == 2
    assert len(json.loads((tmp_path / "t.geojson").read_text())["features"]) == 2
    rc, out = _run(["wsi", "tiles", str(tmp_path / "a.tif"), "--tile-px", "64", "--tile-mpp", "2.0", "--workers", "1",
                    "--out", str(tmp_path / "tiles.csv")], capsys)
    assert rc == 0 and json.loads(out.out)["n_tiles"] == len(pd.read_csv(tmp_path / "tiles.csv")) > 0
    (tmp_path / "bad.svs").write_text("x")
    rc, out = _run(["wsi", "info", str(tmp_path / "bad.svs")], capsys)
    assert rc == 1 and "not a slide format" in out.err


def test_cli_nuclei_fluorescence(tmp_path, capsys):
    import numpy as np
    import tifffile

    s = synthetic.nuclei_image((256, 256), 20, modality="fluorescence", seed=3)
    tifffile.imwrite(tmp_path / "f.tif", (s.image * 4000).astype(np.uint16), resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    rc, out = _run(["wsi", "nuclei", str(tmp_path / "f.tif"), "--tile-px", "128", "--out", str(tmp_path / "n.csv")],
                   capsys)
    assert rc == 0, out.err
    summary = json.loads(out.out)
    assert summary["modality"] == "fluorescence" and summary["density_basis"] == "image area"
    assert abs(summary["n_nuclei"] - 20) <= 1 and len(pd.read_csv(tmp_path / "n.csv")) == summary["n_nuclei"]


def test_cli_paths_fall_back_to_data_root(data_root, tmp_path, monkeypatch, capsys):
    """A relative path missing from the current directory is looked up under the data root."""
    (data_root / "wsi").mkdir()
    synthetic.pyramidal_tiff(data_root / "wsi" / "a.tif", shape=(512, 512), mpp=0.25, levels=1)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rc, out = _run(["wsi", "info", "wsi/a.tif"], capsys)
    assert rc == 0, out.err
    assert json.loads(out.out)["mpp"] == 0.25
    rc, out = _run(["wsi", "info", "wsi/missing.svs"], capsys)
    assert rc == 1 and "No such file: 'wsi/missing.svs'" in out.err and str(data_root) in out.err
