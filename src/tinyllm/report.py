"""A Markdown report with plots: a run's loss curves, bits per byte per model, repetition metrics, samples.

`write_report` writes `report.md`, `results.json` and PNGs into one directory; the Markdown links the PNGs by
relative path, so the directory can be moved or opened on GitHub as it is. The run's curves come from the
`metrics.jsonl` that training writes (`event` "train" records with `loss`, "eval" records with `val_loss`,
each with `step` and `tokens`); records it does not recognise are skipped. Plots are drawn on matplotlib
`Figure`s of their own with the Agg canvas (no pyplot, no global backend), only when a report is written.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tinyllm.evaluate import ModelResults

logger = logging.getLogger(__name__)

REPORT_FILE, RESULTS_FILE = "report.md", "results.json"
LOSS_PLOT, BPB_PLOT, REPETITION_PLOT = "loss_curves.png", "bits_per_byte.png", "repetition.png"
_REPETITION_METRICS = (
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
    ("repeated_4gram_share", "repeated 4-grams"),
)


# --- the run's records ---------------------------------------------------------------------------


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (lines that are not JSON objects are skipped)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():  # a torn write: skipped
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def finite(value: Any) -> Any:
    """`value` with NaN and infinities (not JSON) as None, through dicts and lists: strict JSON's numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def _number(record: Mapping[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = record.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def loss_points(records: Sequence[Mapping[str, Any]]) -> tuple[list[tuple[float, float, float | None]], ...]:
    """(train, val) curves as (step, loss, tokens) points; tolerant of missing events and key names."""
    train, val = [], []
    for r in records:
        event, step = r.get("event"), _number(r, "step", "iter")
        if step is None or event == "end":
            continue
        tokens = _number(r, "tokens", "tokens_seen")
        if event in ("train", None) and (loss := _number(r, "loss", "train_loss")) is not None:
            train.append((step, loss, tokens))
        if event in ("eval", None) and (loss := _number(r, "val_loss")) is not None:
            val.append((step, loss, tokens))
    return train, val


# --- plots ---------------------------------------------------------------------------------------


def _figure(size: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_losses(records: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "loss") -> Path | None:
    """Train and validation loss against steps (tokens on the top axis); None when there is nothing to draw."""
    train, val = loss_points(records)
    if not train and not val:
        return None
    fig = _figure((8, 4.5))
    ax = fig.subplots()
    if train:
        ax.plot([p[0] for p in train], [p[1] for p in train], lw=1.2, color="tab:blue", label="train")
    if val:
        ax.plot([p[0] for p in val], [p[1] for p in val], "o-", ms=4, color="tab:orange", label="validation")
    with_tokens = [(p[0], p[2]) for p in train + val if p[2] is not None and p[0] > 0]
    if with_tokens:  # tokens grow linearly with steps (fixed batch), so a second axis shows them
        per_step = max(t for _, t in with_tokens) / max(s for s, _ in with_tokens)
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
        top.set_xlabel("tokens")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_bits_per_byte(results: Sequence[ModelResults], path: str | Path) -> Path | None:
    """One bar per model's held-out bits per byte (models without a number are labelled as such)."""
    if not any(r.eval for r in results):
        return None
    fig = _figure((max(4.0, 1.6 * len(results) + 2), 4))
    ax = fig.subplots()
    names = [r.name for r in results]
    finite = [r.eval is not None and math.isfinite(r.eval.bits_per_byte) for r in results]
    values = [r.eval.bits_per_byte if ok and r.eval else 0.0 for r, ok in zip(results, finite, strict=True)]
    bars = ax.bar(names, values, color=[f"C{i}" for i in range(len(results))])
    for bar, r in zip(bars, results, strict=True):
        label = f"{r.eval.bits_per_byte:.3f}" if r.eval else "unavailable"  # "nan" / "inf" for a broken model
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 3),
                    textcoords="offset points", ha="center", fontsize=9)  # fmt: skip
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title("held-out bits per byte")
    ax.set_ylim(0, max(values + [1.0]) * 1.15)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_repetition(results: Sequence[ModelResults], path: str | Path) -> Path | None:
    """Grouped bars: distinct-1, distinct-2 and the repeated 4-gram share of each model's samples."""
    measured = [r for r in results if r.metrics is not None]
    if not measured:
        return None
    fig = _figure((8, 4))
    ax = fig.subplots()
    width = 0.8 / len(measured)
    for i, r in enumerate(measured):
        xs = [j + (i - (len(measured) - 1) / 2) * width for j in range(len(_REPETITION_METRICS))]
        ys = [getattr(r.metrics, key) for key, _ in _REPETITION_METRICS]
        ax.bar(xs, ys, width, label=r.name)
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(f"{y:.2f}", (x, y), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=8)
    ax.set_xticks(range(len(_REPETITION_METRICS)), [label for _, label in _REPETITION_METRICS])
    ax.set_ylim(0, 1.1)
    ax.set_title("diversity and repetition of samples (token ids)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# --- the report ----------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "–" if value is None else format(value, spec)


def _run_section(run_dir: Path, records: list[dict[str, Any]], plot: Path | None) -> list[str]:
    lines = [f"## Training run `{run_dir}`", ""]
    train, val = loss_points(records)
    end = next((r for r in reversed(records) if r.get("event") == "end"), {})

    def latest(key: str) -> float | None:
        return next((v for r in reversed(records) if (v := _number(r, key)) is not None), None)

    elapsed = latest("elapsed_s")
    # the best as training counts it (what best/ holds): never the step-0 evaluation of the starting weights
    best = _number(end, "best_val_loss")
    evals = [r for r in records if r.get("event") == "eval"]
    if best is None and any("best" in r for r in evals):
        marked = [v for r in evals if r.get("best") is True and (v := _number(r, "val_loss")) is not None]
        best = min(marked) if marked else None
    elif best is None and val:  # another trainer's records: the lowest of them
        best = min(v[1] for v in val)
    facts = [
        ("steps", _fmt(latest("step"), ",.0f")),
        ("tokens", _fmt(latest("tokens"), ",.0f")),
        ("minutes", _fmt(elapsed / 60 if elapsed is not None else None, ".1f")),
        ("final train loss", _fmt(train[-1][1] if train else None)),
        ("final val loss", _fmt(val[-1][1] if val else None)),
        ("best val loss", _fmt(best)),
        ("best val bits per byte (training's fixed windows)", _fmt(_number(end, "best_val_bpb"))),
    ]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in facts] + [""]
    if plot is not None:
        lines += [f"![loss curves]({plot.name})", ""]
    else:
        lines += ["No loss records in metrics.jsonl yet.", ""]
    return lines


def _results_section(results: Sequence[ModelResults], bpb_plot: Path | None, rep_plot: Path | None) -> list[str]:
    lines = ["## Held-out bits per byte", ""]
    lines += ["| model | source | bits per byte | loss (nats/token) | perplexity | tokens | bytes | context / stride |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        e = r.eval
        if e is None:
            reason = f"unavailable: {r.unavailable}" if r.unavailable else "not evaluated"
            lines.append(f"| {r.name} | {r.source} | {reason} | | | | | |")
            continue
        lines.append(
            f"| {r.name} | {r.source} | **{e.bits_per_byte:.4f}** | {e.loss_nats_per_token:.4f} | "
            f"{e.perplexity:.2f} | {e.tokens_scored:,} | {e.bytes:,} | {e.context} / {e.stride} |"
        )
    texts = sorted({r.eval.text for r in results if r.eval and r.eval.text})
    methods = sorted({r.eval.method for r in results if r.eval})
    lines += [""] + [f"Held-out text: {t}." for t in texts] + [f"Method: {m}." for m in methods] + [""]
    lines += [f"{r.name} unavailable: {r.unavailable}" for r in results if r.unavailable]
    lines += [f"{r.name}: no samples ({r.samples_unavailable})" for r in results if r.samples_unavailable] + [""]
    if bpb_plot is not None:
        lines += [f"![bits per byte]({bpb_plot.name})", ""]
    measured = [r for r in results if r.metrics is not None]
    if measured:
        lines += ["## Samples: diversity and repetition", ""]
        lines += ["Continuations only (prompts excluded); n-grams pooled over all samples of a model; a repeated "
                  "4-gram is an occurrence of a 4-gram seen earlier in the same continuation.", ""]  # fmt: skip
        lines += ["| model | samples | mean length (tokens) | distinct-1 | distinct-2 | repeated 4-grams | "
                  "distinct-1 (words) | distinct-2 (words) | repeated 4-grams (words) |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in measured:
            m = r.metrics
            assert m is not None
            lines.append(
                f"| {r.name} | {m.samples} | {m.mean_length_tokens:.1f} | {m.distinct_1:.3f} | {m.distinct_2:.3f} | "
                f"{m.repeated_4gram_share:.3f} | {m.distinct_1_words:.3f} | {m.distinct_2_words:.3f} | "
                f"{m.repeated_4gram_share_words:.3f} |"
            )
        lines.append("")
        if rep_plot is not None:
            lines += [f"![repetition metrics]({rep_plot.name})", ""]
    return lines


def _samples_section(results: Sequence[ModelResults]) -> list[str]:
    keys = list(dict.fromkeys((s.prompt, s.seed) for r in results for s in r.samples))
    if not keys:
        return []
    lines = ["## Samples", ""]
    for prompt, seed in keys:
        lines += [f"### {prompt!r} (seed {seed})", ""]
        for r in results:
            sample = next((s for s in r.samples if (s.prompt, s.seed) == (prompt, seed)), None)
            if sample is not None:
                lines += [f"**{r.name}**", "", "~~~~text", prompt + sample.text, "~~~~", ""]
    return lines


def write_report(
    out_dir: str | Path,
    *,
    run_dir: str | Path | None = None,
    results: Sequence[ModelResults] = (),
    title: str = "tinyllm evaluation report",
) -> Path:
    """Write `report.md`, `results.json` and the PNG plots into `out_dir`; return the report's path.

    Args:
        out_dir: the report directory (created).
        run_dir: a training run directory whose metrics.jsonl gives the loss curves.
        results: what was measured per model (bits per byte, samples, metrics, or why unavailable).
        title: the report's heading.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    records: list[dict[str, Any]] = []
    if run_dir is not None:
        metrics = Path(run_dir) / "metrics.jsonl"
        if metrics.is_file():
            records = read_metrics(metrics)
            plot = plot_losses(records, out / LOSS_PLOT, title=f"loss: {Path(run_dir).name}")
            lines += _run_section(Path(run_dir), records, plot)
        else:
            lines += [f"No metrics.jsonl in `{run_dir}`.", ""]
    if results:
        bpb_plot = plot_bits_per_byte(results, out / BPB_PLOT)
        rep_plot = plot_repetition(results, out / REPETITION_PLOT)
        lines += _results_section(results, bpb_plot, rep_plot)
        lines += _samples_section(results)
    path = out / REPORT_FILE
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    summary = {"run_dir": str(run_dir) if run_dir else None, "models": [finite(r.to_dict()) for r in results]}
    text = json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False)  # a broken model's NaN is null
    (out / RESULTS_FILE).write_text(text + "\n", encoding="utf-8")
    logger.info("wrote report %s", path)
    return path


# --- the same numbers for a terminal -------------------------------------------------------------


def text_summary(results: Sequence[ModelResults]) -> str:
    """Plain-text tables for a terminal: bits per byte per model, the samples side by side, repetition."""
    lines: list[str] = []
    evaluated = [r for r in results if r.eval is not None or r.unavailable]
    if evaluated:
        texts = sorted({r.eval.text for r in results if r.eval and r.eval.text})
        lines.append(f"held-out bits per byte ({'; '.join(texts) or 'held-out text'})")
        lines.append(f"{'model':<8} {'bits/byte':>10} {'nats/token':>11} {'perplexity':>11} {'tokens':>11} "
                     f"{'bytes':>12} {'context/stride':>15}")  # fmt: skip
        for r in evaluated:
            e = r.eval
            if e is None:
                lines.append(f"{r.name} unavailable: {r.unavailable}")
                continue
            lines.append(
                f"{r.name:<8} {e.bits_per_byte:>10.4f} {e.loss_nats_per_token:>11.4f} {e.perplexity:>11.2f} "
                f"{e.tokens_scored:>11,} {e.bytes:>12,} {f'{e.context}/{e.stride}':>15}"
            )
        lines += [f"method: {m}" for m in sorted({r.eval.method for r in results if r.eval})] + [""]
    lines += [f"{r.name}: no samples ({r.samples_unavailable})" for r in results if r.samples_unavailable]
    keys = list(dict.fromkeys((s.prompt, s.seed) for r in results for s in r.samples))
    width = max((len(r.name) for r in results), default=0)
    for prompt, seed in keys:
        lines.append(f"--- {prompt!r} (seed {seed})")
        for r in results:
            sample = next((s for s in r.samples if (s.prompt, s.seed) == (prompt, seed)), None)
            body = (prompt + sample.text) if sample else "unavailable (see above)" if r.unavailable else "-"
            pad = " " * (width + 3)
            lines.append(f"{r.name:<{width}} | " + body.replace("\n", "\n" + pad))
        lines.append("")
    measured = [r for r in results if r.metrics is not None]
    if measured:
        lines.append("samples (continuations, token ids; words in brackets)")
        lines.append(f"{'model':<8} {'samples':>7} {'mean len':>9} {'distinct-1':>15} {'distinct-2':>15} "
                     f"{'repeated 4-grams':>17}")  # fmt: skip
        for r in measured:
            m = r.metrics
            assert m is not None
            lines.append(
                f"{r.name:<8} {m.samples:>7} {m.mean_length_tokens:>9.1f} "
                f"{f'{m.distinct_1:.3f} ({m.distinct_1_words:.3f})':>15} "
                f"{f'{m.distinct_2:.3f} ({m.distinct_2_words:.3f})':>15} "
                f"{f'{m.repeated_4gram_share:.3f} ({m.repeated_4gram_share_words:.3f})':>17}"
            )
    return "\n".join(lines).rstrip() + "\n"
