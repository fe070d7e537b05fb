"""Arguments are checked before any work, the same way for every command: one line, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli

COMMANDS = [
    ["status"], ["status", "--json"], ["serve", "--once"], ["upscale", "in.png", "-o", "out"], ["eval", "--data", "val"],
    ["train", "--data", "photos", "--steps", "1"], ["web"], ["models", "list"], ["models", "show", "fidelity"],
    ["models", "promote", "fidelity"], ["models", "rollback"], ["models", "import", "x.pth"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_every_command_refuses_an_unknown_set_key(tmp_path: Path, argv: list[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"paths: {{status: {tmp_path / 'status.json'}}}\n")  # a valid file: the --set alone is wrong
    r = run_cli(*argv, "--config", str(config), "--set", "bogus.key=1", cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "bogus" in r.stderr and "Traceback" not in r.stderr and not r.stdout, r.stderr


def test_status_reads_past_a_broken_file_but_not_past_a_wrong_set(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"paths: {{status: {tmp_path / 'status.json'}}}\ndaemon: {{nope: 1}}\n")  # being edited
    assert run_cli("status", "--config", str(config), cwd=tmp_path).returncode == 3  # not running, said despite it
    assert run_cli("status", "--config", str(config), "--set", "daemon.io_workers=2", cwd=tmp_path).returncode == 3
    r = run_cli("status", "--config", str(config), "--set", "daemon.io_workers=many", cwd=tmp_path)
    assert r.returncode == 2 and "io_workers" in r.stderr


def test_import_checks_val_before_reading_the_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes(b"not a checkpoint at all")  # were it read first, this would be the error
    r = run_cli("models", "import", str(ckpt), "--val", str(tmp_path / "no-such-folder"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--val" in lines[0] and "no-such-folder is not a folder" in lines[0], r.stderr
    (tmp_path / "empty").mkdir()
    r = run_cli("models", "import", str(ckpt), "--val", str(tmp_path / "empty"), cwd=tmp_path)
    assert r.returncode == 2 and "holds no image files" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_models_show_is_readable_for_an_imported_model() -> None:
    from upscaled.models_cmd import LICENCE_SHOWN, readable

    licence = "MIT License\n\n" + "Permission is hereby granted, free of charge, " * 40
    row = {"version": "x", "imported": {"architecture": "SPAN", "hyperparameters": {
        "act": "<class 'torch.nn.modules.activation.GELU'>", "norm": ["<class 'LayerNorm'>"], "n": 3},
        "source": {"file": "m.pth", "licence": licence}}}
    shown = readable(row)
    assert shown["imported"]["hyperparameters"] == {"act": "GELU", "norm": ["LayerNorm"], "n": 3}
    assert shown["imported"]["source"]["licence"].startswith("MIT License")
    assert len(shown["imported"]["source"]["licence"]) < LICENCE_SHOWN + 80 and "--json" in shown["imported"]["source"]["licence"]
    assert row["imported"]["source"]["licence"] == licence  # the stored row is untouched
