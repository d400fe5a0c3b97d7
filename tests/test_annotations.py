"""Annotation readers: synthetic files with exact answers, plus the real shared datasets."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.io import imsave

from servers.common.annotations import (
    imagescope_to_labels,
    list_dsb2018_samples,
    read_dsb2018_image,
    read_dsb2018_labels,
    read_imagescope_polygons,
    read_label_image,
    read_spot_csv,
)
from servers.common.errors import ToolError

XML = """<Annotations MicronsPerPixel="0.25"><Annotation Id="1"><Regions>
<Region Id="1"><Vertices><Vertex X="2" Y="1"/><Vertex X="5" Y="1"/><Vertex X="5" Y="3"/><Vertex X="2" Y="3"/></Vertices></Region>
<Region Id="2"><Vertices><Vertex X="10" Y="10"/><Vertex X="11" Y="10"/></Vertices></Region>
<Region Id="3"><Vertices><Vertex X="0" Y="8"/><Vertex X="3" Y="8"/><Vertex X="3" Y="9"/><Vertex X="0" Y="9"/></Vertices></Region>
</Regions></Annotation></Annotations>"""


def test_imagescope_synthetic(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text(XML)
    polys = read_imagescope_polygons(p)
    assert len(polys) == 2  # the 2-vertex region is skipped
    np.testing.assert_array_equal(polys[0][0], [1, 2])  # (row, col) from X=2, Y=1
    lab = imagescope_to_labels(p, (12, 8, 3))
    assert lab.dtype == np.int32 and lab.shape == (12, 8)
    expect = np.zeros((12, 8), dtype=np.int32)
    expect[1:4, 2:6] = 1  # polygon rows 1..3, cols 2..5 inclusive
    expect[8:10, 0:4] = 2
    np.testing.assert_array_equal(lab, expect)


def test_imagescope_bad(tmp_path):
    p = tmp_path / "bad.xml"
    p.write_text("<Annotations><Region")
    with pytest.raises(ToolError, match="not valid XML"):
        read_imagescope_polygons(p)
    with pytest.raises(ToolError, match="not found"):
        read_imagescope_polygons(tmp_path / "missing.xml")


def test_dsb_synthetic(tmp_path):
    s = tmp_path / "abc"
    (s / "images").mkdir(parents=True)
    (s / "masks").mkdir()
    img = np.zeros((6, 7, 4), dtype=np.uint8)
    img[..., 0] = 30
    img[..., 1] = 60
    img[..., 2] = 90
    img[..., 3] = 255
    imsave(s / "images" / "abc.png", img, check_contrast=False)
    m1 = np.zeros((6, 7), dtype=np.uint8)
    m1[0:2, 0:2] = 255
    m2 = np.zeros((6, 7), dtype=np.uint8)
    m2[3:6, 4:7] = 255
    imsave(s / "masks" / "b.png", m2, check_contrast=False)
    imsave(s / "masks" / "a.png", m1, check_contrast=False)
    lab = read_dsb2018_labels(s)
    assert lab[0, 0] == 1 and lab[4, 5] == 2 and lab.max() == 2 and (lab > 0).sum() == 13
    assert read_dsb2018_image(s).tolist() == np.full((6, 7), 60).tolist()
    assert read_dsb2018_image(s, grayscale=False).shape == (6, 7, 3)
    assert list_dsb2018_samples(tmp_path) == [s]
    with pytest.raises(ToolError, match="masks"):
        read_dsb2018_labels(tmp_path)


def test_spot_csv(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("x,y\r\n1.5,2\r\n10,20")
    np.testing.assert_array_equal(read_spot_csv(p), [[2, 1.5], [20, 10]])
    p.write_text("1,2\nfoo,bar\n")
    with pytest.raises(ToolError, match="line 2"):
        read_spot_csv(p)


def test_label_image_formats(tmp_path):
    lab = np.zeros((5, 5), dtype=np.uint16)
    lab[1:3, 1:3] = 4
    np.save(tmp_path / "l.npy", lab)
    assert read_label_image(tmp_path / "l.npy").max() == 4
    np.save(tmp_path / "f.npy", lab.astype(float))
    with pytest.raises(ToolError, match="integer label image"):
        read_label_image(tmp_path / "f.npy")


# --------------------------------------------------------------------------- real shared data


@pytest.mark.shared_data
@pytest.mark.parametrize("name,n", [("TCGA-2Z-A9J9-01A-01-TS1", 575), ("TCGA-HT-8564-01Z-00-DX1", 249)])
def test_monuseg_counts(shared_data, name, n):
    import tifffile

    img = tifffile.imread(shared_data / "he_nuclei" / f"{name}.tif")
    lab = imagescope_to_labels(shared_data / "he_nuclei" / f"{name}.xml", img.shape)
    assert lab.shape == img.shape[:2] == (1000, 1000)
    assert lab.max() == n and len(np.unique(lab)) == n + 1
    areas = np.bincount(lab.ravel())[1:]
    # 40x nuclei (0.25 µm/px): typical area a few hundred px, none empty
    assert areas.min() > 0 and 100 < np.median(areas) < 1500


@pytest.mark.shared_data
def test_stardist_mask_and_dsb(shared_data):
    m = read_label_image(shared_data / "fluo_nuclei" / "stardist_img2d.mask.tif")
    assert m.shape == (512, 512) and len(np.unique(m)) - 1 == 125
    samples = list_dsb2018_samples(shared_data / "fluo_nuclei" / "dsb2018")
    assert len(samples) == 12
    for s in samples[:3]:
        lab = read_dsb2018_labels(s)
        assert lab.max() == len(list((s / "masks").glob("*.png")))
        assert read_dsb2018_image(s).shape == lab.shape


@pytest.mark.shared_data
def test_smfish_csv(shared_data):
    pts = read_spot_csv(shared_data / "spots" / "smfish.csv")
    # 268 lines (the last without newline); first line is x=27.987, y=274.35
    assert pts.shape == (268, 2)
    np.testing.assert_allclose(pts[0], [274.35, 27.987])
    assert pts[:, 0].max() < 450 and pts[:, 1].max() < 700  # image is 700 wide × 450 high
