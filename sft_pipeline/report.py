"""The run report: the loss table, the loss picture (PNG) and one markdown page that a Prefect artifact shows.

Plain functions of what the run wrote (``log_history.json``, the run summary, the health report); creating the
Prefect artifacts from them is the flow's job. The picture goes into the markdown as a data-URI image: Prefect 3.9's
UI renders it on the artifact's page (checked in Chromium), and no file server is needed for it.
"""
from __future__ import annotations

import base64
import io
import math

from sft_pipeline import how_it_ran

COLUMNS = ("step", "train_loss", "eval_loss", "learning_rate")


def utc_minute(stamp: str) -> str:
    """A manifest's time stamp as people read it: ``2026-11-29T02:13:44Z`` -> ``2026-11-29 02:13 UTC``."""
    return str(stamp).replace("T", " ").removesuffix("Z")[:16] + " UTC"


def loss_rows(log_history: list[dict]) -> list[dict]:
    """One row per step that logged a train loss, an eval loss or a learning rate, sorted by step.

    Every row has all of ``COLUMNS`` (None where that step has no value), so a table artifact gets even columns.
    The final entry's ``train_loss`` (the run's average) is not a step's loss and is left out.
    """
    rows: dict[int, dict] = {}
    for entry in log_history:
        values = {"train_loss": entry.get("loss"), "eval_loss": entry.get("eval_loss"),
                  "learning_rate": entry.get("learning_rate")}
        if "step" not in entry or all(v is None for v in values.values()):
            continue
        row = rows.setdefault(int(entry["step"]), dict.fromkeys(COLUMNS))
        row["step"] = int(entry["step"])
        row.update({k: v for k, v in values.items() if v is not None})
    return [rows[s] for s in sorted(rows)]


def loss_png(log_history: list[dict]) -> bytes:
    """Train and eval loss against the step as a ~700x400 PNG (any number of points, none included)."""
    # Figure + the Agg canvas directly, not pyplot: no global state, no GUI backend, safe in a worker thread
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = loss_rows(log_history)
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, label, style in (("train_loss", "train loss", {"color": "tab:blue", "marker": "."}),
                              ("eval_loss", "eval loss", {"color": "tab:orange", "marker": "o"})):
        points = [(r["step"], r[key]) for r in rows if r[key] is not None and math.isfinite(r[key])]
        if points:
            ax.plot(*zip(*points), label=label, linewidth=1.5, **style)
    if not ax.lines:
        ax.text(0.5, 0.5, "no loss was logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    else:
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (lower is better)")
    ax.set_title("Loss curve")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ---- formatting ------------------------------------------------------------------------------------------------

def _num(x) -> str:
    """A number as a person reads it: thousands separated, 4 significant digits below 1,000."""
    if x is None:
        return "–"
    if isinstance(x, int) or abs(x) >= 1000:
        return f"{x:,.0f}"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


def _cell(text) -> str:
    """A markdown table cell: one line, no column break."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _stage_table(stages: dict) -> list[str]:
    lines = ["| stage | state | seconds | artifact |", "|---|---|---:|---|"]
    for name, rec in stages.items():
        state = rec.get("state", "")
        if rec.get("attempts", 1) > 1:
            state += f" ({rec['attempts']} attempts)"
        where = f"`{rec['artifact']}`" if rec.get("artifact") else rec.get("error", "")
        seconds = f"{rec['seconds']:.1f}" if isinstance(rec.get("seconds"), (int, float)) else ""
        lines.append(f"| {_cell(name)} | {_cell(state)} | {seconds} | {_cell(where)} |")
    return lines


def _eval_section(ev: dict) -> list[str]:
    base, tuned = ev.get("base", {}), ev.get("tuned", {})
    parts = [f"split `{ev['split']}`"] if ev.get("split") else []
    parts += [f"{ev['rows']:,} rows"] if ev.get("rows") else []
    lines = ["## Evaluation" + (" on " + ", ".join(parts) if parts else ""), "",
             "| model | eval loss | perplexity | eval tokens/s |", "|---|---:|---:|---:|"]
    for label, m in (("base (before fine-tuning)", base), ("tuned", tuned)):
        if m:
            lines.append(f"| {label} | {m.get('eval_loss', math.nan):.4f} | {_num(m.get('perplexity'))} | "
                         f"{_num(m.get('tokens_per_second'))} |")
    if "eval_loss" in base and "eval_loss" in tuned:
        delta = tuned["eval_loss"] - base["eval_loss"]
        lines += ["", f"Tuned minus base eval loss: {delta:+.4f} ({'better' if delta < 0 else 'worse'}; lower is "
                      f"better)."]
    if base.get("kept_from"):
        lines += ["", f"The base model's numbers (loss, tokens/s, answers) are kept from its scoring on "
                      f"{utc_minute(base['kept_from'])}: same base model, test set and scoring settings, so not "
                      f"scored again."]
    if gen := ev.get("generation"):
        b, t = gen.get("base", {}), gen.get("tuned", {})
        lines += ["", f"Answers to {gen.get('samples')} held-out prompts (greedy): correct {b.get('match', 0):.0%} "
                      f"before, {t.get('match', 0):.0%} after; replies that end their turn {b.get('ends_turn', 0):.0%} "
                      f"before, {t.get('ends_turn', 0):.0%} after."]
    return lines


def _train_section(tr: dict) -> list[str]:
    lines = []
    if "tokens_per_second" in tr:
        warm = (f" ({_num(tr['tokens_per_second_warm'])} after warm-up)" if tr.get("tokens_per_second_warm")
                else "")
        lines.append(f"- speed: {_num(tr['tokens_per_second'])} tokens/s{warm}")
    if "train_seconds" in tr:
        steps = f" for {tr['steps']:,} steps" if tr.get("steps") is not None else ""
        lines.append(f"- training time: {_duration(tr['train_seconds'])}{steps}"
                     f" ({tr['train_seconds'] / 3600:.2f} h)")
    if tr.get("resumed_from_step"):
        lines.append(f"- resumed from the checkpoint at step {tr['resumed_from_step']:,}")
    if est := tr.get("estimate"):
        cost = f", cost about {est['cost']:,.2f}" if est.get("cost") is not None else ""
        lines.append(f"- estimate made during training: {_num(est.get('tokens'))} tokens at "
                     f"{_num(est.get('tokens_per_second'))} tokens/s: {est.get('hours', 0):.2f} h{cost}")
    for fb in tr.get("oom_fallbacks", []):
        lines.append(f"- ran out of GPU memory at step {fb['at_step']}: micro-batch "
                     f"{fb['from']['per_device_batch_size']} -> {fb['to']['per_device_batch_size']} (same effective "
                     f"batch)")
    if "peak_gpu_gib" in tr:
        lines.append(f"- peak GPU memory: {tr['peak_gpu_gib']:.1f} GiB")
    if settings := _how_it_ran(tr):
        lines.append(f"- how it ran: {settings}")
    return ["## Training", "", *lines] if lines else []


def _how_it_ran(tr: dict) -> str:
    """The batch plan and speed settings the train stage chose, in the words of its ``training settings`` line."""
    return how_it_ran.describe(tr)


def markdown(summary: dict, health: dict | None, png: bytes | None) -> str:
    """The run report as markdown; any part the summary lacks (a failed run has no eval) is left out."""
    title = f"# Fine-tune `{summary.get('recipe', '?')}`: {summary.get('status', 'unknown')}"
    out = [title, ""]
    if summary.get("flow_run_id"):
        out += [f"Flow run `{summary['flow_run_id']}`" + (f", model `{summary['model']}`" if summary.get("model")
                                                          else "") + ".", ""]
    if summary.get("stages"):
        out += [*_stage_table(summary["stages"]), ""]
    if summary.get("eval"):
        out += [*_eval_section(summary["eval"]), ""]
    if summary.get("train"):
        out += [*_train_section(summary["train"]), ""]
    if summary.get("adapter"):
        out += ["## Adapter", "", f"`{summary['adapter']}`", ""]
    if p := summary.get("promotion"):
        out += ["## Promotion", "", f"**{'Promoted' if p.get('promoted') else 'Not promoted'}**: "
                f"{p.get('reason', '')}", ""]
    if health and health.get("sentences"):
        out += ["## Is the loss curve healthy?", ""]
        out += [f"- {'⚠️ ' if s in health.get('warnings', []) else ''}{s}" for s in health["sentences"]]
        out.append("")
    if png:
        out += ["## Loss curve", "", f"![loss curve](data:image/png;base64,{base64.b64encode(png).decode()})", ""]
    if wb := summary.get("wandb"):
        if wb.get("url"):
            out += [f"W&B run: [{wb['url']}]({wb['url']})", ""]
        if wb.get("sync_command"):
            out += [f"W&B logged offline; upload it with `{wb['sync_command']}`", ""]
    return "\n".join(out).rstrip() + "\n"
