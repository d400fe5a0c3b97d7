"""The main job: the scripted tour runs through all four servers over stdio and answers correctly."""

import json

import pandas as pd
import pytest

from cytoagent.demo import check_data, pick_provider, run_demo
from servers.common.errors import ToolError


def test_provider_choice(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert pick_provider("auto") == "scripted"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert pick_provider("auto") == "openai"
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    assert pick_provider("auto") == "anthropic" and pick_provider("scripted") == "scripted"


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(ToolError, match="cytoagent data fetch"):
        check_data(tmp_path)


def test_scripted_demo_end_to_end(shared_data, tmp_path, monkeypatch):
    import openslide

    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    res = run_demo(tmp_path / "report", provider="auto", data_root=shared_data, quiet=True)
    assert res.ok, res.error
    a = res.answer
    slide = openslide.OpenSlide(str(shared_data / "wsi/cmu-1-small-region.svs"))
    assert (a["slide"]["width"], a["slide"]["height"]) == slide.dimensions
    assert a["slide"]["mpp"] == pytest.approx(float(slide.properties["openslide.mpp-x"]))
    assert 0.3 < a["slide"]["tissue_area_mm2"] < 1.64  # the slide is 1.64 mm² in all
    tx = pd.read_csv(shared_data / "spatial/cosmx_lung12_mini/Lung12_tx_file.csv")
    in_cells = tx[(tx.cell_ID > 0) & ~tx.target.str.startswith("NegPrb")].groupby("fov").size()
    got = {int(r["fov"]): r["transcripts_in_cells"] for r in a["cosmx"]}
    assert got == {int(k): int(v) for k, v in in_cells.items()}
    assert a["enrichment"]["zscore"] > 3
    assert 0 <= a["smfish_f1"]["expert"] < a["smfish_f1"]["optimised"] <= 1
    html = res.html_path.read_text()
    assert html.count("<img") >= 5  # tissue, nuclei, enrichment, co-occurrence, preview, histogram
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["provider"] == "scripted" and summary["ok"]
