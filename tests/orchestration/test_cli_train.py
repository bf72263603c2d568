"""`ultramem train --local` and `ultramem generate`, end to end and on user mistakes."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from orchestration.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _ultramem(*args: str, cache: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "ULTRAMEM_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, check=False, text=True, timeout=timeout)


@pytest.mark.slow
def test_train_local_tiny_then_resume_then_generate(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cache = tmp_path / "cache"
    done = _ultramem("train", "--local", "--preset", "tiny", "--max-steps", "4", "--out", str(run),
                     "--set", "train.checkpoint_every=2", "--no-progress", cache=cache)
    assert done.returncode == 0, done.stderr
    assert "val loss:" in done.stdout and "unigram:" in done.stdout and "tokens/s" in done.stdout
    assert (run / "checkpoints" / "step-4" / "manifest.json").is_file()
    saved = tomllib.loads((run / "config.toml").read_text())
    assert saved["train"]["max_steps"] == 4 and saved["model"]["d_model"] == 64

    # resume from the run directory: the saved config comes back, --max-steps extends it
    more = _ultramem("train", "--local", "--resume", str(run), "--max-steps", "6", "--no-progress", cache=cache)
    assert more.returncode == 0, more.stderr
    assert "steps:          6" in more.stdout
    assert (run / "checkpoints" / "step-6" / "manifest.json").is_file()

    gen = _ultramem("generate", "--checkpoint", str(run), "--max-tokens", "12", "The Congress", cache=cache)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("The Congress") and len(gen.stdout.strip()) > len("The Congress")
    again = _ultramem("generate", "--checkpoint", str(run / "checkpoints" / "step-6"), "--max-tokens", "12",
                      "The Congress", cache=cache)
    assert again.stdout == gen.stdout  # same seed, same checkpoint: same text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--local", "--preset", "tiny", "--set", "model.d_modle=3"], "valid keys in [model]"),
        (["train", "--local", "--preset", "nope"], "unknown preset 'nope'"),
        (["train", "--local", "--preset", "tiny", "--shards", "2"], "--shards"),
        (["train", "--local", "--resume", "/nonexistent/run"], "cannot resume"),
        (["generate", "--checkpoint", "/nonexistent/run", "hi"], "cannot load checkpoint"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture,
                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a default run directory would land here
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ultramem: error:") and message in err and "\n" not in err


def test_generate_refuses_an_unfinished_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "step-5").mkdir()
    assert main(["generate", "--checkpoint", str(tmp_path / "step-5"), "hi"]) == 2
    assert "unfinished checkpoint" in capsys.readouterr().err
