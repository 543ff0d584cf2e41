"""Export to a Hugging Face GPT-2 directory: transformers loads it with the same logits and the same token ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tinyllm import assets
from tinyllm.checkpoint import CheckpointError, save_checkpoint
from tinyllm.cli import main
from tinyllm.config import ModelConfig
from tinyllm.export import ExportError, export_hf
from tinyllm.model import GPT

transformers = pytest.importorskip("transformers")

TEXT = "Hello, world!  It's 2026 — naïve café, 日本語 🤖.\n\n\tTabs   and    spaces... don't we'll I'M <|endoftext|>"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT, Path]:
    if not assets.gpt2_ranks_path().exists():
        pytest.skip("GPT-2 BPE ranks not fetched; run `tinyllm fetch-assets` (make test does)")
    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()  # GPT-2's 50257 tokens
    root = tmp_path_factory.mktemp("export")
    save_checkpoint(root / "run" / "best", model=model, meta={"step": 1})
    assert main(["export", str(root / "run"), str(root / "hf")]) == 0  # the CLI finds run/best
    return model, root / "hf"


def test_transformers_logits_match(exported: tuple[GPT, Path]) -> None:
    model, out = exported
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-5, rtol=1e-5)


def test_transformers_tokenizer_matches_ours(exported: tuple[GPT, Path]) -> None:
    from tinyllm.tokenizer import get_tokenizer

    _, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = get_tokenizer()
    assert "<|endoftext|>" in TEXT  # text spelling the special token stays text in both (split_special_tokens)
    assert hf_tok.encode(TEXT) == ours.encode(TEXT) and 50256 not in hf_tok.encode(TEXT)
    assert hf_tok.decode(ours.encode(TEXT)) == TEXT
    assert hf_tok.eos_token_id == 50256 and hf_tok.convert_ids_to_tokens(50256) == "<|endoftext|>"


def test_vocab_and_merges_sizes(exported: tuple[GPT, Path]) -> None:
    _, out = exported
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 50257 and sorted(vocab.values()) == list(range(50257))
    assert vocab["Ġthe"] == 262 and vocab["<|endoftext|>"] == 50256
    lines = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) - 1 == 50000
    assert lines[1:4] == ["Ġ t", "Ġ a", "h e"]  # OpenAI's first merges
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["n_positions"] == 32 and config["vocab_size"] == 50257


def test_export_replaces_an_earlier_export_atomically(exported: tuple[GPT, Path]) -> None:
    _, out = exported
    ckpt = out.parent / "run" / "best"
    export_hf(ckpt, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf", "run"]  # no temp or old dirs left


def test_export_that_cannot_write_is_one_line_and_changes_nothing(
    exported: tuple[GPT, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A full disk or read-only target printed the raw OSError, naming the staging directory."""
    from tinyllm import export

    _, out = exported
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "save_file", full)
    assert main(["export", str(out.parent / "run"), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tinyllm export: error: cannot write {out} (No space left on device)"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf", "run"]  # no staging directory left


def test_export_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        export_hf(tmp_path / "missing", tmp_path / "out")
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tinyllm export: error: no checkpoint at")
    small = save_checkpoint(tmp_path / "small", model=GPT(ModelConfig(vocab_size=61, n_layer=1, n_head=2, n_embd=16)))
    with pytest.raises(ExportError, match="vocab_size 61"):
        export_hf(small, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_trained_tokenizer_travels_with_checkpoint_and_export(tmp_path: Path) -> None:
    from tinyllm.checkpoint import load_checkpoint
    from tinyllm.tokenizer import train_bpe

    corpus = ["Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 30, "café 日本 🙂\n"]
    tok = train_bpe(corpus, vocab_size=320)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32)).eval()
    save_checkpoint(tmp_path / "ckpt", model=model, tokenizer=tok)
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.meta["tokenizer"] == tok.name
    assert ckpt.tokenizer().encode(corpus[0]) == tok.encode(corpus[0])
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in [*corpus, "Unseen words, glorious wïnter!", "a <|endoftext|> b"]:
        assert hf_tok.encode(text) == tok.encode(text)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.tensor([tok.encode(corpus[0])[:32]])
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-5, rtol=1e-5)


def test_exported_bpe_model_loads_back_with_its_own_tokenizer(tmp_path: Path, capsys) -> None:
    """`--model EXPORTED_DIR` used to pair the weights with GPT-2's tokenizer: ids from the wrong vocabulary,
    text decoded as gibberish. The directory's vocab.json now rebuilds the model's own BPE, same name."""
    from tinyllm.checkpoint import resolve_model, tokenizer_from_meta
    from tinyllm.tokenizer import train_bpe

    corpus = ["Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 30]
    tok = train_bpe(corpus, vocab_size=320)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    save_checkpoint(tmp_path / "ckpt", model=model, tokenizer=tok)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")

    loaded, meta = resolve_model(str(tmp_path / "hf"))
    assert meta["kind"] == "gpt2" and meta["tokenizer_dir"] == str(tmp_path / "hf")
    assert tokenizer_from_meta(meta).name == tok.name
    outputs = []
    for source in ("ckpt", "hf"):
        argv = ["generate", "--model", str(tmp_path / source), "--prompt", "Now is the winter", "--max-new-tokens"]
        assert main([*argv, "12", "--temperature", "0"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("Now is the winter")
    # the server's GPT-2 slot (TINYLLM_GPT2=DIR) takes the directory's tokenizer too
    from tinyllm.server.worker import gpt2_loader

    assert gpt2_loader(str(tmp_path / "hf"))().tokenizer.name == tok.name

    # `tinyllm compare --gpt2 DIR`: the same weights on either side score and sample the same
    from tinyllm import evaluate as ev
    from tinyllm.sampling import SamplingParams

    (tmp_path / "heldout.txt").write_text(corpus[0][:600])
    custom, other = ev.compare_models(
        custom=str(tmp_path / "ckpt"),
        gpt2=str(tmp_path / "hf"),
        prompts=["Now is the winter"],
        data=[tmp_path / "heldout.txt"],
        params=SamplingParams(max_new_tokens=8),
    )
    assert other.unavailable is None and custom.eval is not None and other.eval is not None
    assert other.eval.bits_per_byte == pytest.approx(custom.eval.bits_per_byte, rel=1e-6)
    assert [s.text for s in other.samples] == [s.text for s in custom.samples]


def test_a_hub_id_in_the_cache_loads_offline_with_its_own_tokenizer(tmp_path: Path, monkeypatch) -> None:
    """A hub id whose snapshot is in the Hugging Face cache loads with HF_HUB_OFFLINE=1, and takes the vocabulary
    in its repository (it used to get GPT-2's whatever the repository held)."""
    from huggingface_hub import constants

    from tinyllm.checkpoint import model_tokenizer, resolve_model, tokenizer_from_meta
    from tinyllm.tokenizer import gpt2_source_tokenizer, train_bpe

    tok = train_bpe(
        ["Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 30], vocab_size=320
    )
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    save_checkpoint(tmp_path / "ckpt", model=model, tokenizer=tok)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub-cache" / "models--someone--tiny-bpe"
    export_hf(tmp_path / "ckpt", repo / "snapshots" / commit)  # the cache's layout: refs/main names the snapshot
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))

    loaded, meta = resolve_model("someone/tiny-bpe")
    assert meta["kind"] == "gpt2" and meta["source"] == "someone/tiny-bpe"
    assert meta["tokenizer_dir"] == str(repo / "snapshots" / commit)
    assert tokenizer_from_meta(meta).name == tok.name
    assert model_tokenizer("someone/tiny-bpe").name == tok.name == gpt2_source_tokenizer("someone/tiny-bpe").name
    idx = torch.tensor([tok.encode("Now is the winter")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx))
    # GPT-2's own sizes keep GPT-2's tokenizer without asking the hub; a repository without a vocabulary too
    assert model_tokenizer("openai-community/gpt2").name == "gpt2" == gpt2_source_tokenizer("gpt2-medium").name
    (repo / "snapshots" / commit / "vocab.json").unlink()
    assert model_tokenizer("someone/tiny-bpe").name == "gpt2"


def test_export_refuses_a_directory_holding_other_files_and_names_the_tokenizers_end_of_text(tmp_path: Path) -> None:
    """Any GPT-2 directory was replaced whole (a README, a .git, optimizer files beside it were deleted); and a
    vocabulary padded past the tokenizer's got its last padding row as end-of-text."""
    from tinyllm.tokenizer import train_bpe

    tok = train_bpe(
        ["Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 30], vocab_size=300
    )
    torch.manual_seed(0)
    padded = GPT(ModelConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()  # 20 spare rows
    save_checkpoint(tmp_path / "ckpt", model=padded, tokenizer=tok)
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    for name in ("config.json", "generation_config.json"):
        config = json.loads((out / name).read_text())
        assert config["eos_token_id"] == config["bos_token_id"] == tok.eot_token == 299
    (out / "README.md").write_text("the model card someone wrote")
    (out / ".git").mkdir()
    with pytest.raises(CheckpointError, match="refusing to replace it"):
        export_hf(tmp_path / "ckpt", out)
    assert (out / "README.md").read_text() == "the model card someone wrote" and (out / ".git").is_dir()
