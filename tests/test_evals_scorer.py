"""Scorer: JSON extraction, Hungarian key/row matching, tolerance edges, text sets, aggregation."""

from __future__ import annotations

import pytest

from evals.schema import Question, load_questions, parse_tolerance
from evals.scorer import (
    aggregate,
    extract_json,
    match_keys,
    match_rows,
    score_answer,
    to_number,
    value_correct,
)


def make_q(**kw) -> Question:
    base = dict(id="q1", category="CellularQA", question="How many?", output_instructions="Report.",
                columns_to_compare_and_tolerance={"n_nuclei": 0.15})
    base.update(kw)
    return Question.model_validate(base)


MULTI = dict(id_column="image", columns_to_compare_and_tolerance={"n_nuclei": 0.15, "label": ["tumor", "tumour"]},
             reference_answer=[{"image": "a.tif", "n_nuclei": 100, "label": "tumor"},
                               {"image": "b.tif", "n_nuclei": 50, "label": "tumor"},
                               {"image": "c.tif", "n_nuclei": 20, "label": "tumor"}])


# -- extraction -------------------------------------------------------------------------------
def test_extract_fenced_block_wins_over_prose():
    text = 'I think {"n": 1} first.\n```json\n{"n_nuclei": 42}\n```\nDone.'
    assert extract_json(text) == ({"n_nuclei": 42}, "ok")


def test_extract_last_json_in_prose_and_plain_json():
    assert extract_json('Result: {"a": 1} and then [{"b": 2}] end') == ([{"b": 2}], "ok")
    assert extract_json('{"a": 1}') == ({"a": 1}, "ok")
    assert extract_json({"a": 1}) == ({"a": 1}, "ok")


@pytest.mark.parametrize("text,status", [(None, "no_json"), ("", "no_json"), ("about 42 nuclei", "no_json"),
                                         ("```json\n{n: 42,}\n```", "malformed"), ('{"n_nuclei": 4', "malformed")])
def test_extract_missing_or_malformed(text, status):
    value, st = extract_json(text)
    assert value is None and st == status


def test_missing_and_malformed_json_score_zero():
    q = make_q(reference_answer=[{"n_nuclei": 100}])
    for ans in (None, "no idea", "```json\n{bad json}\n```"):
        s = score_answer(q, ans)
        assert s.score == 0.0 and s.status in {"no_json", "malformed"}


# -- tolerances -------------------------------------------------------------------------------
def test_relative_tolerance_edges():
    tol = parse_tolerance(0.15)
    assert value_correct(115, 100, tol) and value_correct(85, 100, tol)
    assert value_correct(115.0000000001, 100, tol)  # float noise at the edge is inside
    assert not value_correct(115.01, 100, tol) and not value_correct(84.99, 100, tol)
    assert value_correct(-115, -100, tol) and not value_correct(100, -100, tol)
    assert value_correct("115", 100, tol) and value_correct("112 µm²", 100, tol)
    assert not value_correct("n/a", 100, tol) and not value_correct(None, 100, tol)
    assert not value_correct(float("nan"), 100, tol)


def test_zero_reference_needs_absolute_tolerance():
    assert not value_correct(0.01, 0.0, parse_tolerance(0.15))
    assert value_correct(0.0, 0.0, parse_tolerance(0.15))
    tol = parse_tolerance({"rel": 0.05, "abs": 0.02})
    assert value_correct(0.02, 0.0, tol) and not value_correct(0.021, 0.0, tol)


def test_exact_tolerance():
    assert value_correct(2220, 2220, "exact") and value_correct("2220", 2220, "exact")
    assert value_correct(2220.0, 2220, "exact") and not value_correct(2221, 2220, "exact")


def test_text_sets_are_case_and_space_insensitive():
    tol = parse_tolerance(["Tumour", "tumor cells"])
    assert value_correct("tumour", "x", tol) and value_correct("  TUMOR_CELLS ", "x", tol)
    assert not value_correct("stroma", "x", tol)
    assert value_correct(True, "yes", parse_tolerance(["true", "yes"]))
    per_row = parse_tolerance({"accept": {"a.csv": ["enriched"], "b.csv": ["depleted"]}})
    assert value_correct("Enriched", "enriched", per_row, row_id="a.csv")
    assert not value_correct("enriched", "depleted", per_row, row_id="b.csv")


def test_to_number():
    assert to_number("1,234.5") == 1234.5 and to_number("12%") == 12 and to_number(True) == 1.0
    assert to_number("about 12") is None and to_number([1]) is None


# -- matching ---------------------------------------------------------------------------------
def test_key_matching_is_hungarian_on_normalised_names():
    m = match_keys(["area_um2", "n_nuclei"], ["Number of nuclei", "Area (µm²)", "n_nuclei"])
    assert m == {"area_um2": "Area (µm²)", "n_nuclei": "n_nuclei"}
    assert match_keys(["n_nuclei"], ["colour"]) == {}


def test_row_matching_prefers_exact_then_similar_ids():
    pairs = match_rows(["he/TCGA-A.tif", "he/TCGA-B.tif", 3], ["TCGA-B", "3", "TCGA-A.tif", "zzz"])
    assert sorted(pairs) == [(0, 2), (1, 0), (2, 1)]
    assert match_rows([2, 3], ["2.0", 4]) == [(0, 0)]  # numeric ids compare as numbers


def test_multi_row_scoring_with_permuted_and_renamed_rows():
    q = make_q(**MULTI)
    ans = [{"Image": "c", "N nuclei": 21, "Label": "Tumour"},
           {"Image": "a", "N nuclei": 114, "Label": "tumor"},
           {"Image": "b", "N nuclei": 80, "Label": "stroma"}]
    s = score_answer(q, ans)
    assert s.status == "ok" and s.n_values == 6 and s.n_correct == 4
    assert s.score == pytest.approx(4 / 6)


def test_missing_and_extra_rows_are_penalised():
    q = make_q(**MULTI)
    two = [{"image": "a.tif", "n_nuclei": 100, "label": "tumor"}, {"image": "b.tif", "n_nuclei": 50, "label": "tumor"}]
    assert score_answer(q, two).score == pytest.approx(4 / 6)
    five = two + [{"image": "c.tif", "n_nuclei": 20, "label": "tumor"},
                  {"image": "d.tif", "n_nuclei": 1, "label": "tumor"}, {"image": "e.tif", "n_nuclei": 1, "label": "x"}]
    assert score_answer(q, five).score == pytest.approx(6 / 10)


def test_answer_shapes_wrapper_mapping_and_scalar():
    q = make_q(**MULTI)
    perfect = {"a.tif": {"n_nuclei": 100, "label": "tumor"}, "b.tif": {"n_nuclei": 50, "label": "tumor"},
               "c.tif": {"n_nuclei": 20, "label": "tumor"}}
    assert score_answer(q, perfect).score == 1.0
    assert score_answer(q, {"rows": [dict(image=k, **v) for k, v in perfect.items()]}).score == 1.0
    q1 = make_q(reference_answer=[{"n_nuclei": 100}])
    assert score_answer(q1, "```json\n100\n```").score == 1.0
    assert score_answer(q1, {"answer": {"n_nuclei": 90}}).score == 1.0
    q2 = make_q(id_column="fov", columns_to_compare_and_tolerance={"n": "exact"},
                reference_answer=[{"fov": 2, "n": 5}, {"fov": 3, "n": 7}])
    assert score_answer(q2, {"2": 5, "3": 7}).score == 1.0


def test_missing_id_column_scores_zero():
    q = make_q(**MULTI)
    s = score_answer(q, [{"colour": "x", "n_nuclei": 100}])
    assert s.score == 0.0 and s.status == "missing_columns"


def test_aggregate_per_category_and_skipped():
    qa = make_q(id="a", category="DataQA", reference_answer=[{"n_nuclei": 10}])
    qb = make_q(id="b", category="DataQA", reference_answer=[{"n_nuclei": 10}])
    qc = make_q(id="c", category="SpatialQA", reference_answer=[{"n_nuclei": 10}])
    scores = [score_answer(qa, {"n_nuclei": 10}), score_answer(qb, {"n_nuclei": 99}), score_answer(qc, None),
              {"id": "d", "category": "SlideQA", "score": 0.0, "status": "skipped"}]
    agg = aggregate(scores)
    assert agg["categories"]["DataQA"] == {"n": 2, "score": 0.5, "failure_rate": 0.5, "skipped": 0}
    assert agg["categories"]["SlideQA"]["skipped"] == 1 and agg["categories"]["SlideQA"]["n"] == 0
    assert agg["overall"]["n"] == 3 and agg["overall"]["score"] == pytest.approx(1 / 3)
    assert agg["overall"]["failure_rate"] == pytest.approx(2 / 3)


# -- schema -----------------------------------------------------------------------------------
def test_schema_rejects_bad_questions():
    with pytest.raises(ValueError):
        make_q(columns_to_compare_and_tolerance={})
    with pytest.raises(ValueError):
        make_q(columns_to_compare_and_tolerance={"n": True})
    with pytest.raises(ValueError):
        make_q(reference_answer=[{"n_nuclei": 1}, {"n_nuclei": 2}])  # several rows need an id column
    with pytest.raises(ValueError):
        make_q(reference_answer=[{"other": 1}])
    assert make_q(category="ImageQA").category == "PatchQA"


def test_shipped_question_set():
    qs = load_questions()
    assert len(qs) >= 40
    cats = {q.category for q in qs}
    assert cats == {"DataQA", "CellularQA", "PatchQA", "SlideQA", "SpatialQA"}
    for q in qs:
        assert q.reference_answer, q.id
        assert q.reference_plan or q.plan_pending, q.id
        # the reference answer scores 1.0 against itself, as a JSON text reply
        import json

        assert score_answer(q, "```json\n" + json.dumps(q.reference_answer) + "\n```").score == 1.0, q.id


def test_similar_but_different_ids_do_not_steal_rows():
    q = make_q(id_column="phenotype", columns_to_compare_and_tolerance={"n": "exact"},
               reference_answer=[{"phenotype": "Tumor CD30+", "n": 245}, {"phenotype": "CD8 T cells", "n": 57}])
    ans = [{"phenotype": "Tumor CD30+ KI67+", "n": 245}, {"phenotype": "CD8 T cells", "n": 57}]
    s = score_answer(q, ans)
    assert s.n_correct == 1 and s.score == 0.5
    assert match_rows(["Tumor CD30+", "Tumor CD30+ KI67+"], ["tumor cd30+ ki67+", "Tumor CD30+"]) == [(0, 1), (1, 0)]
