"""Library tests of the preprocess package (no MCP): primitives, downstream, tasks, sandboxed
evaluation with every kind of bad candidate, and the function bank."""

from __future__ import annotations

import numpy as np
import pytest

from servers.common.errors import ToolError


@pytest.fixture(autouse=True)
def _close_kernels():
    yield
    from servers.preprocess.evaluate import close_runners

    close_runners()


# -- primitives -------------------------------------------------------------------------------
def test_every_primitive_keeps_shape_and_returns_float32():
    from servers.preprocess.primitives import PRIMITIVES

    rng = np.random.default_rng(0)
    grey = (rng.random((40, 50)) * 1000).astype(np.float32)
    rgb = rng.integers(0, 255, (40, 50, 3)).astype(np.uint8)
    for name, prim in PRIMITIVES.items():
        for img in (grey, rgb):
            out = prim.fn(img.astype(np.float32))
            assert out.shape == img.shape, name
            assert out.dtype == np.float32, name
            assert np.isfinite(out).all(), name


def test_pipeline_code_is_standalone_and_matches_apply_pipeline():
    from servers.preprocess.primitives import apply_pipeline, pipeline_code

    steps = [("subtract_background", {"sigma": 12.0}), ("gaussian_blur", {"sigma": 0.8}),
             ("gamma_correct", {"gamma": 0.7}), ("clahe", {"clip_limit": 2.0, "tile_grid": 4})]
    code = pipeline_code(steps, header="test")
    ns: dict = {}
    exec(compile(code, "<gen>", "exec"), ns)  # only numpy/cv2 imports inside
    img = (np.random.default_rng(1).random((64, 64)) * 500).astype(np.float32)
    np.testing.assert_array_equal(ns["preprocess_images"]([img])[0], apply_pipeline(img, steps))
    assert "from servers" not in code


def test_primitive_semantics_exact():
    from servers.preprocess import primitives as P

    x = np.array([[0.0, 5.0], [10.0, 20.0]], np.float32)
    np.testing.assert_allclose(P.minmax_normalize(x), x / 20.0)
    np.testing.assert_allclose(P.scale_intensity(x, factor=0.5), x * 0.5)
    np.testing.assert_allclose(P.gamma_correct(x, gamma=2.0), (x / 20.0) ** 2, rtol=1e-6)
    with pytest.raises(ToolError, match="Unknown primitive"):
        P.apply_pipeline(x, [("nope", {})])


# -- downstream -------------------------------------------------------------------------------
def test_log_detector_finds_clean_spots_exactly_and_matches_skimage():
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max

    from servers.common.metrics import match_points
    from servers.common.synthetic import spot_image
    from servers.preprocess.downstream import detect_spots_log

    s = spot_image((128, 128), n=25, sigma=1.5, amplitude=(0.8, 1.0), noise=0.0, min_dist=8, seed=3)
    pred = detect_spots_log(s.image, sigma=1.5, threshold=0.1)
    m = match_points(s.coords, pred, radius=1.0)
    assert (m.tp, m.fp, m.fn) == (25, 0, 0)
    noisy = spot_image((96, 96), n=20, noise=0.08, seed=4).image
    ref = peak_local_max(-(1.5**2) * ndi.gaussian_laplace(noisy, 1.5), min_distance=2, threshold_abs=0.1,
                         exclude_border=0)
    got = detect_spots_log(noisy, sigma=1.5, threshold=0.1)
    assert {tuple(p) for p in ref.astype(float)} == {tuple(p) for p in got}


def test_downstream_scores_pooled_f1():
    from servers.preprocess.downstream import Downstream

    ds = Downstream("log_spots", {"sigma": 1.5, "threshold": 0.1}, match_radius_px=2.0)
    truths = [np.array([[10.0, 10.0], [20.0, 20.0]]), np.array([[5.0, 5.0]])]
    preds = [np.array([[10.5, 10.0]]), np.array([[5.0, 5.0], [30.0, 30.0]])]
    score, per = ds.score(preds, truths)
    # tp = 2, fp = 1, fn = 1 pooled -> 4 / 6
    assert score == pytest.approx(4 / 6)
    assert [p["tp"] for p in per] == [1, 1]
    with pytest.raises(ToolError, match="Unknown downstream"):
        Downstream("nope")


# -- tasks ------------------------------------------------------------------------------------
def test_builtin_split_is_deterministic_disjoint_and_complete():
    from servers.preprocess.tasks import get_task

    t = get_task("spots_synthetic")
    val, test = t.samples("val"), t.samples("test")
    ids_v, ids_t = [s.id for s in val], [s.id for s in test]
    assert not set(ids_v) & set(ids_t)
    assert sorted(ids_v + ids_t) == sorted(s.id for s in t.samples())
    assert len(val) == len(test) == 8
    assert ids_v == [s.id for s in get_task("spots_synthetic").samples("val")]
    with pytest.raises(ToolError, match="Unknown split"):
        t.samples("train")
    with pytest.raises(ToolError, match="Unknown task"):
        get_task("no_such_task")


def test_tile_sample_keeps_every_point_once():
    from servers.preprocess.tasks import Sample, tile_sample

    pts = np.array([[0.0, 0.0], [49.9, 50.0], [99.0, 149.0], [50.0, 74.9]])
    tiles = tile_sample(Sample("x", np.zeros((100, 150)), pts), (2, 3))
    assert len(tiles) == 6
    assert sum(len(t.truth) for t in tiles) == 4
    assert {t.image.shape for t in tiles} == {(50, 50)}
    lab = np.arange(100 * 150).reshape(100, 150)
    lt = tile_sample(Sample("l", np.zeros((100, 150)), lab), (2, 2))
    assert lt[3].truth[0, 0] == lab[50, 75]


def _write_spot_folder(root, n=4):
    from PIL import Image

    from servers.common.synthetic import spot_image

    (root / "images").mkdir(parents=True)
    (root / "truth").mkdir()
    coords = {}
    for i in range(n):
        s = spot_image((64, 64), n=8, noise=0.01, seed=10 + i)
        Image.fromarray((np.clip(s.image, 0, 1) * 255).astype(np.uint8)).save(root / "images" / f"im{i}.png")
        with open(root / "truth" / f"im{i}.csv", "w") as fh:
            fh.write("x,y\n" + "".join(f"{c},{r}\n" for r, c in s.coords))
        coords[f"im{i}"] = s.coords
    (root / "task.toml").write_text(
        'name = "my_spots"\nkind = "spots"\nimages = "images/*.png"\ntruth = "truth/{stem}.csv"\nexpert = "minmax"\n'
        "[downstream]\nmatch_radius_px = 2.5\n[downstream.settings]\nthreshold = 0.05\n[split]\nseed = 1\n")
    return coords


def test_folder_task_from_toml_and_registration(data_root):
    from servers.preprocess.tasks import all_tasks, get_task, load_task_file, register_task_folder

    coords = _write_spot_folder(data_root / "preprocess_tasks" / "my_spots")
    t = load_task_file(data_root / "preprocess_tasks" / "my_spots")
    assert (t.name, t.kind, t.expert, t.split_seed) == ("my_spots", "spots", "minmax", 1)
    assert t.downstream["settings"]["threshold"] == 0.05 and t.downstream["settings"]["sigma"] == 1.5
    samples = {s.id: s for s in t.samples()}
    assert set(samples) == set(coords)
    np.testing.assert_allclose(samples["im0"].truth, coords["im0"])
    assert "my_spots" in all_tasks()  # found under <data root>/preprocess_tasks
    assert get_task("my_spots").fingerprint == t.fingerprint
    (data_root / "other").mkdir()
    with pytest.raises(ToolError, match="No task file"):
        register_task_folder("other")
    with pytest.raises(ToolError, match="outside|climbs"):
        register_task_folder("../x")


def test_bad_task_file_is_a_clear_error(tmp_path):
    from servers.preprocess.tasks import load_task_file

    (tmp_path / "task.toml").write_text('name = "x"\nkind = "spots"\n')
    with pytest.raises(ToolError, match="lacks images, truth"):
        load_task_file(tmp_path)
    (tmp_path / "task.toml").write_text('name = "x"\nkind = "cells"\nimages="*.png"\ntruth="{stem}.csv"\n')
    with pytest.raises(ToolError, match="unknown kind"):
        load_task_file(tmp_path)


# -- sandboxed evaluation ---------------------------------------------------------------------
def test_expert_in_sandbox_equals_direct_computation():
    from servers.preprocess.evaluate import evaluate_code
    from servers.preprocess.primitives import apply_pipeline
    from servers.preprocess.tasks import get_task

    t = get_task("spots_synthetic")
    ev = evaluate_code(t, t.expert_code(), "val")
    assert ev.status == "ok", ev.error
    ds = t.make_downstream()
    samples = t.samples("val")
    preds = [ds.run(apply_pipeline(s.image, [("minmax_normalize", {})])) for s in samples]
    direct, per = ds.score(preds, [s.truth for s in samples])
    assert ev.score == pytest.approx(direct, abs=0)
    assert [p["n_pred"] for p in ev.per_image] == [len(p) for p in preds]
    assert ev.isolation in ("bubblewrap", "none")
    # a better pipeline really scores higher than the expert (the task has headroom)
    from servers.preprocess.primitives import pipeline_code

    better = pipeline_code([("gaussian_blur", {"sigma": 1.0}), ("subtract_background", {"sigma": 10.0}),
                            ("percentile_normalize", {"low": 1.0, "high": 99.9})])
    assert evaluate_code(t, better, "val").score > ev.score + 0.05


BAD = {
    "no function": ("def f(images):\n    return images\n", "error", "does not define a function named "
                    "preprocess_images"),
    "syntax": ("def preprocess_images(images)\n    return images\n", "error", "does not parse"),
    "raises": ("def preprocess_images(images):\n    raise ValueError('boom')\n", "error", "ValueError: boom"),
    "returns None": ("def preprocess_images(images):\n    return None\n", "error", "returned NoneType"),
    "wrong count": ("def preprocess_images(images):\n    return images[:1]\n", "error", "returned 1 images"),
    "wrong shape": ("def preprocess_images(images):\n    return [i[:10] for i in images]\n", "invalid",
                    "keep the height and width"),
    "extra channel": ("import numpy as np\ndef preprocess_images(images):\n    return [np.dstack([i, i]) for i in "
                      "images]\n", "invalid", "channel layout"),
    "nan": ("import numpy as np\ndef preprocess_images(images):\n    return [i * np.nan for i in images]\n",
            "invalid", "NaN"),
    "strings": ("import numpy as np\ndef preprocess_images(images):\n    return [np.full(i.shape, 'a') for i in "
                "images]\n", "error", "dtype"),
    "exit": ("import os\ndef preprocess_images(images):\n    os._exit(3)\n", "crashed", "kernel"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_candidates_are_scored_failures(case):
    from servers.preprocess.evaluate import evaluate_code
    from servers.preprocess.tasks import get_task

    code, status, msg = BAD[case]
    t = get_task("spots_synthetic")
    ev = evaluate_code(t, code, "val", timeout_s=20)
    assert ev.status == status, ev.error
    assert ev.score == 0.0
    assert msg in ev.error


def test_infinite_loop_times_out_and_runner_survives():
    from servers.preprocess.evaluate import evaluate_code
    from servers.preprocess.tasks import get_task

    t = get_task("spots_synthetic")
    ev = evaluate_code(t, "def preprocess_images(images):\n    while True:\n        pass\n", "val", timeout_s=1.0)
    assert ev.status == "timeout" and ev.score == 0.0 and "timeout" in ev.error.lower()
    assert evaluate_code(t, t.expert_code(), "val").status == "ok"


def test_escape_attempts_cannot_reach_ground_truth_or_repo(data_root):
    from servers.preprocess.evaluate import evaluate_code, get_runner
    from servers.preprocess.tasks import get_task

    secret = data_root / "truth.csv"
    secret.write_text("1,2\n")
    t = get_task("spots_synthetic")
    read = f"def preprocess_images(images):\n    open({str(secret)!r}).read()\n    return images\n"
    ev = evaluate_code(t, read, "val")
    if get_runner().isolation != "bubblewrap":
        pytest.skip("bubblewrap unavailable: the sandbox cannot hide the data root")
    assert ev.status == "error" and ("No such file" in ev.error or "Permission" in ev.error)
    import servers.preprocess as pkg

    target = str(pkg.__path__[0]) + "/pwned.txt"
    write = f"def preprocess_images(images):\n    open({target!r}, 'w').write('x')\n    return images\n"
    ev = evaluate_code(t, write, "val")
    assert ev.status == "error"
    import os

    assert not os.path.exists(target)
    net = "import socket\ndef preprocess_images(images):\n    socket.create_connection(('1.1.1.1', 80), 2)\n" \
          "    return images\n"
    assert evaluate_code(t, net, "val").status == "error"


def test_bad_arguments_raise_tool_errors():
    from servers.preprocess.evaluate import evaluate_code
    from servers.preprocess.tasks import get_task

    t = get_task("spots_synthetic")
    with pytest.raises(ToolError, match="Unknown split"):
        evaluate_code(t, "def preprocess_images(x): return x", "train")
    with pytest.raises(ToolError, match="empty"):
        evaluate_code(t, "   ", "val")


def test_rgb_outputs_are_converted_for_he_tasks():
    from servers.preprocess.evaluate import validate_outputs
    from servers.preprocess.tasks import BUILTIN_TASKS

    t = BUILTIN_TASKS["he_nuclei"]
    x = np.zeros((4, 4, 3), np.uint8)
    out = validate_outputs(t, [x], [np.full((4, 4, 3), 0.5, np.float32)])[0]
    assert out.dtype == np.uint8 and int(out[0, 0, 0]) == 128
    out = validate_outputs(t, [x], [np.full((4, 4, 3), 300.0, np.float32)])[0]
    assert int(out.max()) == 255


# -- bank -------------------------------------------------------------------------------------
def test_bank_records_ranks_and_persists(tmp_path):
    from servers.preprocess.bank import Bank

    b = Bank(tmp_path / "b.sqlite")
    for i, score in enumerate([0.5, 0.9, 0.1, 0.7]):
        ev = {"code_hash": f"h{i}", "split": "val", "status": "ok", "score": score, "per_image": [{"id": "a"}]}
        assert b.record("t", "fp", ev, code=f"code{i}")
    assert not b.record("t", "fp", {"code_hash": "h0", "split": "val", "status": "ok", "score": 0.0})
    b.record("t", "fp", {"code_hash": "bad", "split": "val", "status": "error", "score": 0.0, "error": "x"}, code="c")
    assert [r["code_hash"] for r in b.top("fp", 2)] == ["h1", "h3"]
    assert [r["code_hash"] for r in b.top("fp", 2, worst=True)] == ["h2", "h0"]
    assert b.top("fp", 1, worst=True, include_failures=True)[0]["code_hash"] == "bad"
    assert b.lookup("fp", "val", "h0")["score"] == 0.5
    assert b.evaluated("fp", "val", ["h0", "zz"]) == {"h0"}
    b.start_run("r", "t", "fp", "automl", {"a": 1})
    b.add_proposals("r", [{"rollout": 0, "iteration": 0, "slot": 0, "code_hash": "h1", "code": "code1",
                           "params": {"p": 1}}])
    with pytest.raises(ToolError, match="different settings"):
        b.start_run("r", "t", "fp", "automl", {"a": 2})
    b.close()
    b2 = Bank(tmp_path / "b.sqlite")
    assert b2.start_run("r", "t", "fp", "automl", {"a": 1})["resumed"] is True
    rows = b2.proposals("r", "fp")
    assert rows[0]["score"] == 0.9 and rows[0]["params"] == {"p": 1}
    assert [h["code_hash"] for h in b2.history("fp")] == ["h0", "h1", "h2", "h3", "bad"]
    assert b2.counts("fp") == {"val": {"ok": 4, "error": 1}}
    with pytest.raises(ToolError, match="No function"):
        b2.code("nope")


def test_candidates_cannot_tamper_with_inputs_or_other_runs():
    from servers.preprocess.evaluate import evaluate_code, get_runner
    from servers.preprocess.tasks import get_task

    t = get_task("spots_synthetic")
    ref = evaluate_code(t, t.expert_code(), "val")
    runner = get_runner()
    if runner.isolation != "bubblewrap":
        pytest.skip("bubblewrap unavailable")
    inputs = sorted(str(p) for p in runner.inputs_dir.glob("*.npz"))
    assert inputs
    evil = ("import numpy as np\ndef preprocess_images(images):\n"
            f"    np.savez({inputs[0]!r}, img0=np.zeros((2, 2)))\n    return images\n")
    ev = evaluate_code(t, evil, "val")
    assert ev.status == "error" and "Read-only file system" in ev.error
    again = evaluate_code(t, t.expert_code() + "\n# the same function under a new hash\n", "val")
    assert again.code_hash != ref.code_hash
    assert again.score == ref.score  # the inputs were not altered


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["smfish", pytest.param("he_nuclei", marks=pytest.mark.slow)])
def test_real_tasks_sandbox_score_equals_direct_computation(shared_data_root, name):
    from servers.preprocess.evaluate import evaluate_code, validate_outputs
    from servers.preprocess.primitives import apply_pipeline
    from servers.preprocess.tasks import get_task

    t = get_task(name)
    steps = [("percentile_normalize", {"low": 1.0, "high": 99.0})]
    from servers.preprocess.primitives import pipeline_code

    ev = evaluate_code(t, pipeline_code(steps), "val", timeout_s=120)
    assert ev.status == "ok", ev.error
    samples = t.samples("val")
    ready = validate_outputs(t, [s.image for s in samples], [apply_pipeline(s.image, steps) for s in samples])
    ds = t.make_downstream()
    direct, _ = ds.score([ds.run(x) for x in ready], [s.truth for s in samples])
    assert ev.score == pytest.approx(direct, abs=1e-12)
    if name == "smfish":
        from servers.common.annotations import read_spot_csv

        n_all = len(read_spot_csv(shared_data_root / "spots" / "smfish.csv"))
        n_split = sum(len(s.truth) for sp in ("val", "test") for s in t.samples(sp))
        assert n_split == n_all and len(t.samples()) == 24
    else:
        assert {s.image.shape for s in samples} == {(500, 500, 3)} and len(t.samples()) == 12


def test_nuclei_folder_task_from_yaml(tmp_path, monkeypatch):
    from servers.common.synthetic import nuclei_image
    from servers.preprocess.evaluate import evaluate_code
    from servers.preprocess.tasks import get_task

    root = tmp_path / "nuc"
    root.mkdir()
    for i in range(3):
        ni = nuclei_image((96, 96), n=8, seed=i)
        np.save(root / f"img{i}.npy", ni.image)
        np.save(root / f"img{i}.labels.npy", ni.labels)
    (root / "task.yaml").write_text("name: my_nuclei\nkind: nuclei\nimages: 'img?.npy'\ntruth: '{stem}.labels.npy'\n"
                                    "grid: [1, 2]\nsplit: {seed: 3, val_fraction: 0.5}\n")
    monkeypatch.setenv("CYTOAGENT_PREPROCESS_TASKS", str(root))
    t = get_task("my_nuclei")
    assert t.metric == "ap50" and t.expert == "normalize99" and len(t.samples()) == 6
    assert {s.image.shape for s in t.samples()} == {(96, 48)}
    ev = evaluate_code(t, t.expert_code(), "val")
    assert ev.status == "ok" and len(ev.per_image) == 3 and 0.0 <= ev.score <= 1.0
