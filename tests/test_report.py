"""The report: plots written as valid PNGs, linked from report.md, with the numbers and samples in it."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import pytest

from tinyllm.evaluate import EvalResult, ModelResults, Sample, generation_metrics
from tinyllm.report import BPB_PLOT, LOSS_PLOT, REPETITION_PLOT, loss_points, read_metrics, write_report


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"event": "train", "step": s, "tokens": s * 2048, "loss": 10 - s / 20, "lr": 1e-3} for s in range(10, 110, 10)
    ]
    records += [
        {"event": "eval", "step": 50, "tokens": 102400, "val_loss": 8.1, "val_bpb": 3.6, "sample": "hi"},
        {"event": "eval", "step": 100, "tokens": 204800, "val_loss": 6.5, "val_bpb": 2.9, "sample": "hey"},
        {"event": "end", "step": 100, "tokens": 204800, "elapsed_s": 600.0, "best_val_bpb": 2.9, "val_loss": 6.5},
        {"event": "something-new", "step": 100},
    ]
    lines = [json.dumps(r) for r in records] + ["not json", "[1, 2]"]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def _results() -> list[ModelResults]:
    ev = EvalResult(
        loss_nats_per_token=4.25,
        perplexity=70.1,
        bits_per_byte=1.8765,
        tokens_scored=1000,
        bytes=3300,
        context=256,
        stride=128,
        method="sliding window (context 256, stride 128)",
        text="val split of shakespeare",
    )
    samples = [
        Sample("The future of AI is", 1337, " bright and bright and bright and bright", (1, 2, 3, 1, 2, 3, 1, 2, 3)),
        Sample("ROMEO:", 1337, " What say you, my lord?", (4, 5, 6, 7)),
    ]
    metrics = generation_metrics([s.token_ids for s in samples], texts=[s.text for s in samples])
    custom = ModelResults("custom", "runs/x/best", eval=ev, samples=samples, metrics=metrics)
    gpt2 = ModelResults("GPT-2", "openai-community/gpt2", unavailable="offline and not in the Hugging Face cache")
    return [custom, gpt2]


def test_loss_points_tolerate_unknown_records(tmp_path):
    train, val = loss_points(read_metrics(_run_dir(tmp_path) / "metrics.jsonl"))
    assert len(train) == 10 and train[0] == (10.0, 9.5, 20480.0)
    assert val == [(50.0, 8.1, 102400.0), (100.0, 6.5, 204800.0)]
    # Records without an event but with the usual keys still count; bools and NaN never do.
    train, val = loss_points(
        [{"step": 1, "loss": 2.0}, {"iter": 2, "val_loss": 1.5}, {"step": 3, "loss": float("nan")}]
    )
    assert train == [(1.0, 2.0, None)] and val == [(2.0, 1.5, None)]


def test_report_has_plots_numbers_and_samples(tmp_path):
    out = tmp_path / "report"
    path = write_report(out, run_dir=_run_dir(tmp_path), results=_results())
    assert path == out / "report.md"
    md = path.read_text()
    for name in (LOSS_PLOT, BPB_PLOT, REPETITION_PLOT):
        width, height = _png_size(out / name)
        assert width > 100 and height > 100
        assert f"]({name})" in md  # linked by relative path
    assert "1.8765" in md and "4.2500" in md and "256 / 128" in md and "1,000" in md and "3,300" in md
    assert "GPT-2 unavailable: offline and not in the Hugging Face cache" in md
    assert "sliding window (context 256, stride 128)" in md
    assert "| best val loss | 6.5000 |" in md and "| steps | 100 |" in md and "| minutes | 10.0 |" in md
    assert "The future of AI is bright and bright" in md and "ROMEO: What say you, my lord?" in md
    assert "0.429" in md  # repeated 4-grams of the tokens: 3 of 6 in the first sample, 0 of 1 in the second
    results = json.loads((out / "results.json").read_text())
    assert results["models"][0]["eval"]["bits_per_byte"] == pytest.approx(1.8765)
    assert results["models"][1]["unavailable"].startswith("offline")


def test_report_without_a_run_or_models(tmp_path):
    path = write_report(tmp_path / "r", run_dir=tmp_path / "missing")
    assert "No metrics.jsonl" in path.read_text()
    assert not list((tmp_path / "r").glob("*.png"))


def test_report_without_metrics_draws_no_repetition_plot(tmp_path):
    only_gpt2 = [r for r in _results() if r.name == "GPT-2"]
    path = write_report(tmp_path / "r", results=only_gpt2)
    md = path.read_text()
    assert "GPT-2 unavailable" in md and REPETITION_PLOT not in md and BPB_PLOT not in md
    assert not (tmp_path / "r" / REPETITION_PLOT).exists()


def test_best_val_loss_is_trainings_never_the_step_0_evaluation(tmp_path):
    """A fine-tune that only got worse: the step-0 evaluation (the starting weights) scored best, but best/ holds
    the best evaluation after training began, and the report must name that one."""
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"event": "eval", "step": 0, "val_loss": 3.16, "best": False},
        {"event": "eval", "step": 2, "val_loss": 5.2, "best": True},
        {"event": "eval", "step": 4, "val_loss": 4.93, "best": True},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert "| best val loss | 4.9300 |" in write_report(tmp_path / "r1", run_dir=run).read_text()  # mid-run
    end = {"event": "end", "step": 4, "best_val_loss": 4.93, "best_val_bpb": 2.1}
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(end) + "\n")
    assert "| best val loss | 4.9300 |" in write_report(tmp_path / "r2", run_dir=run).read_text()


def test_a_torn_metrics_file_and_a_nan_score_still_make_a_strict_report(tmp_path):
    run = _run_dir(tmp_path)
    with (run / "metrics.jsonl").open("ab") as f:
        f.write(b"\xff\xfe\x00garbage\n")  # a write cut off mid-character, or another program's bytes
    broken = _results()
    broken[0].eval = dataclasses.replace(broken[0].eval, bits_per_byte=float("nan"))
    out = tmp_path / "report"
    md = write_report(out, run_dir=run, results=broken).read_text()
    assert "| best val loss | 6.5000 |" in md
    results = json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert results["models"][0]["eval"]["bits_per_byte"] is None
