"""Writing ``quality.py``'s results: quality.md (tables, the slow model against the student,
the targets with their verdicts), quality.png and quality.json, and splicing the long-video
section into them.

Imported as ``quality_report`` from ``benchmarks/quality.py``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from common import command_line, machine_facts, md_table, write_text
from quality_sets import SET_TITLES

# Issue 23's targets for the final report.
TARGETS = {
    "teacher_gap": 8.0,  # teacher − student R@1 >= +8 points (test split, generalisation set)
    "gain_kept": 0.90,  # student + rerank@20 keeps >= 90% of the teacher's gain over the student (test)
    "rerank_speedup": 10.0,  # rerank@20 >= 10x faster than the teacher over all videos, at 3,000 videos
    "speedup_videos": 3000,
    "distill_lift": 2.0,  # distilled − non-distilled student R@1 >= +2 (val and test)
    "direction": {"test": 90.0, "generalisation": 85.0},  # direction twins, student + rerank@20
    "reversed": {"test": 95.0, "generalisation": 90.0},  # reversed twins, student + rerank@20
    "general_r1": 75.0,  # student + rerank@20 R@1 on the generalisation set
    "general_drop": 10.0,  # ... and within 10 points of the test split
}
RERANK = "student + rerank@20"
TEACHER = "teacher (all videos)"
COLUMNS = ("R@1", "R@5", "R@10", "MdR", "MnR", "twin_reversed", "twin_direction", "twin_swap", "latency_ms")
LONG_COMMAND = "python benchmarks/quality.py --long"


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def with_interval(value: float | None, interval: list[float] | None, signed: bool = False) -> str:
    """``85.6 [83.1, 88.0]`` (or ``+0.9 [-0.3, +2.1]`` for a difference)."""
    if value is None:
        return "–"
    form = "{:+.1f}" if signed else "{:.1f}"
    text = form.format(value)
    return text if interval is None else f"{text} [{form.format(interval[0])}, {form.format(interval[1])}]"


def _cell(row: dict[str, Any], column: str) -> str:
    if column in ("R@1", "R@5", "R@10") and column in row:
        return with_interval(row[column], row.get(f"{column}_ci"))
    return _num(row.get(column))


# --------------------------------------------------------------------------- targets
def _get(results: dict, set_name: str, row: str, metric: str) -> float | None:
    value = results["sets"].get(set_name, {}).get("rows", {}).get(row, {}).get(metric)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _at_least(value: float | None, bound: float) -> bool | None:
    return None if value is None else value >= bound


def targets(results: dict) -> list[tuple[str, str, bool | None]]:
    """(claim, measured, holds) for each of issue 23's targets; holds is None where the
    quantity cannot be measured on this version or data (n/a)."""
    diffs, scaling, student = results["diffs"], results["scaling"], results["meta"]["shipped"]
    out: list[tuple[str, str, bool | None]] = []
    for set_name, where in (("test", "test split"), ("generalisation", "generalisation set")):
        gap = diffs.get(f"teacher_gap.{set_name}")
        out.append((f"Teacher − student R@1 ≥ +{TARGETS['teacher_gap']:g} ({where})",
                    with_interval(gap and gap["value"], gap and gap["ci"], signed=True),
                    _at_least(gap and gap["value"], TARGETS["teacher_gap"])))
    s, t, r = (_get(results, "test", row, "R@1") for row in (student, TEACHER, RERANK))
    share = (r - s) / (t - s) if None not in (s, t, r) and t > s else None
    out.append((f"Student + rerank@20 keeps ≥ {100 * TARGETS['gain_kept']:.0f}% of the teacher's gain over the "
                "student, (rerank@20 − student) / (teacher − student), test split",
                f"{100 * share:.1f}%" if share is not None else
                f"n/a (teacher − student = {_num(None if None in (s, t) else t - s)} points)",
                _at_least(share, TARGETS["gain_kept"])))
    size = TARGETS["speedup_videos"]
    big = scaling.get(size) or scaling.get(str(size))
    speed = big["teacher"] / max(big["rerank@20"], 1e-9) if big else None
    out.append((f"Rerank@20 ≥ {TARGETS['rerank_speedup']:g}× faster than the teacher over all videos, at "
                f"{size:,} videos", f"{speed:.1f}×" if speed else "n/a (size not measured)",
                _at_least(speed, TARGETS["rerank_speedup"])))
    val = results["val"]
    lift_val = (val["distilled"] - val["non_distilled"]) if None not in val.values() else None
    out.append((f"Distilled − non-distilled student R@1 ≥ +{TARGETS['distill_lift']:g} (val, from the manifest)",
                _num(lift_val) if lift_val is None else f"{lift_val:+.1f}",
                _at_least(lift_val, TARGETS["distill_lift"])))
    lift = diffs.get("distill_lift.test")
    out.append((f"Distilled − non-distilled student R@1 ≥ +{TARGETS['distill_lift']:g} (test split)",
                with_interval(lift and lift["value"], lift and lift["ci"], signed=True),
                _at_least(lift and lift["value"], TARGETS["distill_lift"])))
    for kind, name in (("direction", "Direction"), ("reversed", "Reversed")):
        for set_name, bound in TARGETS[kind].items():
            value = _get(results, set_name, RERANK, f"twin_{kind}")
            out.append((f"{name} twins, student + rerank@20 ≥ {bound:g}% ({set_name})",
                        f"{value:.1f}%" if value is not None else f"n/a (no {kind} twins)", _at_least(value, bound)))
    general, test = _get(results, "generalisation", RERANK, "R@1"), _get(results, "test", RERANK, "R@1")
    interval = results["sets"].get("generalisation", {}).get("rows", {}).get(RERANK, {}).get("R@1_ci")
    out.append((f"Student + rerank@20 R@1 ≥ {TARGETS['general_r1']:g} on the generalisation set",
                with_interval(general, interval), _at_least(general, TARGETS["general_r1"])))
    drop = None if None in (general, test) else test - general
    out.append((f"… and within {TARGETS['general_drop']:g} points of the test split (test − generalisation)",
                _num(drop), None if drop is None else drop <= TARGETS["general_drop"]))
    return out


# --------------------------------------------------------------------------- sections
def _cost_section(costs: dict) -> list[str]:
    """One table: what the slow model and the student each see, and what they cost."""
    student, teacher = costs["student"], costs["teacher"]
    t, d, g, w = costs["frames"], costs["embed_dim"], costs["region_cells"], costs["region_width"]
    spatial = g > 0
    slow_inputs = (f"{t} frame vectors + {g} region tokens ({w}-d) per frame + the query's text tokens"
                   if spatial else f"{t} frame vectors + the query's text tokens"
                   + (" (+ the head's video vector)" if costs["scorer_base"] == "head" else ""))
    bytes_ = costs["bytes"]
    plain = bytes_["float32"]["video"] + bytes_["float32"]["frames"]
    slow_bytes = ", ".join(f"{codec}: {plain + b['regions']:,}" for codec, b in bytes_.items()) if spatial \
        else f"{plain:,} (the same stored frames)"
    rows = [
        ["inputs", f"{t} frame vectors ({d}-d) → the head's video vector; the query's sentence vector", slow_inputs],
        ["frames", str(t), str(t)],
        ["input resolution (model.image_size)", str(costs["image_size"]), str(costs["image_size"])],
        ["tokens per pair", "– (two vectors: one dot product)", f"{teacher['tokens']} (CLS + text + frames"
                                                                   + (" + regions)" if spatial else ")")],
        ["cost per candidate (ms)", f"{student['ms_per_candidate']:.5f}", f"{teacher['ms_per_candidate']:.3f}"],
        ["cost per candidate (MFLOPs)", f"{student['mflops_per_candidate']:.4f}",
         f"{teacher['mflops_per_candidate']:.2f}"],
        ["bytes per point", f"{plain:,} (video vector + frames, float32)", slow_bytes],
    ]
    return (["## The slow model against the student", "",
             f"Scorer kind `{costs['scorer_kind']}`. Student cost: the query's vector against one stored video "
             f"vector (timed over the test split's corpus). Slow model: `benchmarks/regions.scorer_cost` at K = 20 "
             "(random unit inputs of the stored shapes; FLOPs by `torch.utils.flop_counter`). Bytes per point as "
             "in `benchmarks/regions.bytes_per_point`: the student needs the video vector (and the frames, for "
             "moments); the slow model adds the region tokens, per codec of the store.", ""]
            + md_table(["", "student (dual encoder)", f"slow model ({costs['scorer_kind']} scorer)"], rows) + [""])


def _sets_sections(results: dict) -> list[str]:
    lines = []
    for set_name, data in results["sets"].items():
        meta = results["meta"]["videos"][set_name]
        lines += [f"## {SET_TITLES[set_name]}", "",
                  f"{meta['videos']} videos, {meta['captions']} queries (every caption). R@k with a 95% bootstrap "
                  f"interval over queries ({results['meta']['bootstrap']} resamples, fixed seed).", ""]
        rows = data["rows"]
        lines += md_table(["", *COLUMNS], [[label] + [_cell(row, c) for c in COLUMNS] for label, row in rows.items()])
        lines += [""]
    return lines


def _moment_and_twin_sections(results: dict) -> list[str]:
    lines = ["## Best moment", "",
             "For each event phrase of each video (e.g. \"a red circle moves left\"), is the reported best "
             "frame inside that event's time window? `moment_rerank`: argmax of the teacher's frame relevance "
             "(what a re-ranked result returns); `moment_recall`: argmax of the phrase's cosine with each "
             "stored frame (what a result that was not re-ranked returns); `moment_afa`: argmax of the "
             "student's text-agnostic AFA weights (what FgT trains; no result reports it).", ""]
    columns = ("moment_rerank", "moment_recall", "moment_afa")
    lines += md_table(["set", *(f"{c} (%)" for c in columns)],
                      [[name, *(_num(d["moments"].get(c)) for c in columns)]
                       for name, d in results["sets"].items()]) + [""]
    lines += ["## Twins by relation", "",
              "% of (caption, twin) pairs where the captioned video outscores that twin, per exact relation "
              "(`swap:shape`: the twin differs in one event's shape; `direction`: one event plays backwards; "
              "`reversed+…`: both). Chance is 50.", ""]
    for set_name, data in results["sets"].items():
        breakdown = data["twins"]
        relations = sorted({r for rows in breakdown.values() for r in rows})
        lines += [f"{set_name}:", ""]
        lines += md_table(["", *relations], [[label] + [_num(rows.get(r)) for r in relations]
                                             for label, rows in breakdown.items()]) + [""]
    return lines


def _scaling_section(scaling: dict, bound) -> list[str]:
    if not scaling:
        return []
    lines = ["## Latency and corpus size", "",
             "Per query, in-process; corpora made by repeating the test split's frame features (latency "
             "depends on the number of videos, not on what they show).", ""]
    lines += md_table(["videos", "query text encode (ms)", "student recall (ms)", "recall + rerank@20 (ms)",
                       "teacher over all (ms)", "teacher / rerank@20", "bound"],
                      [[str(n), f"{v['text']:.1f}", f"{v['student']:.1f}", f"{v['rerank@20']:.1f}",
                        f"{v['teacher']:.1f}", f"{v['teacher'] / max(v['rerank@20'], 1e-9):.1f}×",
                        f"{bound(v):.1f}×"] for n, v in sorted(scaling.items(), key=lambda kv: int(kv[0]))])
    return lines + ["", "`bound`: teacher / (text encode + 20 × the teacher's time per video), the speed-up "
                        "re-ranking would reach if recall and the hand-off cost nothing. Both paths encode the query "
                        "once, so over few videos that fixed cost caps the ratio below videos / 20. The bound and the "
                        "ratio are timed separately (each the fastest of its calls), so a ratio can land above its "
                        "bound.", ""]


def _plot(out_dir: Path, results: dict, version: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(results["sets"])
    labels = list(results["sets"][sets[0]]["rows"])
    fig, ax = plt.subplots(figsize=(10, 3.8))
    x = np.arange(len(labels))
    width = 0.8 / len(sets)
    for i, set_name in enumerate(sets):
        rows = results["sets"][set_name]["rows"]
        values = np.array([rows[label]["R@1"] for label in labels])
        low, high = (np.array([rows[label]["R@1_ci"][end] for label in labels]) for end in (0, 1))
        errors = np.stack([values - low, high - values])
        ax.bar(x + (i - (len(sets) - 1) / 2) * width, values, width=width, yerr=errors, capsize=2, label=set_name)
    ax.set_xticks(x, labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("R@1 (%), 95% interval")
    ax.set_title(f"text→video R@1, model {version}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "quality.png", dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- files
def write_results(out_dir: Path, manifest, results: dict, bound) -> None:
    """quality.md, quality.png and quality.json; a long-video section measured on this same
    version is kept. ``bound``: the re-ranking speed-up bound of one latency row."""
    _plot(out_dir, results, manifest.version)
    meta = results["meta"]
    facts = machine_facts()
    lines = ["# Retrieval quality", "", f"Model `{manifest.version}` (frame encoder `{manifest.frame_encoder}`, "
             f"scorer `{results['costs']['scorer_kind']}`), command `{command_line()}`.", "",
             f"Machine: {facts.get('cpu_model', '?')}, {facts.get('cpu_count', '?')} cores; latencies are "
             "in-process, per query, on this CPU (the fastest of several calls): compare them as ratios.", "",
             f"Rows: meanP and seqTransf (dual encoders on the version's towers), the non-distilled student "
             f"({meta['baseline_source']}), the distilled student, the teacher over all videos (the version's "
             "scorer: the frozen teacher that taught), and the student's top K re-ranked by it (the serving "
             "fusion). Nothing here is tuned on the test split or the generalisation set.", ""]
    if meta.get("note"):
        lines += [f"**{meta['note']}**", ""]
    lines += ["## Targets", ""]
    lines += md_table(["target", "measured", "holds"],
                      [[c, m, "n/a" if ok is None else ("yes" if ok else "**no**")] for c, m, ok in targets(results)])
    lines += ["", "Differences carry a paired 95% bootstrap interval (both rows on the same resampled queries).", ""]
    lines += _sets_sections(results)
    lines += _cost_section(results["costs"])
    lines += _moment_and_twin_sections(results)
    lines += _scaling_section(results["scaling"], bound)
    lines += ["![R@1](quality.png)", "",
              "twin_reversed / twin_direction / twin_swap: % of (caption, twin) pairs where the captioned video "
              "outscores its reversed-order / one-event-backwards / one-attribute-swapped twin. meanP sees the same "
              "frames in any order, so on reversed twins it can only tie or guess.", ""]
    kept = _kept_long_section(out_dir, manifest.version)
    write_text(out_dir / "quality.md", lines)
    (out_dir / "quality.json").write_text(json.dumps(results, indent=2))
    if kept is not None:
        splice_long(out_dir, kept)
    print("\n".join(lines))


def splice_long(out_dir: Path, long: dict) -> list[str]:
    """Put the long-video results into quality.md (its marked section) and quality.json."""
    from quality_long import section_lines, splice_section

    markdown, data = out_dir / "quality.md", out_dir / "quality.json"
    section = section_lines(long, md_table, long.get("command", LONG_COMMAND))
    text = markdown.read_text() if markdown.is_file() else "# Retrieval quality\n"
    markdown.write_text(splice_section(text, section))
    stored = json.loads(data.read_text()) if data.is_file() else {}
    data.write_text(json.dumps({**stored, "long": long}, indent=2))
    return section


def _kept_long_section(out_dir: Path, version: str) -> dict | None:
    """The stored long-video results, when they were measured on this same model version.

    A run without ``--long`` rewrites the short-video tables only; the long section of
    an earlier ``--long`` run stays, unless it describes another model.
    """
    path = out_dir / "quality.json"
    if not path.is_file():
        return None
    long = json.loads(path.read_text()).get("long")
    return long if isinstance(long, dict) and long.get("version") == version else None
