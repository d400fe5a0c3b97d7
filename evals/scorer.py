"""Score a JSON answer against a question's reference (SlideQuest, NOVA appendix F.1).

1. Extract the JSON answer from the assistant's reply (a parsed object, a ```json block, or the
   last JSON value in the text). No JSON → score 0 (status ``no_json``).
2. Normalise it to rows: a list of objects, one object (one row), ``{"rows": [...]}``-style
   wrappers, or a mapping ``{row_id: {col: value}}`` when the question has an ``id_column``.
3. Match the answer's keys to the expected columns with the Hungarian algorithm on normalised
   name similarity (``Area (µm²)`` matches ``area_um2``), then match rows on the id column with
   the Hungarian algorithm on id similarity (exact ids first; near-identical spellings accepted).
4. Every (reference row, compared column) value scores 1 when within tolerance, else 0. Extra
   answer rows count as wrong rows, so listing bogus rows lowers the score. The question score
   is the mean over ``max(n_reference_rows, n_answer_rows) × n_columns`` values.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import unicodedata
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from evals.schema import CATEGORIES, NumericTolerance, Question, TextTolerance, ToleranceSpec

ID_MATCH_MIN = 0.85  # minimum id similarity for two rows to be paired
KEY_MATCH_MIN = 0.6  # minimum key-name similarity for an answer key to stand for a column
_WRAPPERS = ("answer", "answers", "rows", "results", "result", "data", "records", "table")


# -- extraction -------------------------------------------------------------------------------
_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.S)


def extract_json(answer: Any) -> tuple[Any, str]:
    """``(value, status)``: status is ``ok``, ``no_json`` (nothing found) or ``malformed``."""
    if answer is None:
        return None, "no_json"
    if isinstance(answer, dict | list):
        return answer, "ok"
    if isinstance(answer, bool | int | float):
        return answer, "ok"
    if not isinstance(answer, str):
        return None, "malformed"
    text = answer.strip()
    if not text:
        return None, "no_json"
    saw_candidate = False
    for block in reversed(_FENCE.findall(text)):
        saw_candidate = True
        try:
            return json.loads(block), "ok"
        except json.JSONDecodeError:
            continue
    try:
        return json.loads(text), "ok"
    except json.JSONDecodeError:
        pass
    # the last decodable JSON object/array in free text
    dec = json.JSONDecoder()
    found = None
    pos = 0
    for m in re.finditer(r"[\[{]", text):
        if m.start() < pos:
            continue  # inside a value already decoded: keep top-level values only
        saw_candidate = True
        try:
            val, end = dec.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(val, dict | list):
            found, pos = val, end
    if found is not None:
        return found, "ok"
    return None, "malformed" if saw_candidate else "no_json"


# -- normalisation ----------------------------------------------------------------------------
def norm_key(s: Any) -> str:
    s = unicodedata.normalize("NFKD", str(s)).replace("µ", "u").replace("μ", "u").replace("²", "2")
    s = s.encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z0-9]+", "", s)


def norm_text(s: Any) -> str:
    if isinstance(s, bool):
        return "true" if s else "false"
    if isinstance(s, float) and s.is_integer():
        s = int(s)
    s = unicodedata.normalize("NFKC", str(s)).strip().lower()
    s = re.sub(r"[\s_\-]+", " ", s)
    return s.strip(" .")


def to_rows(value: Any, q: Question) -> list[dict[str, Any]] | None:
    """The answer as a list of row dicts, or None when it has no row structure."""
    if isinstance(value, dict):
        low = {norm_key(k): k for k in value}
        for w in _WRAPPERS:
            if w in low and isinstance(value[low[w]], list | dict) and len(value) <= 2:
                inner = to_rows(value[low[w]], q)
                if inner:
                    return inner
        if q.id_column and value and all(isinstance(v, dict) for v in value.values()):
            idk = norm_key(q.id_column)
            if not any(idk == norm_key(k) for v in value.values() for k in v):
                return [{q.id_column: k, **v} for k, v in value.items()]
            return [dict(v) for v in value.values()]
        cols = list(q.columns_to_compare_and_tolerance)
        if q.id_column and len(cols) == 1 and value and all(
                not isinstance(v, dict | list) for v in value.values()):
            # {row_id: value} for a single compared column
            known = {norm_key(q.id_column), norm_key(cols[0])}
            if not (set(map(norm_key, value)) & known):
                return [{q.id_column: k, cols[0]: v} for k, v in value.items()]
        return [value]
    if isinstance(value, list):
        if all(isinstance(r, dict) for r in value) and value:
            return list(value)
        return None
    if not isinstance(value, dict | list) and q.id_column is None and len(q.columns_to_compare_and_tolerance) == 1:
        return [{next(iter(q.columns_to_compare_and_tolerance)): value}]
    return None


# -- value comparison -------------------------------------------------------------------------
_NUM = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def to_number(v: Any) -> float | None:
    """A number from a JSON value: numbers, booleans (1/0) and strings that start with a number."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float | np.integer | np.floating):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, str):
        s = v.strip().replace(",", "")
        m = _NUM.search(s)
        if not m or m.start() > 1:
            return None
        return float(m.group())  # units after the number are ignored ("12.5 µm²", "12%" → 12.5, 12)
    return None


def value_correct(pred: Any, ref: Any, tol: ToleranceSpec, row_id: Any = None) -> bool:
    """Is ``pred`` an acceptable answer for ``ref`` under ``tol``?"""
    if isinstance(tol, TextTolerance):
        accept = tol.accept
        if isinstance(accept, dict):
            key = norm_text(row_id)
            match = {norm_text(k): v for k, v in accept.items()}.get(key)
            accept = match if match is not None else [ref]
        ok = {norm_text(a) for a in accept}
        if isinstance(pred, list):
            return bool(pred) and all(norm_text(p) in ok for p in pred)
        return norm_text(pred) in ok
    if isinstance(ref, str) and to_number(ref) is None:
        return norm_text(pred) == norm_text(ref)  # exact text
    if isinstance(ref, list):
        if not isinstance(pred, list):
            return False
        return sorted(map(norm_text, pred)) == sorted(map(norm_text, ref))
    r, p = to_number(ref), to_number(pred)
    if r is None or p is None:
        return norm_text(pred) == norm_text(ref)
    if tol == "exact":
        return abs(p - r) <= 1e-9 * max(1.0, abs(r))
    assert isinstance(tol, NumericTolerance)
    slack = 1e-9 * max(1.0, abs(r))  # float noise at the tolerance edge
    return abs(p - r) <= max(tol.rel * abs(r), tol.abs) + slack


# -- matching ---------------------------------------------------------------------------------
def _hungarian(cost: np.ndarray) -> list[tuple[int, int]]:
    from scipy.optimize import linear_sum_assignment

    if cost.size == 0:
        return []
    r, c = linear_sum_assignment(cost)
    return list(zip(r.tolist(), c.tolist()))


def _sim(a: str, b: str) -> float:
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    if a in b or b in a:  # "area" vs "areaum2": a unit suffix
        return 0.8 + 0.2 * min(len(a), len(b)) / max(len(a), len(b))
    return difflib.SequenceMatcher(None, a, b).ratio()


def match_keys(expected: list[str], answer_keys: list[str]) -> dict[str, str]:
    """expected column → answer key (Hungarian on normalised-name similarity)."""
    ne = [norm_key(k) for k in expected]
    na = [norm_key(k) for k in answer_keys]
    sim = np.array([[_sim(e, a) for a in na] for e in ne]).reshape(len(ne), len(na))
    out = {}
    for i, j in _hungarian(1.0 - sim):
        if sim[i, j] >= KEY_MATCH_MIN:
            out[expected[i]] = answer_keys[j]
    return out


def _id_number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float | np.integer | np.floating):
        return float(v)
    if isinstance(v, str) and _NUM.fullmatch(v.strip()):
        return float(v)
    return None


def _id_sim(a: Any, b: Any) -> float:
    na, nb = _id_number(a), _id_number(b)
    if na is not None and nb is not None:
        return 1.0 if na == nb else 0.0
    ta, tb = norm_text(a), norm_text(b)
    if ta == tb:
        return 1.0
    ka, kb = norm_key(a), norm_key(b)
    if ka == kb:
        return 0.99
    # a path vs its file name ("he_nuclei/X.tif" vs "X"): compare stems
    sa, sb = re.sub(r"\.[a-z0-9]+$", "", ta.rsplit("/", 1)[-1]), re.sub(r"\.[a-z0-9]+$", "", tb.rsplit("/", 1)[-1])
    if sa == sb:
        return 0.95
    return difflib.SequenceMatcher(None, ka, kb).ratio()


def match_rows(ref_ids: list[Any], ans_ids: list[Any]) -> list[tuple[int, int]]:
    sim = np.array([[_id_sim(r, a) for a in ans_ids] for r in ref_ids]).reshape(len(ref_ids), len(ans_ids))
    return [(i, j) for i, j in _hungarian(1.0 - sim) if sim[i, j] >= ID_MATCH_MIN]


# -- scoring ----------------------------------------------------------------------------------
@dataclass
class QuestionScore:
    id: str
    category: str
    score: float
    status: str  # ok | no_json | malformed | no_rows | missing_columns | skipped | error
    n_values: int = 0
    n_correct: int = 0
    details: list[dict[str, Any]] = field(default_factory=list)
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_answer(q: Question, answer: Any, reference: list[dict[str, Any]] | None = None) -> QuestionScore:
    """Score one answer (text, or an already-parsed JSON value) for question ``q``."""
    ref = reference if reference is not None else q.reference_answer
    if not ref:
        raise ValueError(f"question {q.id} has no reference answer")
    value, status = extract_json(answer)
    if status != "ok":
        return QuestionScore(q.id, q.category, 0.0, status, message="no JSON answer found" if status == "no_json"
                             else "the JSON answer could not be parsed")
    rows = to_rows(value, q)
    if not rows:
        return QuestionScore(q.id, q.category, 0.0, "no_rows", message=f"answer has no rows: {str(value)[:200]}")
    tols = q.tolerances()
    cols = list(tols)
    expected = ([q.id_column] if q.id_column and q.id_column not in cols else []) + cols
    answer_keys = list(dict.fromkeys(k for r in rows for k in r))
    kmap = match_keys(expected, answer_keys)
    n_total = len(cols) * max(len(ref), len(rows))
    if q.id_column:
        if q.id_column not in kmap:
            return QuestionScore(q.id, q.category, 0.0, "missing_columns", n_total, 0,
                                 message=f"no key for the id column {q.id_column!r} in {answer_keys}")
        ak = kmap[q.id_column]
        pairs = match_rows([r[q.id_column] for r in ref], [r.get(ak) for r in rows])
    else:
        pairs = [(0, 0)] if len(ref) == 1 else []
    details = []
    correct = 0
    paired = dict(pairs)
    for i, rref in enumerate(ref):
        rid = rref.get(q.id_column) if q.id_column else None
        j = paired.get(i)
        for c in cols:
            if j is None:
                details.append({"row": rid, "column": c, "expected": rref[c], "got": None, "correct": False})
                continue
            got = rows[j].get(kmap[c]) if c in kmap else None
            ok = c in kmap and value_correct(got, rref[c], tols[c], rid)
            correct += ok
            details.append({"row": rid, "column": c, "expected": rref[c], "got": got, "correct": bool(ok)})
    missing = [c for c in cols if c not in kmap]
    return QuestionScore(q.id, q.category, correct / n_total if n_total else 0.0,
                         "ok" if not missing else "missing_columns", n_total, correct, details,
                         message=f"no answer key for {missing}" if missing else "")


def aggregate(scores: list[QuestionScore | dict]) -> dict[str, Any]:
    """Per-category and overall mean scores and failure rates (skipped questions excluded)."""
    by: dict[str, list[float]] = defaultdict(list)
    skipped: dict[str, int] = defaultdict(int)
    fails: dict[str, int] = defaultdict(int)
    for s in scores:
        d = s.to_dict() if isinstance(s, QuestionScore) else s
        if d["status"] == "skipped":
            skipped[d["category"]] += 1
            continue
        by[d["category"]].append(float(d["score"]))
        fails[d["category"]] += float(d["score"]) == 0.0
    cats = {}
    for c in [*CATEGORIES, *sorted(set(by) - set(CATEGORIES))]:
        if c in by or c in skipped:
            v = by.get(c, [])
            cats[c] = {"n": len(v), "score": float(np.mean(v)) if v else None,
                       "failure_rate": fails[c] / len(v) if v else None, "skipped": skipped.get(c, 0)}
    allv = [x for v in by.values() for x in v]
    return {"categories": cats, "overall": {
        "n": len(allv), "score": float(np.mean(allv)) if allv else None,
        "failure_rate": sum(fails.values()) / len(allv) if allv else None,
        "skipped": sum(skipped.values())}}
