"""The question format (after SlideQuest, NOVA appendix F) and loading of question sets.

A question names its data (paths relative to a data root), asks for a JSON answer, and says how
that answer is compared with the reference: rows are matched on ``id_column`` and each column in
``columns_to_compare_and_tolerance`` is checked with its tolerance.

Tolerance specs (per column):
    ``0.15``                         relative tolerance (|pred - ref| <= 0.15 * |ref|)
    ``{"rel": 0.15, "abs": 1}``      within either the relative or the absolute tolerance
    ``"exact"``                      equal after normalisation (numbers: |pred - ref| <= 1e-9 * scale)
    ``["yes", "true"]``              a text answer that must be one of these (case/space-insensitive)
    ``{"accept": {...}}``            per-row acceptable sets: ``{row_id: [answers]}``
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Category = Literal["DataQA", "CellularQA", "PatchQA", "SlideQA", "SpatialQA"]
CATEGORIES: tuple[str, ...] = ("DataQA", "CellularQA", "PatchQA", "SlideQA", "SpatialQA")
_ALIASES = {"imageqa": "PatchQA", "patchqa/imageqa": "PatchQA"}

QUESTIONS_DIR = Path(__file__).resolve().parent / "questions"
DEFAULT_TOLERANCE = 0.15


class NumericTolerance(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rel: float = Field(DEFAULT_TOLERANCE, ge=0)
    abs: float = Field(0.0, ge=0)


class TextTolerance(BaseModel):
    """Acceptable text answers, either one set for every row or a set per row id."""

    model_config = ConfigDict(extra="forbid")
    accept: list[str] | dict[str, list[str]]


ToleranceSpec = NumericTolerance | TextTolerance | Literal["exact"]


def parse_tolerance(spec: Any) -> ToleranceSpec:
    """Normalise a tolerance as written in a question file (float, dict, list or "exact")."""
    if isinstance(spec, NumericTolerance | TextTolerance):
        return spec
    if spec == "exact":
        return "exact"
    if isinstance(spec, bool):
        raise ValueError("a tolerance cannot be a boolean; use a number, a list of texts or 'exact'")
    if isinstance(spec, int | float):
        return NumericTolerance(rel=float(spec))
    if isinstance(spec, list):
        return TextTolerance(accept=[str(s) for s in spec])
    if isinstance(spec, dict):
        if "accept" in spec:
            return TextTolerance(**spec)
        return NumericTolerance(**spec)
    raise ValueError(f"unknown tolerance {spec!r}: use a number (relative), {{'rel','abs'}}, a list of texts or 'exact'")


class Question(BaseModel):
    """One benchmark question."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    category: Category
    data: Literal["shared", "generated"] = Field(
        "shared", description="which data root the paths are relative to: the shared data folder or "
        "the generated datasets (evals.generate)")
    data_type: str = ""
    data_paths: list[str] = Field(default_factory=list, description="paths relative to the data root")
    question: str
    additional_instructions: str = ""
    output_instructions: str
    id_column: str | None = None
    columns_to_compare_and_tolerance: dict[str, Any]
    rationale: str = ""
    reference_answer: list[dict[str, Any]] | None = None
    reference_plan: list[dict[str, Any]] | None = None
    plan_pending: str | None = Field(None, description="why the reference plan is not available yet")
    tags: list[str] = Field(default_factory=list)
    is_pathologist_verified: bool = False
    is_biomedical_scientist_verified: bool = False

    @field_validator("category", mode="before")
    @classmethod
    def _alias(cls, v: Any) -> Any:
        return _ALIASES.get(str(v).lower(), v)

    @field_validator("columns_to_compare_and_tolerance")
    @classmethod
    def _tolerances(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not v:
            raise ValueError("columns_to_compare_and_tolerance must name at least one column")
        for col, spec in v.items():
            parse_tolerance(spec)  # raises with a clear message
            if not col:
                raise ValueError("empty column name")
        return v

    @model_validator(mode="after")
    def _rows(self) -> Question:
        if self.reference_answer is not None:
            if not self.reference_answer:
                raise ValueError(f"{self.id}: reference_answer is empty")
            need = set(self.columns_to_compare_and_tolerance) | ({self.id_column} if self.id_column else set())
            for row in self.reference_answer:
                missing = need - set(row)
                if missing:
                    raise ValueError(f"{self.id}: reference row {row} lacks {sorted(missing)}")
            if self.id_column is None and len(self.reference_answer) > 1:
                raise ValueError(f"{self.id}: several reference rows need an id_column")
        return self

    def tolerances(self) -> dict[str, ToleranceSpec]:
        return {c: parse_tolerance(s) for c, s in self.columns_to_compare_and_tolerance.items()}

    def prompt(self) -> str:
        """The text given to the assistant."""
        parts = [self.question.strip()]
        if self.data_paths:
            parts.append("Data (paths relative to the data root): " + ", ".join(self.data_paths))
        if self.additional_instructions:
            parts.append(self.additional_instructions.strip())
        cols = ([self.id_column] if self.id_column else []) + [
            c for c in self.columns_to_compare_and_tolerance if c != self.id_column]
        shape = "a JSON list of objects (one per row)" if self.id_column else "a JSON object"
        parts.append(f"{self.output_instructions.strip()} Answer with {shape} with the keys "
                     f"{', '.join(cols)}, in a ```json fenced block at the end of your reply.")
        return "\n\n".join(parts)


def load_questions(paths: str | Path | list[str | Path] | None = None, *,
                   ids: list[str] | None = None, categories: list[str] | None = None) -> list[Question]:
    """Questions from JSON files (a list of questions, or ``{"questions": [...]}``) or folders of them.

    Default: the shipped set in ``evals/questions``. Duplicate ids are an error.
    """
    if paths is None:
        paths = [QUESTIONS_DIR]
    if isinstance(paths, str | Path):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no question file or folder at {p}")
    out: list[Question] = []
    seen: set[str] = set()
    for f in files:
        raw = json.loads(f.read_text(encoding="utf-8"))
        items = raw["questions"] if isinstance(raw, dict) else raw
        for item in items:
            q = Question.model_validate(item)
            if q.id in seen:
                raise ValueError(f"duplicate question id {q.id!r} in {f}")
            seen.add(q.id)
            out.append(q)
    if ids:
        want = set(ids)
        unknown = want - {q.id for q in out}
        if unknown:
            raise ValueError(f"unknown question ids: {sorted(unknown)}")
        out = [q for q in out if q.id in want]
    if categories:
        cats = {_ALIASES.get(c.lower(), c) for c in categories}
        out = [q for q in out if q.category in cats]
    return out
