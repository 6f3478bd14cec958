"""The findings table of README.md and docs/evidence.md, regenerated from ``benchmarks/results/fidelity.json``.

The table sits between the markers ``<!-- fidelity:begin -->`` and ``<!-- fidelity:end -->``; everything between them
is rewritten, nothing else. ``python benchmarks/bench_fidelity.py --table`` runs it without training anything.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

BEGIN, END = "<!-- fidelity:begin -->", "<!-- fidelity:end -->"


def _ci(row: dict) -> str:
    def f(x):
        return "–" if x is None else f"{x:+.3f}".replace("-", "−")

    return f"{f(row['effect'])} [{f(row['ci_low'])}, {f(row['ci_high'])}]"


def _p(p) -> str:
    return "–" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"


def _view(row: dict) -> str:
    a, b = row["arm_view"], row["baseline_view"]
    return a if a == b else f"{a} vs {b}"


def summary_line(payload: dict) -> str:
    count = Counter(r["verdict"] for r in payload["findings"])
    commits = payload["commit"] if isinstance(payload["commit"], list) else [payload["commit"]]
    trained = ", ".join(str(c)[:7] for c in commits)
    return (
        f"{len(payload['findings'])} findings from {len(payload['seeds'])} seeds (runs trained at {trained}; "
        f"statistics at {str(payload.get('report_commit'))[:7]}): "
        f"**{count['holds']} hold, {count['cannot tell']} cannot tell, {count['contradicts']} contradict** "
        f"({payload['correction']})."
    )


def study_table(payload: dict) -> str:
    """Verdicts per study (the README's table)."""
    lines = ["| study | findings | hold | cannot tell | contradict |", "|---|---|---|---|---|"]
    for study in dict.fromkeys(r["study"] for r in payload["findings"]):
        c = Counter(r["verdict"] for r in payload["findings"] if r["study"] == study)
        lines.append(f"| {study} | {sum(c.values())} | {c['holds']} | {c['cannot tell']} | {c['contradicts']} |")
    return "\n".join(lines)


def markdown(payload: dict, ablations: bool = True) -> str:
    """The findings (and ablations) of a fidelity.json payload as markdown tables."""
    lines = [summary_line(payload), ""]
    lines += [
        "| study | finding | view | metric | effect [95% interval] | Holm p | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in payload["findings"]:
        study = r["study"].split(" (")[0]
        lines.append(
            f"| {study} | {r['name']} | {_view(r)} | {r['metric']} | {_ci(r)} | {_p(r['p_holm'])} | {r['verdict']} |"
        )
    if ablations and payload.get("ablations"):
        lines += ["", "| ablation (tests) | view | metric | effect [95% interval] | Holm p | verdict |"]
        lines += ["|---|---|---|---|---|---|"]
        for r in payload["ablations"]:
            lines.append(
                f"| {r['name']} ({r['tests']}) | {_view(r)} | {r['metric']} | {_ci(r)} | {_p(r['p_holm'])} | "
                f"{r['verdict']} |"
            )
    return "\n".join(lines)


def rewrite(path: Path, block: str) -> bool:
    """Replace the text between the markers in ``path``; False when the file has no markers."""
    text = path.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        return False
    path.write_text(pattern.sub(lambda _: f"{BEGIN}\n{block}\n{END}", text, count=1))
    return True


def regenerate(result: Path, readme: Path, evidence_page: Path) -> list[str]:
    """Rewrite the README's summary and the evidence page's full tables from ``result``; the files rewritten."""
    payload = json.loads(result.read_text())
    done = []
    link = evidence_page.relative_to(readme.parent)
    summary = f"{summary_line(payload)} Every finding: [{link}]({link}#the-papers-findings-measured)."
    if rewrite(readme, summary + "\n\n" + study_table(payload)):
        done.append(str(readme))
    if rewrite(evidence_page, markdown(payload)):
        done.append(str(evidence_page))
    return done
