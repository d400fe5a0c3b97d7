"""wsi load_annotations: ImageScope XML, DSB2018 mask folders and label images → labels + the
segment_nuclei morphometry, against exact synthetic truth and the shared MoNuSeg annotations."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from servers.common import synthetic
from servers.common.errors import ToolError
from servers.wsi.annotated import load_annotations

RES_05 = {"resolution": (1e4 / 0.5, 1e4 / 0.5), "resolutionunit": "CENTIMETER"}


def _imagescope_xml(rects: list[tuple[int, int, int, int]]) -> str:
    """Regions as rectangles (x0, y0, x1, y1) in pixel-corner coordinates."""
    regions = []
    for i, (x0, y0, x1, y1) in enumerate(rects, start=1):
        verts = "".join(f'<Vertex X="{x}" Y="{y}" />' for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1)))
        regions.append(f'<Region Id="{i}"><Vertices>{verts}</Vertices></Region>')
    return f'<Annotations><Annotation Id="1"><Regions>{"".join(regions)}</Regions></Annotation></Annotations>'


def test_label_image_exact(data_root):
    s = synthetic.nuclei_image((200, 240), 25, modality="fluorescence", seed=4)
    tifffile.imwrite(data_root / "img.tif", (s.image * 1000).astype(np.uint16), **RES_05)
    tifffile.imwrite(data_root / "img.labels.tif", s.labels)
    res = load_annotations(data_root / "img.labels.tif", image=data_root / "img.tif")
    sm = res.summary()
    areas = np.bincount(s.labels.ravel())[1:]
    assert sm["source"] == "label_image" and sm["n_annotations"] == sm["n_objects"] == 25
    assert res.mpp == pytest.approx(0.5) and sm["image_modality"] == "fluorescence"
    assert sm["mean_area_um2"] == pytest.approx(areas.mean() * 0.25, abs=1e-3)
    assert sm["max_area_um2"] == pytest.approx(areas.max() * 0.25, abs=1e-3)
    assert sm["mean_area_px"] == pytest.approx(areas.mean(), abs=1e-3)
    assert sm["nuclear_area_fraction"] == pytest.approx((s.labels > 0).mean(), abs=1e-6)
    assert sm["density_per_mm2"] == pytest.approx(25 / (200 * 240 * 0.25e-6), abs=0.01)
    np.testing.assert_array_equal(res.table.sort_values("label")["area_px"].to_numpy(), areas)
    # equivalent diameter from the same areas
    assert sm["mean_equivalent_diameter_um"] == pytest.approx(np.sqrt(4 * areas / np.pi).mean() * 0.5, abs=1e-3)


def test_label_image_without_mpp_reports_pixels_only(data_root):
    lab = np.zeros((50, 50), np.int32)
    lab[5:15, 5:15] = 3  # label ids need not be consecutive
    lab[30:34, 30:40] = 7
    np.save(data_root / "lab.npy", lab)
    sm = load_annotations(data_root / "lab.npy").summary()
    assert sm["n_objects"] == 2 and sm["mean_area_px"] == 70.0
    assert "mean_area_um2" not in sm and sm["density_per_mm2"] is None and "mpp" in sm["note"]
    sm = load_annotations(data_root / "lab.npy", mpp=2.0).summary()
    assert sm["mean_area_um2"] == 280.0 and sm["max_area_um2"] == 400.0


def test_imagescope_xml_with_sibling_image(data_root):
    from PIL import Image

    rects = [(10, 10, 30, 30), (50, 20, 60, 60), (70, 70, 90, 80)]
    (data_root / "tile.xml").write_text(_imagescope_xml(rects))
    he = synthetic.nuclei_image((100, 120), 5, modality="he", seed=1)
    Image.fromarray(he.image).save(data_root / "tile.png")
    res = load_annotations(data_root / "tile.xml", mpp=0.25)
    sm = res.summary()
    assert sm["source"] == "imagescope_xml" and sm["n_annotations"] == sm["n_objects"] == 3
    assert res.labels.shape == (100, 120) and sm["image"] == "tile.png" and sm["image_modality"] == "he"
    # vertices are pixel centres and the rasteriser includes the boundary: (w + 1) x (h + 1) pixels each
    exact = [(x1 - x0 + 1) * (y1 - y0 + 1) for x0, y0, x1, y1 in rects]
    assert res.table.sort_values("label")["area_px"].tolist() == exact
    assert sm["mean_area_um2"] == pytest.approx(np.mean(exact) * 0.0625, abs=1e-3)
    assert "mean_hematoxylin_od" in res.table
    # no image next to the XML and none given: the size is unknown
    (data_root / "lonely.xml").write_text(_imagescope_xml(rects))
    with pytest.raises(ToolError, match="image="):
        load_annotations(data_root / "lonely.xml")
    # an image of another size is refused
    Image.fromarray(he.image[:50]).save(data_root / "small.png")
    lab = np.zeros((100, 120), np.int32)
    lab[1:5, 1:5] = 1
    np.save(data_root / "l.npy", lab)
    with pytest.raises(ToolError, match="drawn on"):
        load_annotations(data_root / "l.npy", image=data_root / "small.png")


def test_dsb_folder_counts_every_mask(data_root):
    from PIL import Image

    s = synthetic.nuclei_image((64, 80), 6, modality="fluorescence", seed=2)
    d = data_root / "dsb" / "abc"
    (d / "masks").mkdir(parents=True)
    (d / "images").mkdir()
    Image.fromarray((s.image * 255).astype(np.uint8)).convert("RGBA").save(d / "images" / "abc.png")
    for i in range(1, 7):
        Image.fromarray(((s.labels == i) * 255).astype(np.uint8)).save(d / "masks" / f"m{i}.png")
    res = load_annotations(d)
    sm = res.summary()
    assert sm["source"] == "dsb2018_folder" and sm["n_annotations"] == sm["n_objects"] == 6
    assert sm["image_modality"] == "fluorescence" and res.mpp is None
    assert sm["mean_area_px"] == pytest.approx(np.bincount(s.labels.ravel())[1:].mean(), abs=1e-3)
    with pytest.raises(ToolError, match="DSB2018"):
        load_annotations(d / "images")


def test_bad_inputs(data_root):
    (data_root / "x.csv").write_text("1,2\n")
    with pytest.raises(ToolError, match="Unsupported"):
        load_annotations(data_root / "x.csv")
    with pytest.raises(ToolError, match="not found"):
        load_annotations(data_root / "nope.xml")
    with pytest.raises(ToolError, match="mpp"):
        load_annotations(data_root / "x.csv", mpp=-1)
    # an intensity image passed as annotation (no 0 background) is refused, not counted as "objects"
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(6, 206, (40, 50)).astype(np.uint8)).save(data_root / "raw.png")
    with pytest.raises(ToolError, match="no background") as e:
        load_annotations(data_root / "raw.png")
    assert "0 = background" in str(e.value)


async def test_server_load_annotations(mcp_client, data_root, workspace):
    s = synthetic.nuclei_image((96, 96), 9, modality="fluorescence", seed=8)
    tifffile.imwrite(data_root / "f.tif", (s.image * 1000).astype(np.uint16), **RES_05)
    tifffile.imwrite(data_root / "f.mask.tif", s.labels)
    async with mcp_client("wsi") as c:
        res = await c.call_tool("load_annotations", {"annotation": "f.mask.tif", "image": "f.tif"})
        assert not res.is_error, res.content
        sm = res.structured_content
        assert sm["n_objects"] == 9 and sm["mpp"] == pytest.approx(0.5)
        np.testing.assert_array_equal(workspace.load(sm["labels_artifact"]) > 0, s.labels > 0)
        assert len(workspace.load(sm["table_artifact"])) == 9
        assert any(getattr(x, "type", "") == "image" for x in res.content)
        bad = await c.call_tool("load_annotations", {"annotation": "../etc/passwd"}, raise_on_error=False)
        assert bad.is_error


@pytest.mark.parametrize("name,n,mean_area", [("TCGA-2Z-A9J9-01A-01-TS1", 575, 24.915),
                                              ("TCGA-HT-8564-01Z-00-DX1", 249, 25.832)])
def test_monuseg_annotations(shared_data, name, n, mean_area):
    """The MoNuSeg XML (one Region per nucleus) against the counts in the data README / eval truth."""
    res = load_annotations(shared_data / "he_nuclei" / f"{name}.xml", mpp=0.2525)
    sm = res.summary()
    assert sm["n_annotations"] == sm["n_objects"] == n
    assert sm["mean_area_um2"] == pytest.approx(mean_area, abs=0.01)
    assert res.labels.shape == (1000, 1000) and sm["image_modality"] == "he"
