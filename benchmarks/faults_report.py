"""The page, plot and console summary of benchmarks/faults.py (imported as ``faults_report``)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import common

TARGETS = {
    "restart": ("stack stopped (SIGTERM) or SIGKILLed with N messages published but not yet ingested, then "
                "started again", "N of N ingested, 0 duplicates; DLQ records and offsets survive"),
    "reranker": ("reranker replica SIGKILL under search load (4 gRPC clients)",
                 "0 failed; p99 during the outage <= 2x p99 before; re-ranking back within 30 s"),
    "store": ("store actor SIGKILL during ingest and search",
              "0 acknowledged writes lost; searches fail with UNAVAILABLE (never INTERNAL) until it is back"),
    "worker_loop": ("ingest worker SIGKILL loop during ingest", "0 lost, 0 duplicated, lag back to 0"),
    "alias_flip": ("alias flip (re-index to a new model version) during search",
                   "0 failed, 0 responses that mix versions"),
    "training": ("a training worker SIGKILLed mid-stage (2 Ray Train workers, tiny config)",
                 "the run resumes by itself and ends with the weights of an uninterrupted run of the same config"),
}
REPORT_ORDER = ("restart", "reranker", "store", "worker_loop", "alias_flip", "training")


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if value != value else f"{value:.{digits}f}"
    return str(value)


def ratios(result: dict[str, Any]) -> tuple[str, str, str, str]:
    w = result.get("windows")
    if not w:
        return "-", "-", "-", "-"
    return (fmt(w["qps_during_before"]), fmt(w["qps_after_before"]), fmt(w["p99_during_before"]),
            fmt(w["p99_after_before"]))


def table_rows(out: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name in REPORT_ORDER:
        fault, target = TARGETS[name]
        result = out["faults"].get(name)
        if result is None:
            why = out["errors"].get(name, "not run (--only)")
            rows.append([fault, target, *["-"] * 10, f"**not measured**: {why[:200]}"])
            continue
        q_d, q_a, p_d, p_a = ratios(result)
        rows.append([fault, target, fmt(result.get("sent")), fmt(result.get("failed")), fmt(result.get("degraded")),
                     fmt(result.get("lost")), fmt(result.get("duplicated")), fmt(result.get("recover_s"), 1),
                     q_d, q_a, p_d, p_a, common.verdict(result["target"])])
    return rows


def window_table(result: dict[str, Any]) -> list[str]:
    w = result.get("windows")
    if not w:
        return []
    rows = []
    for key in ("before", "during", "after"):
        x = w[key]
        rows.append([key, f"{x['end'] - x['start']:.1f}", x["sent"], x["ok"], x["failed"], x["degraded"],
                     fmt(x["qps"]), fmt(x["p50_ms"], 1), fmt(x["p99_ms"], 1),
                     ", ".join(f"{k} {v}" for k, v in sorted(x["codes"].items())) or "-",
                     ", ".join(f"{k} {v}" for k, v in sorted(x["skipped"].items())) or "-"])
    return common.md_table(["window", "s", "sent", "answered", "failed", "recall-only", "answers/s", "p50 ms",
                            "p99 ms", "codes", "why recall-only"], rows)


def ingest_line(result: dict[str, Any]) -> str | None:
    ing = result.get("ingest")
    if not ing:
        return None
    return (f"- ingestion (videos committed per second): before {fmt(ing['before_per_s'])}, during "
            f"{fmt(ing['during_per_s'])}, after {fmt(ing['after_per_s'])}; during/before "
            f"{fmt(ing['during_before'])}, after/before {fmt(ing['after_before'])}")


def slowest(result: dict[str, Any]) -> str | None:
    rows = (result.get("timeline") or {}).get("slowest_during")
    if not rows:
        return None
    def outcome(row: dict[str, Any]) -> str:
        return "re-ranked" if row["reranked"] else f"recall-only: {row['skipped']}"

    return "- slowest answers during: " + "; ".join(
        f"{r['ms']:.0f} ms at +{r['at_s']:.1f} s ({outcome(r)})" for r in rows)


def details(name: str, r: dict[str, Any], out: dict[str, Any]) -> list[str]:
    """The numbers behind one row, and plainly why a check failed."""
    lines = [f"### {TARGETS[name][0]}", ""]
    checks = r["checks"]
    lines.append("- checks: " + "; ".join(f"{k}: {'yes' if v else '**no**'}" for k, v in checks.items()))
    if name == "reranker":
        lines.append(f"- killed replica pid(s) {r['killed']}; replica afterwards {r['new_replica']}; Serve's "
                     f"controller marked it dead {fmt(r.get('controller_noticed_s'), 1)} s after the kill; re-ranked "
                     f"answers again {fmt(r['recover_s'], 1)} s after the kill")
    elif name == "alias_flip":
        lines.append(f"- `vidsearch reindex --version {r['version']}` exited {r['reindex_exit']} after "
                     f"{r['reindex_s']:.1f} s; first answer from the new version "
                     f"{fmt(r['first_new_after_reindex_start_s'], 1)}"
                     f" s after the re-index started; answers still from the old version after the command returned: "
                     f"{r['old_version_answers_after_reindex']}; responses mixing versions: {r['mixed']}")
    elif name == "store":
        lines.append(f"- killed store actor pid(s) {r['killed']}, new actor {r['new_actor']}; {r['videos']} videos "
                     f"in this phase, the last {r.get('in_flight_at_kill', '-')} published right before the kill; "
                     f"{r['acknowledged_at_kill']} videos acknowledged (offset committed, every phase so far) at the "
                     f"kill, {r['lost']} of those missing afterwards; {r['missing_at_end']} of this phase's "
                     f"{r['videos']} missing at the end; {fmt(r.get('points'))} points for the videos ingested; "
                     f"searches answered again {fmt(r['recover_s'], 1)} s after the kill, backlog drained "
                     f"{fmt(r['drained_after_kill_s'], 1)} s after it")
        lines.append(f"- failed searches by code: {r['failure_codes'] or 'none'}"
                     + (f"; details: {' | '.join(r['failure_details'])}" if r["failure_details"] else ""))
    elif name == "worker_loop":
        lines.append(f"- {r['kills']} SIGKILLs at +{', +'.join(str(t) for t in r['kill_times_s'])} s; {r['videos']} "
                     f"videos; {r['lost']} missing; {r['points']} points for {r['expected_points']} videos "
                     f"(duplicated {fmt(r['duplicated'])}); at least {r['reprocessed_at_least']} messages processed "
                     f"again after a kill (at least once: the redelivered batches overwrite the same points); lag "
                     f"{r['lag_end']} {fmt(r['recover_s'], 1)} s after the last kill")
    elif name == "restart":
        a, b = r["variants"]["sigterm"], r["variants"]["sigkill"]
        lines.append(f"- SIGTERM: {a['published']} published with no worker, stack stopped (exit {a['stop_exit']}, "
                     f"{a['stop_s']:.1f} s), started again: lag {a['lag_after_restart']} (of {a['published']}), "
                     f"DLQ {a['dlq_after_restart']}, committed offsets unchanged: {a['offsets_survived']}")
        lines.append(f"- SIGKILL of the whole process group: {b['published']} more published, killed, started "
                     f"again with the worker: records survived {b['records_survived']}, DLQ {b['dlq_after_restart']}"
                     f" (before: {r['dlq_before']}), processes that outlived the kill {b['processes_left']}")
        if "watermark_lag_before_kill" in b:
            lines.append(f"- before the SIGKILL, {b['pending_before_kill']} messages were pending, but the broker's "
                         f"own high watermarks put the lag at {b['watermark_lag_before_kill']}: Tansu answers ListOffsets "
                         "with its last record batch's base offset + 1, so a batched produce reads short. `vidsearch "
                         "status` computed its lag and DLQ count from those watermarks; it now reads the last batch "
                         "back (`vidsearch.kafka_offsets`), and this benchmark counts the records themselves")
        lines.append(f"- after the last start: {r['ingested']} of {r['pending']} ingested, the worker processed "
                     f"{r['pending'] + r['reprocessed']} messages ({r['reprocessed']:+d} against the pending ones), "
                     f"{r['points']} points for {r['expected_points']} videos; ingested {fmt(r['recover_s'], 1)} s "
                     f"after the start command ({fmt(r['ingest_after_up_s'], 1)} s after the stack was up; stack "
                     f"starts took {', '.join(f'{s:.0f}' for s in r['up_s'])} s); ingestion "
                     f"{fmt(r['ingest_rate_after_per_s'])} videos/s against {fmt(out['baseline']['rate_per_s'])} in "
                     f"the baseline ({fmt(r['ingest_rate_after_per_s'] / out['baseline']['rate_per_s'])}x)")
    elif name == "training":
        kill = r["kill"]
        restored = ", ".join(
            (f"Ray Train's, {x['ray_steps']} steps in" if x["source"] == "ray" else
             f"the run directory's own kept: {x['run_dir_steps']} steps in against Ray Train's {x['ray_steps']}")
            for x in r["restores"]) or "-"
        lines.append(f"- rank {kill['rank']} of {r['workers']} (pid {r['killed_pid']}) SIGKILLed itself before step "
                     f"{kill['after_steps'] + 1} of the {kill['stage']} stage (`scaling.fault_injection`, "
                     f"`max_failures: 1`); restarts by Ray Train that found a checkpoint: {len(r['restores'])} "
                     f"(checkpoint used: {restored}); the restarted rank 0 restored it {fmt(r['recover_s'], 1)} s "
                     f"after the kill; run finished: "
                     f"{'yes' if r['finished'] else 'no'}; steps per stage {r['steps']}")
        lines.append(f"- final weights against the uninterrupted run: {r['tensors']} tensors, {r['n_differ']} differ "
                     f"(`torch.equal`){'; e.g. ' + ', '.join(r['tensors_differ']) if r['n_differ'] else ''}; "
                     f"per-step losses equal: {'yes' if r['losses_equal'] else 'no'}; wall time "
                     f"{r['clean_s']:.0f} s uninterrupted, {r['killed_s']:.0f} s with the kill")
    for extra in (ingest_line(r), slowest(r)):
        if extra:
            lines.append(extra)
    lines += ["", *window_table(r), ""]
    missed = [k for k, v in checks.items() if not v]
    if missed:
        lines += ["**Why the target is missed (measured):**", "", *why(name, r, missed), ""]
    return lines


def why(name: str, r: dict[str, Any], missed: list[str]) -> list[str]:
    out = []
    w = r.get("windows") or {}
    for check in missed:
        if "p99" in check:
            b, d = w["before"], w["during"]
            slow, early = r.get("slow_during", 0), r.get("slow_before_noticed", 0)
            slow_ms = ", ".join(str(ms) for ms in r.get("slow_ms", []))
            reasons = ", ".join(r.get("slow_reasons", [])) or "-"
            slowest_rows = (r.get("timeline") or {}).get("slowest_during") or []
            top = "; ".join(f"{x['ms']:.0f} ms at +{x['at_s']:.1f} s ("
                            + ("re-ranked" if x["reranked"] else f"recall-only: {x['skipped']}") + ")"
                            for x in slowest_rows[:3]) or "-"
            out.append(
                f"- {check}: p99 was {fmt(b['p99_ms'], 1)} ms before and {fmt(d['p99_ms'], 1)} ms during "
                f"({fmt(w['p99_during_before'])}x) over {d['ok']} answers; with so few answers the p99 is about the "
                f"slowest one or two. Slowest answers of the outage: {top}. {slow} took 1 s or more ({slow_ms or '-'} "
                f"ms; why not re-ranked: {reasons}), {early} of them sent before Serve's controller noticed the dead "
                f"replica ({fmt(r.get('controller_noticed_s'), 1)} s after the kill). The searches in flight at the "
                "kill wait for their reranker call until the adaptive timeout (`serve.rerank_breaker_timeout_multiplier`"
                " x the slowest of the recent answers, at least `serve.rerank_breaker_timeout_floor_s`), the first "
                "such timeout opens the breaker and releases the others; the probes run in the background.")
        elif "back" in check:
            out.append(f"- {check}: re-ranked answers came back after {fmt(r.get('recover_s'), 1)} s "
                       f"(no answer re-ranked again: {r.get('recover_s') is None}).")
        elif "failed" in check:
            out.append(f"- {check}: {r['failed']} of {r['sent']} requests failed: {r['failure_codes']}.")
        elif "UNAVAILABLE" in check:
            out.append(f"- {check}: failure codes {r['failure_codes']}; details: {' | '.join(r['failure_details'])}.")
        else:
            counted = ", ".join(f"{k}={r.get(k)}" for k in ("lost", "duplicated", "reprocessed") if k in r)
            out.append(f"- {check}: see the numbers above ({counted}).")
    return out


def write_markdown(path: Path, png_name: str, args: argparse.Namespace, out: dict[str, Any], facts: dict[str, Any],
                   load_after: tuple[float, float]) -> None:
    plan = out["plan"]
    base = out.get("baseline") or {}
    lines = [
        "# Fault injection benchmark",
        "",
        f"Generated by `{common.command_line()}` (see `benchmarks/faults.py`). Re-run it to refresh this page.",
        "",
        *(["**Quick mode** (`--quick`): a smoke test with a few dozen videos and short windows; the ratios are "
           "noisy. Use the default run for numbers.", ""] if args.quick else []),
        "## What is measured",
        "- The real embedded stack: `vidsearch up` on 127.0.0.1 (durable Tansu broker, embedded Qdrant store actor, "
        "local Ray, the stack's ingest worker, the Serve ingress and reranker), the `tiny` preset untrained "
        "(`model.use_shipped=false`), synthetic 64x64 px 3 s videos written by `vidsearch synth`.",
        f"- Search load: {plan['clients']} gRPC clients, each with its own channel, each sending at most "
        f"{plan['rate']:g} searches/s (re-ranking on, top_k 5, deadline {plan['deadline_s']:g} s): a bounded load, "
        "not a saturating one, so the latency shows the fault, not a queue.",
        f"- Windows: *before* is the {plan['window_s']:g} s before the fault, *during* from the fault until the "
        f"service recovered (the first of {8} consecutive good answers: re-ranked for the reranker, answered for "
        f"the store, the new version for the flip; until the backlog is drained for the worker loop), *after* the "
        f"{plan['window_s']:g} s after that. Ratios: answers/s and p99 of answered requests, during/before and "
        "after/before.",
        "- sent / failed: search requests (for the restart: messages published / not ingested); degraded: answered "
        "recall-only although re-ranking was asked for; lost: videos acknowledged (offset committed) or published "
        "and missing from the live index afterwards (checked by `GetVideo` for each); duplicated: points beyond one "
        "per video (`vidsearch status` points against the distinct videos ingested) and, for the restart, messages "
        "processed more than once (the worker's upsert counter).",
        "- Training (no stack, its own process and local Ray, after the stack's faults): two runs of one tiny config "
        "(`tiny-afa`, 2 CPU Ray Train workers, 4 + 6 + 2 steps, a checkpoint every 2 steps), one uninterrupted and "
        "one whose rank 1 SIGKILLs itself mid-stage (`scaling.fault_injection`, `max_failures: 1`); recover s: from "
        "the kill to the restarted run's restore of the Ray Train checkpoint; failed: 1 if the run did not finish; "
        "weights compared tensor by tensor with `torch.equal`.",
        "",
        "## Setup",
        *common.md_table(["setting", "value"], [
            ("videos", f"{plan['baseline']} baseline + {plan['store_videos']} (store fault) + {plan['loop_videos']} "
                       f"(worker loop) + 2 x {plan['restart_videos']} (restart) = "
                       f"{plan['baseline'] + plan['store_videos'] + plan['loop_videos'] + 2 * plan['restart_videos']}"),
            ("bad messages (DLQ)", plan["bad_messages"]),
            ("worker SIGKILLs in the loop", plan["loop_kills"]),
            ("first `vidsearch up` until its state file", f"{fmt(out.get('first_up_s'), 1)} s"),
            ("baseline ingestion", f"{base.get('videos', '-')} videos in {fmt(base.get('seconds'), 1)} s "
                                   f"({fmt(base.get('rate_per_s'))} videos/s), DLQ records {base.get('dlq', '-')}"),
            ("whole run", f"{out['seconds'] / 60:.1f} min"),
        ]),
        "",
        "## Machine",
        *common.machine_section(facts, load_after),
        "",
        "## Results",
        *common.md_table(["fault", "target", "sent", "failed", "degraded", "lost", "duplicated", "recover s",
                          "answers/s during/before", "after/before", "p99 during/before", "after/before",
                          "target holds"], table_rows(out)),
        "",
    ]
    for name in REPORT_ORDER:
        if name in out["faults"]:
            lines += details(name, out["faults"][name], out)
        elif name in out["errors"]:
            lines += [f"### {TARGETS[name][0]}", "",
                      f"Not measured: the fault raised `{out['errors'][name][:1500]}`", ""]
    lines += [f"![fault injection benchmark]({png_name})"]
    common.write_text(path, lines)


def plot(path: Path, out: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("reranker", "alias_flip", "store", "worker_loop") if n in out["faults"]]
    loop = out["faults"].get("worker_loop")
    panels = max(1, len(names) + ("restart" in out["faults"]) + (loop is not None))
    cols = min(3, panels)
    rows = (panels + cols - 1) // cols
    fig, grid = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[panels:]:
        ax.set_visible(False)
    for ax, name in zip(axes, names):
        tl = out["faults"][name]["timeline"]
        groups = {"re-ranked": ([], [], "#55a868"), "recall-only": ([], [], "#dd8452"), "failed": ([], [], "#c44e52")}
        for t, ms, code, reranked, _skipped in tl["samples"]:
            key = "failed" if code != "OK" else ("re-ranked" if reranked else "recall-only")
            groups[key][0].append(t)
            groups[key][1].append(ms)
        for label, (xs, ys, colour) in groups.items():
            if xs:
                ax.scatter(xs, ys, s=6, color=colour, label=f"{label} ({len(xs)})")
        for label, t in tl["marks"].items():
            if t is not None:
                ax.axvline(t, color="#555555", linestyle="--", linewidth=0.8)
                ax.text(t, ax.get_ylim()[1] if ax.has_data() else 1, label, rotation=90, fontsize=7, va="top")
        ax.set_yscale("log")
        ax.set_xlabel("seconds from the fault")
        ax.set_ylabel("search latency (ms, log)")
        ax.set_title(f"{name}: {'met' if out['faults'][name]['target'] else 'MISSED'}", fontsize=10)
        ax.legend(fontsize=7, loc="upper right")
    if "restart" in out["faults"]:
        ax = axes[len(names) + (loop is not None)]
        r = out["faults"]["restart"]
        labels = ["pending", "ingested", "processed", "DLQ before", "DLQ after"]
        values = [r["pending"], r["ingested"], r["pending"] + r["reprocessed"], r["dlq_before"], r["dlq_seen"][-1]]
        bars = ax.bar(labels, values, color=["#4c72b0", "#55a868", "#8172b2", "#937860", "#937860"])
        for bar, value in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), str(value), ha="center", va="bottom")
        ax.set_title(f"restart (SIGTERM, then SIGKILL): {'met' if r['target'] else 'MISSED'}", fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    if loop is not None:
        ax = axes[len(names)]
        ax.plot([t for t, _ in loop["committed"]], [c for _, c in loop["committed"]], color="#8172b2")
        for label, t in loop["timeline"]["marks"].items():
            if t is not None:
                ax.axvline(t, color="#555555", linestyle="--", linewidth=0.8)
                ax.text(t, ax.get_ylim()[1], label, rotation=90, fontsize=7, va="top")
        ax.set_xlabel("seconds from the first kill")
        ax.set_ylabel("offsets committed (all partitions)")
        ax.set_title("worker_loop: ingestion across the kills", fontsize=10)
    fig.suptitle("vidsearch fault injection, real embedded stack (tiny preset)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(out: dict[str, Any]) -> None:
    print("\n=== fault injection ===")
    for row in table_rows(out):
        print(" | ".join([row[0][:40], *row[2:]]))
    for name, error in out["errors"].items():
        print(f"{name}: ERROR {error[:300]}")
