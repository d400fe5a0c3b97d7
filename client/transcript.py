"""Run records: an append-only JSONL transcript (one event per line, figures saved as files) and a
readable report (Markdown and self-contained HTML) with the figures the tools returned.

Secrets never reach disk: every string written is scrubbed of the values of known key variables
(``ANTHROPIC_API_KEY``, ``OPENAI_API_KEY``, and any ``*_API_KEY`` / ``*_TOKEN`` in the environment).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from servers.common.atomic import atomic_write_text

EventSink = Callable[[str, dict[str, Any]], None]
_SECRET_ENV = re.compile(r"(API_KEY|_TOKEN|_SECRET)$")


def secret_values() -> list[str]:
    vals = [v for k, v in os.environ.items() if _SECRET_ENV.search(k) and v and len(v) >= 8]
    return sorted(set(vals), key=len, reverse=True)


def redact(obj: Any, secrets: list[str]) -> Any:
    if not secrets:
        return obj
    if isinstance(obj, str):
        for s in secrets:
            if s in obj:
                obj = obj.replace(s, "[REDACTED]")
        return obj
    if isinstance(obj, list):
        return [redact(x, secrets) for x in obj]
    if isinstance(obj, dict):
        return {k: redact(v, secrets) for k, v in obj.items()}
    return obj


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


class Transcript:
    """Collects the events of one run; writes ``transcript.jsonl`` as it goes and the reports at
    the end. ``forward`` receives every event too (for live progress)."""

    def __init__(self, out_dir: str | os.PathLike, *, forward: EventSink | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.fig_dir = self.out_dir / "figures"
        self.path = self.out_dir / "transcript.jsonl"
        self.path.write_text("", encoding="utf-8")
        self.events: list[dict[str, Any]] = []
        self.forward = forward
        self._secrets = secret_values()
        self._n_fig = 0

    def save_images(self, images: list[bytes], types: list[str], label: str) -> list[str]:
        """Save figures under ``figures/``; returns paths relative to the run folder."""
        rels = []
        for i, data in enumerate(images):
            mime = types[i] if i < len(types) else "image/png"
            ext = {"image/jpeg": "jpg", "image/gif": "gif", "image/webp": "webp"}.get(mime, "png")
            self._n_fig += 1
            self.fig_dir.mkdir(exist_ok=True)
            name = f"{self._n_fig:03d}_{re.sub(r'[^A-Za-z0-9_-]', '_', label)[:40]}.{ext}"
            tmp = self.fig_dir / (name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(self.fig_dir / name)
            rels.append(f"figures/{name}")
        return rels

    def event(self, kind: str, **data: Any) -> dict[str, Any]:
        rec = redact({"t": _now(), "type": kind, **data}, self._secrets)
        self.events.append(rec)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        if self.forward is not None:
            try:
                self.forward(kind, rec)
            except Exception:  # noqa: BLE001 - a display problem must not stop the run
                pass
        return rec

    # -- reports ---------------------------------------------------------------------------------
    def write_reports(self) -> tuple[Path, Path]:
        md = render_markdown(self.events)
        html_text = render_html(self.events, self.out_dir)
        md_path, html_path = self.out_dir / "report.md", self.out_dir / "report.html"
        atomic_write_text(md_path, redact(md, self._secrets))
        atomic_write_text(html_path, redact(html_text, self._secrets))
        return md_path, html_path


def load_transcript(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _short(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else text[:n] + f"\n… [{len(text) - n} more characters]"


def _fmt_args(args: Any) -> str:
    return args if isinstance(args, str) else json.dumps(args, indent=2, default=str)


def _answer_str(a: Any) -> str:
    return a if isinstance(a, str) else json.dumps(a, indent=2, default=str)


def _end_and_figures(events: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
    end = next((e for e in events if e["type"] == "run_end"), None)
    figs = [(e["name"], p) for e in events if e["type"] == "tool_result" for p in e.get("figures", [])]
    return end, figs


def _summary_markdown(events: list[dict[str, Any]]) -> list[str]:
    """Answer and figures first, so a reader need not scroll through every step."""
    end, figs = _end_and_figures(events)
    out: list[str] = []
    if end is not None and end.get("answer") is not None:
        out += ["## Answer (details at the end)", "", "```", _answer_str(end.get("answer")), "```", ""]
    if figs:
        out += ["## Figures", ""] + [f"![{name}]({p})" for name, p in figs] + [""]
    return out


def _summary_html(events: list[dict[str, Any]], out_dir: Path) -> list[str]:
    end, figs = _end_and_figures(events)
    out: list[str] = []
    if end is not None and end.get("answer") is not None:
        out += ["<h2>Answer</h2>", f"<pre class=answer>{html.escape(_answer_str(end.get('answer')))}</pre>"]
    thumbs = []
    for name, rel in figs:
        p = out_dir / rel
        if p.is_file():
            mime = "image/jpeg" if p.suffix == ".jpg" else f"image/{p.suffix.lstrip('.')}"
            data = base64.b64encode(p.read_bytes()).decode("ascii")
            thumbs.append(f"<figure><img alt='{html.escape(rel)}' src='data:{mime};base64,{data}'>"
                          f"<figcaption>{html.escape(name)}</figcaption></figure>")
    if thumbs:
        out += ["<h2>Figures</h2>", f"<div class=gallery>{''.join(thumbs)}</div>", "<h2>Steps</h2>"]
    return out


def render_markdown(events: list[dict[str, Any]]) -> str:
    """The run as Markdown: question, settings, each step (text, calls, results, figures), answer, usage."""
    lines: list[str] = []
    for e in events:
        t = e["type"]
        if t == "run_start":
            lines += ["# cytoagent run", "", f"**Question:** {e['question']}", "",
                      f"- provider: `{e.get('provider')}` · model: `{e.get('model')}` · mode: `{e.get('mode')}`",
                      f"- servers: {', '.join(e.get('servers') or [])}",
                      f"- data root: `{e.get('data_root')}` · workspace: `{e.get('workspace')}`",
                      f"- started: {e['t']}", ""]
            lines += _summary_markdown(events)
        elif t == "system":
            lines += ["<details><summary>System prompt</summary>", "", "```", e["text"], "```", "", "</details>", ""]
        elif t == "step":
            lines += [f"## Step {e['step']}", ""]
        elif t == "model":
            if e.get("text", "").strip():
                lines += ["**Assistant:**", "", e["text"].strip(), ""]
        elif t == "tool_call":
            lines += [f"**Tool call** `{e['name']}`", "", "```json", _fmt_args(e.get("arguments")), "```", ""]
        elif t == "code":
            lines += ["**Code**", "", "```python", e["code"], "```", ""]
        elif t == "tool_result":
            flag = " — ERROR" if e.get("is_error") else ""
            lines += [f"**Result** `{e['name']}`{flag} ({e.get('duration_s', 0):.2f} s)", "", "```",
                      _short(e.get("text") or ""), "```", ""]
            lines += [f"![{e['name']}]({p})" for p in e.get("figures", [])]
            if e.get("figures"):
                lines.append("")
        elif t == "notice":
            lines += [f"> {e['text']}", ""]
        elif t == "error":
            lines += [f"**Error:** {e['text']}", ""]
        elif t == "run_end":
            lines += ["## Answer", "", "```", _answer_str(e.get("answer")), "```", "",
                      f"- status: {e.get('stop_reason')} · steps: {e.get('steps')} · tool calls: "
                      f"{e.get('tool_calls')} · time: {e.get('duration_s', 0):.1f} s"]
            u = e.get("usage") or {}
            cost = u.get("cost_usd")
            lines += [f"- tokens: {u.get('input_tokens', 0)} in / {u.get('output_tokens', 0)} out · requests: "
                      f"{u.get('requests', 0)} · retries: {u.get('retries', 0)} · cost: "
                      + (f"${cost:.4f}" if isinstance(cost, (int, float)) else "unknown (no price for this model)"),
                      ""]
            if e.get("error"):
                lines += [f"- error: {e['error']}", ""]
    return "\n".join(lines) + "\n"


def render_html(events: list[dict[str, Any]], out_dir: Path) -> str:
    """The run as one self-contained HTML page (figures inlined as data URIs)."""
    esc = html.escape
    body: list[str] = []
    for e in events:
        t = e["type"]
        if t == "run_start":
            body += ["<h1>cytoagent run</h1>", f"<p class=q><b>Question:</b> {esc(e['question'])}</p>",
                     f"<p class=meta>provider <code>{esc(str(e.get('provider')))}</code> · model "
                     f"<code>{esc(str(e.get('model')))}</code> · mode <code>{esc(str(e.get('mode')))}</code> · "
                     f"servers {esc(', '.join(e.get('servers') or []))}<br>data root <code>"
                     f"{esc(str(e.get('data_root')))}</code> · workspace <code>{esc(str(e.get('workspace')))}"
                     f"</code> · started {esc(e['t'])}</p>"]
            body += _summary_html(events, out_dir)
        elif t == "system":
            body.append(f"<details><summary>System prompt</summary><pre>{esc(e['text'])}</pre></details>")
        elif t == "step":
            body.append(f"<h2>Step {e['step']}</h2>")
        elif t == "model" and e.get("text", "").strip():
            body.append(f"<div class=assistant>{esc(e['text'].strip())}</div>")
        elif t == "tool_call":
            body.append(f"<div class=call><b>Tool call</b> <code>{esc(e['name'])}</code>"
                        f"<pre>{esc(_fmt_args(e.get('arguments')))}</pre></div>")
        elif t == "code":
            body.append(f"<div class=call><b>Code</b><pre>{esc(e['code'])}</pre></div>")
        elif t == "tool_result":
            cls = "result error" if e.get("is_error") else "result"
            figs = []
            for rel in e.get("figures", []):
                p = out_dir / rel
                if p.is_file():
                    mime = "image/jpeg" if p.suffix == ".jpg" else f"image/{p.suffix.lstrip('.')}"
                    data = base64.b64encode(p.read_bytes()).decode("ascii")
                    figs.append(f"<img alt='{esc(rel)}' src='data:{mime};base64,{data}'>")
            body.append(f"<div class='{cls}'><b>Result</b> <code>{esc(e['name'])}</code> "
                        f"({e.get('duration_s', 0):.2f} s){' — ERROR' if e.get('is_error') else ''}"
                        f"<pre>{esc(_short(e.get('text') or ''))}</pre>{''.join(figs)}</div>")
        elif t == "notice":
            body.append(f"<div class=notice>{esc(e['text'])}</div>")
        elif t == "error":
            body.append(f"<div class='result error'><b>Error:</b> {esc(e['text'])}</div>")
        elif t == "run_end":
            u = e.get("usage") or {}
            cost = u.get("cost_usd")
            body += ["<h2>Answer</h2>", f"<pre class=answer>{esc(_answer_str(e.get('answer')))}</pre>",
                     f"<p class=meta>status {esc(str(e.get('stop_reason')))} · steps {e.get('steps')} · tool calls "
                     f"{e.get('tool_calls')} · {e.get('duration_s', 0):.1f} s · tokens {u.get('input_tokens', 0)} in / "
                     f"{u.get('output_tokens', 0)} out · cost "
                     + (f"${cost:.4f}" if isinstance(cost, (int, float)) else "unknown") + "</p>"]
            if e.get("error"):
                body.append(f"<p class=error>{esc(e['error'])}</p>")
    style = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
             "pre{background:#f6f6f6;padding:.6rem;overflow-x:auto;white-space:pre-wrap}"
             ".assistant{border-left:3px solid #69c;padding-left:.7rem;white-space:pre-wrap}"
             ".call,.result{margin:.6rem 0}.error{color:#a00}.error pre{background:#fdecec}"
             ".notice{background:#fff6d6;padding:.4rem}.meta{color:#666;font-size:.9em}"
             "img{max-width:100%;border:1px solid #ddd;margin:.3rem 0}.answer{background:#eef8ee}"
             ".gallery{display:flex;flex-wrap:wrap;gap:.6rem}.gallery figure{margin:0;width:18rem}"
             ".gallery img{height:12rem;width:100%;object-fit:contain;background:#fafafa}"
             "figcaption{font-size:.8em;color:#555}.q{white-space:pre-wrap}")
    return ("<!doctype html><html><head><meta charset=utf-8><title>cytoagent run</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
