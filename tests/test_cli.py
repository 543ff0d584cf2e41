"""The command line: subcommands print what they say and user errors exit 2 with one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tinyllm.cli import main


def test_tokenize_json(gpt2_tokenizer, capsys):
    assert main(["tokenize", "The future of AI is", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {
        "ids": [464, 2003, 286, 9552, 318],
        "tokens": ["The", " future", " of", " AI", " is"],
        "tokenizer": "gpt2",
    }


def test_tokenize_table(gpt2_tokenizer, capsys):
    assert main(["tokenize", "Hello world"]) == 0
    out = capsys.readouterr().out
    assert "15496  'Hello'" in out and "995  ' world'" in out and "2 tokens, 11 bytes (gpt2, 50,257 tokens)" in out


def test_tokenize_with_a_models_own_tokenizer(tinyllm_home, tmp_path, capsys):
    """The default model trains its own BPE: `--model` shows its splits, `--tokenizer` a trained one's by name."""
    from tinyllm.checkpoint import save_checkpoint
    from tinyllm.config import ModelConfig
    from tinyllm.export import export_hf
    from tinyllm.model import GPT
    from tinyllm.tokenizer import save_tokenizer, train_bpe, trained_tokenizers_dir

    tok = train_bpe(["To be, or not to be, that is the question.\n" * 50], vocab_size=300)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(tmp_path / "run" / "best", model=model, tokenizer=tok)
    export_hf(tmp_path / "run" / "best", tmp_path / "hf")
    save_tokenizer(tok, trained_tokenizers_dir() / tok.name)
    expected = {
        "ids": tok.encode("To be, or not"),
        "tokens": tok.token_strings(tok.encode("To be, or not"), escape_partial=True),
    }
    for option in (["--model", str(tmp_path / "run")], ["--model", str(tmp_path / "hf")], ["--tokenizer", tok.name]):
        assert main(["tokenize", "To be, or not", "--json", *option]) == 0
        assert json.loads(capsys.readouterr().out) == {**expected, "tokenizer": tok.name}
    assert main(["tokenize", "x", "--model", str(tmp_path / "nowhere")]) == 2
    assert "no model at" in capsys.readouterr().err


def test_prepare_prints_split_statistics(tinyllm_home, gpt2_tokenizer, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"d{i}.txt").write_text("word " * 50)
    assert main(["prepare", str(corpus), "--val-fraction", "0.2"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["train"], ["val"])}
    assert lines["train"][1] == "4" and lines["val"][1] == "1"
    assert lines["train"][2] == "1,000"  # 4 documents x 250 bytes
    assert lines["train"][3] == "208"  # 50 words, the trailing space, end-of-text: 52 per document


@pytest.mark.skipif(sys.platform != "linux", reason="file names are bytes on Linux only")
def test_a_file_name_that_is_not_utf8_prints_escaped(tinyllm_home, gpt2_tokenizer, tmp_path):
    """It raised UnicodeEncodeError in the summary, after the work was done."""
    folder = os.fsencode(tmp_path) + b"/caf\xe9"
    os.mkdir(folder)
    for name in (b"a.txt", b"b.txt"):
        with open(folder + b"/" + name, "w") as f:
            f.write("word " * 50)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}  # strict, whatever this machine's locale
    cmd = [sys.executable, "-m", "tinyllm", "prepare", os.fsdecode(folder), "--val-fraction", "0.5"]
    proc = subprocess.run(cmd, capture_output=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"sources: caf\\udce9)" in proc.stdout and b"Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prepare", "/definitely/missing.txt"], "no such file or folder"),
        (["prepare", "--val-fraction", "2"], "val_fraction must be in [0, 1)"),
    ],
)
def test_user_errors_exit_2_with_one_line(tinyllm_home, argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_generate_and_evaluate_reject_bad_values_before_loading(tinyllm_home, tmp_path, capsys):
    """Each used to end in a traceback (some after the whole evaluation had run)."""
    from tinyllm.checkpoint import save_checkpoint
    from tinyllm.config import ModelConfig
    from tinyllm.model import GPT

    save_checkpoint(tmp_path / "ckpt", model=GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)))
    generate = ["generate", "--model", str(tmp_path / "ckpt"), "--prompt", "x", "--max-new-tokens", "2"]
    if not torch.cuda.is_available():
        assert main([*generate, "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert main([*generate, "--device", "bogus"]) == 2
    assert "unknown device 'bogus'" in capsys.readouterr().err
    for option, value, message in (("--top-p", "1.5", "--top-p must be in (0, 1]"), ("--min-p", "2", "--min-p must")):
        assert main([*generate, option, value]) == 2  # named as the option the user typed, not the field
        assert message in capsys.readouterr().err
    for argv in ([*generate, "--seed", str(10**20)], [*generate, "--seed", "-1"], ["evaluate", "--context", "0"]):
        with pytest.raises(SystemExit) as info:  # argparse's own usage error
            main(argv)
        assert info.value.code == 2
        assert "expected" in capsys.readouterr().err
    (tmp_path / "taken").write_text("a file, not a folder")
    report = ["evaluate", "--model", str(tmp_path / "ckpt"), "--report", str(tmp_path / "taken" / "r")]
    assert main(report) == 2
    err = capsys.readouterr().err.strip()
    assert "--report" in err and "cannot create that directory" in err and len(err.splitlines()) == 1


def test_tokenize_takes_text_that_is_not_utf8_and_pipes_close_quietly(gpt2_tokenizer, capsys, monkeypatch):
    assert main(["tokenize", "caf\udce9"]) == 0  # how Python hands over argv bytes that are not UTF-8
    assert "\ufffd" in capsys.readouterr().out

    def closed(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("builtins.print", closed)  # `tinyllm tokenize ... | head -0`
    assert main(["tokenize", "hello"]) == 141


def test_generate_samples_as_the_seed_route_does(tinyllm_home, gpt2_tokenizer, tmp_path, capsys):
    """One set of defaults: the same prompt and seed give the same text on the command line and from
    /generate/custom (the CLI had no repetition penalty and 128 tokens; the route 1.2 and 64)."""
    from fastapi.testclient import TestClient

    from tinyllm.checkpoint import save_checkpoint
    from tinyllm.config import ModelConfig
    from tinyllm.model import GPT
    from tinyllm.server import ServerSettings, create_app

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ckpt", model=GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=128)))
    assert main(["generate", "--model", str(tmp_path / "ckpt"), "--prompt", "Once upon", "--seed", "7"]) == 0
    printed = capsys.readouterr().out.removesuffix("\n")  # print()'s own newline
    settings = ServerSettings(checkpoint=str(tmp_path / "ckpt"), gpt2=None, slots=1, compile=False)
    with TestClient(create_app(settings), base_url="http://localhost") as client:
        served = client.post("/generate/custom", json={"prompt": "Once upon", "seed": 7}).json()["generated_text"]
    assert printed == served and len(printed) > len("Once upon")


def test_generate_says_when_the_context_cut_the_text_short(tinyllm_home, gpt2_tokenizer, tmp_path, caplog):
    from tinyllm.checkpoint import save_checkpoint
    from tinyllm.config import ModelConfig
    from tinyllm.model import GPT

    save_checkpoint(tmp_path / "ckpt", model=GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)))
    argv = ["generate", "--model", str(tmp_path / "ckpt"), "--prompt", "To be", "--ignore-eos", "--seed", "1"]
    assert main([*argv, "--max-new-tokens", "40"]) == 0
    assert "stopped after 14 of --max-new-tokens 40" in caplog.text and "context (16 tokens)" in caplog.text
    caplog.clear()
    assert main([*argv, "--max-new-tokens", "4"]) == 0
    assert "stopped after" not in caplog.text


def test_compare_with_nothing_to_compare_is_an_error(tinyllm_home, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/default here
    assert main(["compare", "--gpt2", "none"]) == 2
    assert "nothing to compare" in capsys.readouterr().err
    # GPT-2 alone, and its weights are not there: an error too, not an empty comparison that exits 0
    assert main(["compare", "--gpt2", str(tmp_path / "no-gpt2-here")]) == 2
    err = capsys.readouterr().err
    assert "nothing to compare: GPT-2 is unavailable" in err and "no-gpt2-here" in err


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["nope"])
    assert info.value.code == 2


def test_tokenizer_train_then_prepare_with_it(tinyllm_home, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"d{i}.txt").write_text(f"Act {i}. Enter the king, the queen and the fool.\n" * 40)
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--val-fraction", "0.2"]) == 0
    name = capsys.readouterr().out.split()[1].rstrip(":")
    # a tiny corpus may offer fewer merges than asked for; the name carries the real size
    assert re.fullmatch(r"bpe\d+-[0-9a-f]{10}", name) and int(name[3:].split("-")[0]) <= 300
    assert (tinyllm_home / "tokenizers" / name / "tokenizer.json").exists()
    assert main(["prepare", str(corpus), "--val-fraction", "0.2", "--tokenizer", name]) == 0
    out = capsys.readouterr().out
    assert f"tokenizer {name}" in out
    train_row = next(line.split() for line in out.splitlines() if line.startswith("train"))
    assert float(train_row[4]) > 3  # a tokenizer trained on this text packs several bytes per token


def test_train_summary_is_printed_once_on_a_terminal(capsys):
    """The summary goes to stdout for scripts and redirects, but not where stdout and stderr are one terminal:
    the training log has just shown that line there."""
    from types import SimpleNamespace

    from tinyllm import cli

    result = SimpleNamespace(rank=0, summary=lambda: "trained 2 steps")
    cli._print_summary(result)  # captured streams are no terminal
    assert capsys.readouterr().out == "trained 2 steps\n"
    cli._print_summary(SimpleNamespace(rank=1, summary=lambda: "rank 1"))  # only rank 0 speaks
    assert capsys.readouterr().out == ""

    leader, follower = os.openpty()
    other_leader, other_follower = os.openpty()
    read, write = os.pipe()
    with (
        open(follower, "w", closefd=False) as tty,
        open(os.dup(follower), "w") as same_tty,
        open(other_follower, "w", closefd=False) as other_tty,
        open(write, "w", closefd=False) as pipe,
    ):
        assert cli._same_terminal(tty, same_tty)
        assert not cli._same_terminal(tty, other_tty)  # two terminals: each gets its own copy
        assert not cli._same_terminal(pipe, tty) and not cli._same_terminal(tty, pipe)
    for fd in (leader, follower, other_leader, other_follower, read, write):
        os.close(fd)


def test_hub_warnings_print_once(capfd, caplog):
    """huggingface_hub's own handler printed each of its warnings a second time beside ours (no time stamp)."""
    import logging

    import huggingface_hub.utils.logging  # noqa: F401 (imported, as loading GPT-2 does: its handler is there)

    from tinyllm import logs

    logs.one_line_per_record()
    logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
    assert [r.getMessage() for r in caplog.records] == ["Retrying in 1s [Retry 1/5]."]  # to our handlers
    assert "Retrying" not in capfd.readouterr().err  # and not through one of its own
