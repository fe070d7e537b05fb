"""`models promote`, `models list` and the web page's model list say what the running daemon
really serves, apart from the `current` pointer, and a refusal with its reason.

The daemon (a real `upscaled serve`) runs with models.probe_tolerance_db 0 while the command
line is given 100: its environment judges a candidate more strictly than the command that
promotes it, as after extras changed torch under a running daemon. A tiny untrained network
whose metadata claims +2 dB over bicubic then passes `promote --force` and is refused by the
daemon (its probe trails bicubic)."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from daemon_helpers import TINY, make_config, serve, stop, tiny_checkpoint, wait_for
from model.checkpoint import read_info, save_checkpoint
from model.generator import Generator
from model.store import publish
from upscaled.models_cmd import daemon_model
from web.models import listing

LOOSE = ("--set", "models.probe_tolerance_db=100")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("verdict")
    served = tiny_checkpoint(root / "a.safetensors")
    publish(root / "models", served)
    cfg, config = make_config(root, served, model={"path": None}, models={"probe_tolerance_db": 0.0})
    proc = serve(config, log=root / "serve.log")
    try:
        wait_for(lambda: (daemon_model(cfg) or {}).get("version") == read_info(served).version, 60, 0.2,
                 "the daemon to serve a.safetensors")
        yield {"root": root, "cfg": cfg, "config": str(config), "served": read_info(served).version}
    finally:
        stop(proc)


def test_promote_reports_the_daemons_refusal_and_list_shows_what_it_really_serves(daemon):
    root, config = daemon["root"], daemon["config"]
    liar = root / "liar.safetensors"
    save_checkpoint(liar, Generator(TINY).eval(), step=5,
                    validation={"data": "val", "metrics": {"psnr_y": 30.0, "bicubic_psnr_y": 28.0}})
    liar_version = read_info(liar).version
    r = run_cli("models", "promote", str(liar), "--force", "--config", config, *LOOSE)
    assert r.returncode == 1, r.stderr
    assert f"the running daemon refused {liar_version}" in r.stderr and "below bicubic" in r.stderr, r.stderr
    assert f"still serves {daemon['served']}" in r.stderr

    r = run_cli("models", "list", "--config", config)
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()
    liar_row = next(line for line in rows if liar_version in line)
    served_row = next(line for line in rows if line[3:].startswith(daemon["served"]))
    assert liar_row.startswith("* ") and served_row.startswith(" >"), r.stdout  # current, but not what is served
    assert f"the daemon refused the current model {liar_version}" in r.stdout and "below bicubic" in r.stdout
    listed = json.loads(run_cli("models", "list", "--json", "--config", config).stdout)
    assert listed["served"] == daemon["served"] and listed["current"] == f"{liar_version}.safetensors"
    assert [v["version"] for v in listed["versions"] if v["served"]] == [daemon["served"]]

    # The web page's list, built from the same status
    d = daemon_model(daemon["cfg"])
    page = listing(daemon["cfg"], d["version"], d["refused"])
    row = next(m for m in page["models"] if m.get("version") == liar_version)
    assert row["current"] and not row["served"] and "below bicubic" in row["refused"]["reason"]
    assert next(m for m in page["models"] if m.get("version") == daemon["served"])["served"]


def test_promote_waits_for_the_daemon_to_serve_a_model_it_accepts(daemon):
    root, config = daemon["root"], daemon["config"]
    plain = root / "plain.safetensors"
    save_checkpoint(plain, Generator(TINY).eval(), step=9)  # no claims: the probe only has to run
    version = read_info(plain).version
    r = run_cli("models", "promote", str(plain), "--force", "--config", config, *LOOSE)
    assert r.returncode == 0, r.stderr
    assert f"the running daemon now serves {version}" in r.stderr, r.stderr
    assert daemon_model(daemon["cfg"])["version"] == version  # already, when promote returned
