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
LOSS_TABLE = ("Loss curve: train loss, eval loss and learning rate per step. Eval loss at step 0 is the base model's "
              "and at the last step the tuned model's (the evaluate stage); between them, what training evaluated")


def _sig(x, digits: int):
    """``x`` rounded to ``digits`` significant digits (None and non-finite values as they are)."""
    return float(f"{x:.{digits}g}") if isinstance(x, (int, float)) and math.isfinite(x) else x


def _evaluated(eval_metrics: dict | None, last_step: int) -> list[tuple[int, float, str]]:
    """The evaluate stage's eval losses as (step, loss, label): the base model's at step 0, the tuned one's at the
    last optimizer step."""
    out = []
    for step, which, label in ((0, "base", "base"), (last_step, "tuned", "tuned")):
        loss = ((eval_metrics or {}).get(which) or {}).get("eval_loss")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            out.append((step, float(loss), label))
    return out


def utc_minute(stamp: str) -> str:
    """A manifest's time stamp as people read it: ``2026-11-29T02:13:44Z`` -> ``2026-11-29 02:13 UTC``."""
    return str(stamp).replace("T", " ").removesuffix("Z")[:16] + " UTC"


def loss_rows(log_history: list[dict], eval_metrics: dict | None = None) -> list[dict]:
    """One row per step that logged a train loss, an eval loss or a learning rate, sorted by step.

    Every row has all of ``COLUMNS`` (None where that step has no value), so a table artifact gets even columns.
    The final entry's ``train_loss`` (the run's average) is not a step's loss and is left out. Losses are rounded
    to 4 significant digits, the learning rate to 3. With the evaluate stage's ``metrics.json``, its base eval loss
    is step 0's and its tuned eval loss the last step's (where training itself evaluated at that step, its own
    number stays).
    """
    rows: dict[int, dict] = {}
    for entry in log_history:
        values = {"train_loss": _sig(entry.get("loss"), 4), "eval_loss": _sig(entry.get("eval_loss"), 4),
                  "learning_rate": _sig(entry.get("learning_rate"), 3)}
        if "step" not in entry or all(v is None for v in values.values()):
            continue
        row = rows.setdefault(int(entry["step"]), dict.fromkeys(COLUMNS))
        row["step"] = int(entry["step"])
        row.update({k: v for k, v in values.items() if v is not None})
    last = max((int(e["step"]) for e in log_history if "step" in e), default=0)
    for step, loss, _ in _evaluated(eval_metrics, last):
        row = rows.setdefault(step, {**dict.fromkeys(COLUMNS), "step": step})
        if row["eval_loss"] is None:
            row["eval_loss"] = _sig(loss, 4)
    return [rows[s] for s in sorted(rows)]


def loss_png(log_history: list[dict], eval_metrics: dict | None = None) -> bytes:
    """Train and eval loss against the step as a ~700x400 PNG (any number of points, none included).

    With the evaluate stage's ``metrics.json``: its eval loss as two labelled points, the base model at step 0 and
    the tuned model at the last step."""
    # Figure + the Agg canvas directly, not pyplot: no global state, no GUI backend, safe in a worker thread
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = loss_rows(log_history)
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, label, style in (("train_loss", "train loss", {"color": "tab:blue", "marker": "."}),
                              ("eval_loss", "eval loss (during training)", {"color": "tab:orange", "marker": "o"})):
        points = [(r["step"], r[key]) for r in rows if r[key] is not None and math.isfinite(r[key])]
        if points:
            ax.plot(*zip(*points), label=label, linewidth=1.5, **style)
    last = max((int(e["step"]) for e in log_history if "step" in e), default=0)
    evaluated = _evaluated(eval_metrics, last)
    if evaluated:
        steps, losses, labels = zip(*evaluated)
        ax.plot(steps, losses, linestyle="none", marker="D", markersize=8, color="tab:red",
                label="eval loss (evaluate stage)")
        for step, loss, label in evaluated:  # the base's label right of its point, the tuned one's left of it
            right = label == "base"
            ax.annotate(f"{label} {loss:.3g}", (step, loss), textcoords="offset points", xytext=(8 if right else -8, 6),
                        ha="left" if right else "right", color="tab:red", fontsize=9)
    ax.margins(y=0.12)  # room for the points' labels
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


def benchmark_png(rows: list[dict]) -> bytes:
    """Base vs tuned per benchmark score (``tasks/benchmark.rows``) as horizontal bars with their 95 % intervals, in
    percent; ~700 px wide, taller with more rows (none included)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, max(2.0, 1.2 + 0.55 * len(rows))), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if not rows:
        ax.text(0.5, 0.5, "no benchmark was scored", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_axis_off()
    for offset, model, color in ((-0.2, "base", "tab:gray"), (0.2, "tuned", "tab:blue")):  # base above tuned
        values = [100 * r[model] for r in rows]
        errors = [[max(0.0, 100 * (r[model] - r[f"{model}_ci"][0])) for r in rows],
                  [max(0.0, 100 * (r[f"{model}_ci"][1] - r[model])) for r in rows]]
        if rows:
            bars = ax.barh([i + offset for i in range(len(rows))], values, height=0.38, xerr=errors, color=color,
                           label=model, capsize=3, error_kw={"elinewidth": 1, "ecolor": "black"})
            ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], padding=2, fontsize=7)
    if rows:
        ax.set_yticks(range(len(rows)), [f"{r['benchmark']}: {r['label']}" for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("score, % (higher is better; whiskers: 95 % interval)")
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    ax.set_title("Benchmarks: base vs tuned")
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


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _benchmark_section(bm: dict, png: bytes | None) -> list[str]:
    """The benchmark stage's scores: a table base vs tuned with items and intervals, what was left out, the chart."""
    rows, settings = bm.get("rows") or [], bm.get("settings") or {}
    if not rows:
        return ["## Benchmarks", "", "No benchmark was scored (`benchmark.tasks` is empty)."]
    lines = ["## Benchmarks: base vs tuned", "",
             "| benchmark | score | items | base | tuned | tuned - base | 95 % interval: base; tuned |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        score = f"**{r['label']}**" if r.get("primary") else r["label"]
        lines.append(f"| {_cell(r['benchmark'])} | {_cell(score)} | {r['items']:,} {r.get('unit', 'items')} | "
                     f"{_pct(r['base'])} | {_pct(r['tuned'])} | {100 * r['delta']:+.1f} points | "
                     f"{_pct(r['base_ci'][0])}-{_pct(r['base_ci'][1])}; {_pct(r['tuned_ci'][0])}-"
                     f"{_pct(r['tuned_ci'][1])} |")
    limit = settings.get("limit")
    lines += ["", f"The bold score of each benchmark is the one promotion compares (`benchmark.max_regression`). "
                  f"Intervals: Wilson's 95 % score interval over the items (a normal one for a score that is not "
                  f"pass/fail). Replies: greedy, at most {settings.get('max_new_tokens', '?')} new tokens"
                  + (f"; the first {limit} items of each benchmark (`benchmark.limit`)" if limit else "") + "."]
    if bm.get("random_weights"):
        lines += ["", "*The base model has random weights: its replies, and so these scores, are noise.*"]
    for name, b in (bm.get("benchmarks") or {}).items():
        notes = []
        if "scorable" in b:
            notes.append(f"{b['items']} of its {b['scorable']} scorable prompts scored")
        if b.get("excluded_prompts"):
            needs = sorted(set(b["excluded_instructions"].values()))
            notes.append(f"{b['excluded_prompts']} of its {b['total']} prompts excluded: their instructions "
                         f"({', '.join(b['excluded_instructions'])}) need NLTK data ({', '.join(needs)}) that no "
                         "PyPI package ships")
        if "cut_short" in b.get("tuned", {}):
            notes.append(f"replies cut short at the token cap: base {b['base']['cut_short']:.0%}, tuned "
                         f"{b['tuned']['cut_short']:.0%}")
        if b.get("base_kept_from"):
            notes.append(f"the base model's scores kept from {utc_minute(b['base_kept_from'])} (same base model, "
                         "settings and tokenizer: not scored again)")
        if notes:
            lines += ["", f"- {name}: " + "; ".join(notes) + "."]
    if wb := bm.get("wandb"):
        lines += ["", f"W&B benchmark run: [{wb['url']}]({wb['url']})" if wb.get("url") else
                  f"W&B benchmark run logged offline; upload it with `{wb.get('sync_command')}`"]
    if png:
        lines += ["", f"![benchmarks](data:image/png;base64,{base64.b64encode(png).decode()})"]
    return lines


def _train_section(tr: dict) -> list[str]:
    lines = []
    if "tokens_per_second" in tr:
        warm = (f" ({_num(tr['tokens_per_second_warm'])} after warm-up)" if tr.get("tokens_per_second_warm")
                else "")
        lines.append(f"- speed: {_num(tr['tokens_per_second'])} tokens/s{warm}")
    start = tr.get("resumed_from_step") or 0
    if "train_seconds" in tr:  # this attempt's time: a resumed one trained from its checkpoint's step on
        steps = "" if tr.get("steps") is None else (
            f" for steps {start:,}→{tr['steps']:,}" if start else f" for {tr['steps']:,} steps")
        lines.append(f"- training time: {_duration(tr['train_seconds'])}{steps}"
                     f" ({tr['train_seconds'] / 3600:.2f} h)")
    if start:
        lines.append(f"- resumed from checkpoint-{start} (the steps before it were trained by an earlier attempt)")
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


def outcome(summary: dict) -> str:
    """A run's outcome in one line, for the report's entry in the artifact history and the final state's message:
    ``Completed · eval loss 10.37 → 0.8123 · promoted``, ``Failed · stage 'data' failed: ...``,
    ``Cancelled during train · checkpoint-20 kept; Retry resumes from step 20``."""
    parts = [summary.get("status", "unknown")]
    if (stop := summary.get("stopped")) is not None:
        parts = [parts[0] + (f" during {stop['stage']}" if stop.get("stage") else " before any stage"),
                 stop.get("resume", "")]
    elif summary.get("error"):
        parts.append(summary["error"])
    else:
        failed = [f"{n}: {r['error']}" for n, r in summary.get("stages", {}).items() if r.get("error")]
        parts += failed[:1]
    ev = summary.get("eval") or {}
    base, tuned = (ev.get("base") or {}).get("eval_loss"), (ev.get("tuned") or {}).get("eval_loss")
    if tuned is not None:
        parts.append(f"eval loss {base:.4g} → {tuned:.4g}" if base is not None else f"eval loss {tuned:.4g}")
    if (p := summary.get("promotion")) is not None:
        parts.append("promoted" if p.get("promoted") else "not promoted")
    if summary.get("attempt", 1) > 1:
        parts.append(f"attempt {summary['attempt']}")
    return " · ".join(" ".join(str(x).split()) for x in parts if x)


def _attempt_line(summary: dict) -> list[str]:
    attempt = summary.get("attempt", 1)
    if attempt <= 1:
        return []
    resumed = (summary.get("train") or {}).get("resumed_from_step")
    how = f"training resumed from checkpoint-{resumed}" if resumed else "training did not resume from a checkpoint"
    return [f"**Attempt {attempt}** of this flow run (a Retry): stages an earlier attempt finished are reused "
            f"(Cached); {how}.", ""]


def _stopped_section(stop: dict) -> list[str]:
    where = f"during the **{stop['stage']}** stage" if stop.get("stage") else "before any stage started"
    lines = ["## Stopped", "", f"The run was **{stop['how']}** {where}: {stop.get('resume', '')}."]
    if stop.get("checkpoint"):
        lines += ["", f"Checkpoint kept: `{stop['checkpoint']}`"]
    return lines


def markdown(summary: dict, health: dict | None, png: bytes | None, bench_png: bytes | None = None) -> str:
    """The run report as markdown; any part the summary lacks (a failed run has no eval) is left out."""
    title = f"# Fine-tune `{summary.get('recipe', '?')}`: {summary.get('status', 'unknown')}"
    out = [title, ""]
    if summary.get("flow_run_id"):
        out += [f"Flow run `{summary['flow_run_id']}`" + (f", model `{summary['model']}`" if summary.get("model")
                                                          else "") + ".", ""]
    out += _attempt_line(summary)
    if summary.get("error"):  # refused before any stage ran (its config, the machine): the one line says what
        out += ["## Refused before any stage ran", "", _cell(summary["error"]), "",
                "Nothing was computed or changed in the store. Fix the field it names and run again.", ""]
    if summary.get("stopped"):
        out += [*_stopped_section(summary["stopped"]), ""]
    if summary.get("stages"):
        out += [*_stage_table(summary["stages"]), ""]
    if summary.get("eval"):
        out += [*_eval_section(summary["eval"]), ""]
    if summary.get("benchmark"):
        out += [*_benchmark_section(summary["benchmark"], bench_png), ""]
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


# ---- DPO (flows/dpo.py) ----------------------------------------------------------------------------------------
DPO_COLUMNS = ("step", "train_loss", "reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected",
               "learning_rate")
_DPO_KEYS = {"train_loss": "loss", "reward_accuracy": "rewards/accuracies", "reward_margin": "rewards/margins",
             "rewards_chosen": "rewards/chosen", "rewards_rejected": "rewards/rejected",
             "learning_rate": "learning_rate"}


def dpo_rows(log_history: list[dict]) -> list[dict]:
    """One row per DPO logging step (trl's ``loss`` and ``rewards/*``), every row with all of ``DPO_COLUMNS``."""
    rows = []
    for entry in log_history:
        if "step" not in entry or "loss" not in entry:  # the final summary entry has train_loss, not loss
            continue
        rows.append({"step": int(entry["step"]), **{c: entry.get(k) for c, k in _DPO_KEYS.items()}})
    return rows


def dpo_png(log_history: list[dict]) -> bytes:
    """DPO's loss, and its reward accuracy and margin, against the step: two panels, ~900x380 PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = dpo_rows(log_history)
    fig = Figure(figsize=(9, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)

    def points(key):
        return [(r["step"], r[key]) for r in rows if r[key] is not None and math.isfinite(r[key])]

    for ax, key, label, style in ((loss_ax, "train_loss", "DPO loss", {"color": "tab:blue"}),
                                  (acc_ax, "reward_accuracy", "reward accuracy", {"color": "tab:green"})):
        if pts := points(key):
            ax.plot(*zip(*pts), label=label, marker=".", linewidth=1.5, **style)
        else:
            ax.text(0.5, 0.5, f"no {label} was logged", ha="center", va="center", transform=ax.transAxes,
                    color="gray")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    loss_ax.set_ylabel("loss (lower is better; ln 2 = 0.693 at the start)")
    loss_ax.set_title("DPO loss")
    acc_ax.set_ylim(-0.05, 1.05)
    acc_ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)  # a coin's accuracy
    acc_ax.set_ylabel("share of pairs (higher is better)")
    acc_ax.set_title("Reward accuracy and margin (training batches)")
    if pts := points("reward_margin"):
        margin_ax = acc_ax.twinx()
        margin_ax.plot(*zip(*pts), label="reward margin", color="tab:orange", marker=".", linewidth=1)
        margin_ax.set_ylabel("reward margin (chosen - rejected)")
        lines = [ln for ln in acc_ax.get_lines() + margin_ax.get_lines() if not ln.get_label().startswith("_")]
        acc_ax.legend(lines, [ln.get_label() for ln in lines], loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def dpo_lines(summary: dict) -> list[str]:
    """What a DPO run's summary adds on screen: the SFT model's numbers, the held-out accuracies, dropped pairs."""
    lines = []
    if sft := summary.get("sft"):
        ev = sft.get("eval", {})
        if "base" in ev and "tuned" in ev:
            lines.append(f"SFT ({sft['recipe']}): eval loss base {ev['base']['eval_loss']:.4f} -> tuned "
                         f"{ev['tuned']['eval_loss']:.4f}; adapter {sft['adapter']}")
    if ev := summary.get("dpo_eval"):
        d, s = ev["dpo"], ev["sft"]
        lines.append(f"DPO on {ev['pairs']} held-out pairs: reward accuracy {d['reward_accuracy']:.2f} (margin "
                     f"{d['reward_margin']:+.3f}); preference accuracy SFT {s['preference_accuracy']:.2f} -> DPO "
                     f"{d['preference_accuracy']:.2f}")
    if tr := summary.get("dpo_train"):
        if tr.get("resumed_from_step"):
            lines.append(f"dpo_train resumed from the checkpoint at step {tr['resumed_from_step']}")
        for fb in tr.get("oom_fallbacks", []):
            lines.append(f"dpo_train ran out of memory at step {fb['at_step']}: micro-batch "
                         f"{fb['from']['per_device_batch_size']} -> {fb['to']['per_device_batch_size']} (same "
                         f"effective batch)")
    for split, st in summary.get("stages", {}).get("preference_data", {}).get("splits", {}).items():
        if st["invalid"]:
            reasons = ", ".join(f"{n} {why}" for why, n in st["invalid_reasons"].items())
            lines.append(f"preference_data: dropped {st['invalid']} invalid rows of split {split} ({reasons})")
    return lines


def dpo_markdown(summary: dict, png: bytes | None) -> str:
    """The DPO part of a DPO run's report: held-out accuracies, training, promotion, the curves, dropped pairs."""
    out = [f"# DPO `{summary.get('recipe', '?')}`: {summary.get('status', 'unknown')}", ""]
    if sft := summary.get("sft"):
        out += [f"Starts from the SFT adapter of recipe `{sft['recipe']}` (`{sft['adapter']}`), which is also "
                "DPO's reference model.", ""]
    if ev := summary.get("dpo_eval"):
        d, s = ev["dpo"], ev["sft"]
        out += [f"## Held-out preference pairs: {ev['pairs']} of split `{ev['split']}` (beta {ev['beta']:g})", "",
                "| model | preference accuracy | reward accuracy | reward margin | mean log-prob chosen | rejected |",
                "|---|---:|---:|---:|---:|---:|",
                f"| SFT (the reference) | {s['preference_accuracy']:.3f} | – | – | {_num(s['logps_chosen'])} | "
                f"{_num(s['logps_rejected'])} |",
                f"| DPO | {d['preference_accuracy']:.3f} | {d['reward_accuracy']:.3f} | {d['reward_margin']:+.4f} | "
                f"{_num(d['logps_chosen'])} | {_num(d['logps_rejected'])} |", "",
                "Preference accuracy: the share of pairs where the model gives the chosen reply a higher "
                "log-probability than the rejected one. Reward accuracy: the share where DPO's implicit reward "
                "(beta x the log-probability ratio to the SFT model) is higher for the chosen reply; for the SFT "
                "model it is 0 by definition (its reward against itself is 0).", ""]
    if tr := summary.get("dpo_train"):
        out += [*_train_section(tr), ""]
    for split, st in summary.get("stages", {}).get("preference_data", {}).get("splits", {}).items():
        if st.get("invalid"):
            reasons = "; ".join(f"{n} × {_cell(why)}" for why, n in st["invalid_reasons"].items())
            out += [f"Split `{split}`: {st['rows']:,} pairs kept, {st['invalid']} invalid dropped ({reasons}).", ""]
    if summary.get("adapter"):
        out += ["## DPO adapter", "", f"`{summary['adapter']}`", ""]
    if p := summary.get("promotion"):
        out += ["## Promotion", "", f"**{'Promoted' if p.get('promoted') else 'Not promoted'}**: "
                f"{p.get('reason', '')}", ""]
    if png:
        out += ["## Loss and reward accuracy", "",
                f"![DPO curves](data:image/png;base64,{base64.b64encode(png).decode()})", ""]
    return "\n".join(out).rstrip() + "\n"
