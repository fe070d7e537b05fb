"""Hot swap of weights in the running daemon (issue 5): real `upscaled serve` subprocesses, real
checkpoints published into a real models folder, real image files.

Two daemon starts in all: one for the swap under a stream of files (+ rollback), one for the
whole sequence of refused candidates.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.atomic import atomic_write_text
from model import store
from model.checkpoint import BUNDLED_DEFAULT, META_KEY, read_info, save_checkpoint
from model.engine import EngineOptions, Upscaler
from model.generator import GeneratorConfig
from tests.conftest import run_cli, tiny_generator
from tests.daemon_helpers import files_under, make_config, serve, stop, wait_for, write_image

TINY = GeneratorConfig(scale=4, channels=8, blocks=1)
DONE_LINE = re.compile(r"done (\S+): .*; model (\S+)$")


def checkpoint(path: Path, seed: int, cfg: GeneratorConfig = TINY, nan: bool = False) -> str:
    g = tiny_generator(cfg, seed=seed)
    if nan:
        with torch.no_grad():
            next(g.parameters()).view(-1)[0] = float("nan")
    return save_checkpoint(path, g).version


def status(root: Path) -> dict:
    try:
        return json.loads((root / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def done_lines(log: Path) -> dict[str, list[str]]:
    """file -> the model versions its `done` log lines name."""
    out: dict[str, list[str]] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = DONE_LINE.search(line)
        if m:
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


def drop(inbox: Path, name: str, seed: int) -> None:
    """Write under a hidden name and rename in: ready at once."""
    tmp = write_image(inbox / f".{name}", w=24, h=20, seed=seed)
    tmp.rename(inbox / name)


def daemon(tmp_path: Path, first: Path):
    root = tmp_path / "srv"
    root.mkdir()
    store.publish(root / "models", first)
    cfg, config = make_config(root, first, model={"path": None}, inference={"precision": "fp32"},
                              watch={"settle_seconds": 0.2, "rescan_interval": 1.0})
    log = root / "daemon.log"
    proc = serve(config, log=log)
    try:
        wait_for(lambda: status(root).get("state") == "running" or proc.poll() is not None, 60, what="daemon start")
    except AssertionError:
        stop(proc)
        raise
    assert proc.poll() is None, log.read_text()
    return root, config, log, proc


def test_swap_under_a_stream_of_files_then_rollback(tmp_path):
    v1 = checkpoint(tmp_path / "v1.safetensors", seed=1)
    v2 = checkpoint(tmp_path / "v2.safetensors", seed=2)
    root, config, log, proc = daemon(tmp_path, tmp_path / "v1.safetensors")
    inbox = root / "inbox"
    try:
        st = status(root)
        assert st["model_version"] == v1 and st["model"]["origin"] == "published" and st["model"]["watching"]
        names = [f"img{i:02d}.png" for i in range(30)]
        after_swap: list[str] = []  # dropped once the status named v2: must be upscaled by v2
        swapped_in = None
        for i, name in enumerate(names):
            if i == 10:
                # The first files are done (by v1) before the publish, however loaded the machine is.
                wait_for(lambda: {"img00.png", "img01.png", "img02.png"} <= done_lines(log).keys(), 30, what="first files")
                published_at = time.monotonic()
                store.publish(root / "models", tmp_path / "v2.safetensors")
            if swapped_in is None and i > 10 and status(root).get("model_version") == v2:
                swapped_in = time.monotonic() - published_at
            if swapped_in is not None:
                after_swap.append(name)
            drop(inbox, name, seed=i)
            time.sleep(0.1)
        wait_for(lambda: len(files_under(root / "done")) == 30, 60, what="30 files done")
        if swapped_in is None:
            wait_for(lambda: status(root).get("model_version") == v2, 10, what="status naming v2")
            swapped_in = time.monotonic() - published_at
        assert swapped_in < 10, f"the status named the new model only after {swapped_in:.1f} s"
        assert files_under(root / "failed") == []
        assert files_under(root / "outbox") == sorted(names)

        # Each file: one log line naming one version; once v2 served, every later file is v2.
        wait_for(lambda: len(done_lines(log)) == 30, 10, what="30 done log lines")
        used = done_lines(log)
        assert all(len(v) == 1 for v in used.values()), used
        used = {k: v[0] for k, v in used.items()}
        assert set(used.values()) == {v1, v2}, used
        assert all(used[n] == v2 for n in after_swap), (after_swap, used)
        assert all(used[n] == v1 for n in names[:3]), used  # upscaled long before the publish

        # ... and its pixels are that version's, not a mix (the other version is far away).
        ups = {v: Upscaler(*load(tmp_path / f"{v_}.safetensors"), EngineOptions(device="cpu", precision="fp32"))
               for v, v_ in ((v1, "v1"), (v2, "v2"))}
        for name in names:
            rgb = np.asarray(Image.open(root / "done" / name).convert("RGB"), np.float32) / 255.0
            out = np.asarray(Image.open(root / "outbox" / name).convert("RGB"), np.int16)
            diff = {v: np.abs(out - u.upscale_rgb(rgb).astype(np.int16)).max() for v, u in ups.items()}
            other = v1 if used[name] == v2 else v2
            assert diff[used[name]] <= 2 < diff[other], (name, used[name], diff)

        st = wait_for(lambda: (s := status(root)).get("processed") == 30 and s, 10, what="status counting 30")
        assert st["processed_by_model"] == {v1: sum(v == v1 for v in used.values()), v2: sum(v == v2 for v in used.values())}
        assert {r["file"]: r["model_version"] for r in st["recent"]}.items() <= used.items()
        assert st["model"]["origin"] == "published" and st["model"]["file"] == f"{v2}.safetensors" and st["model"]["loaded_at"]

        # Rollback: the running daemon switches back to v1.
        r = run_cli("models", "rollback", "--config", str(config))
        assert r.returncode == 0, r.stderr
        wait_for(lambda: status(root).get("model_version") == v1, 15, what="rollback to v1 in the daemon")
        drop(inbox, "after-rollback.png", seed=99)
        wait_for(lambda: "after-rollback.png" in done_lines(log), 20, what="a file after the rollback")
        assert done_lines(log)["after-rollback.png"] == [v1]
        assert "refused" not in log.read_text()
    finally:
        assert stop(proc) == 0, log.read_text()[-3000:]


def load(path: Path):
    from model.checkpoint import load_generator

    return load_generator(path)


def signed(models: Path, name: str, digest: str | None = None) -> None:
    """Record `name` as publish would (signed with the folder's key) and point `current` at it,
    without publish's load check: the daemon's own verification is what these tests exercise.
    `digest`: the sha256 to record (default: the file's own)."""
    digest = digest or store.sha256_of(models / name)
    rec = store.Record(name, digest, store._mac(store._key(models, create=True), name, digest))
    store._write_records(models, {**store.records(models), name: rec})
    atomic_write_text(models / store.CURRENT, rec.line() + "\n")


def wrong_arch(path: Path) -> None:
    """A well-formed safetensors whose upscaled metadata names an unknown architecture."""
    from safetensors.torch import save_file

    meta = {"format_version": 1, "arch": "foo", "generator": TINY.to_dict(), "scale": 4,
            "version": "foo-1", "created": "2026-11-25T00:00:00+00:00", "step": 0}
    save_file({"w": torch.zeros(3, 3)}, str(path), metadata={META_KEY: json.dumps(meta)})


def test_bad_candidates_are_refused_and_the_old_model_keeps_serving(tmp_path):
    v1 = checkpoint(tmp_path / "v1.safetensors", seed=1)
    checkpoint(tmp_path / "good.safetensors", seed=3)
    root, config, log, proc = daemon(tmp_path, tmp_path / "v1.safetensors")
    models, inbox = root / "models", root / "inbox"

    def bad(name: str, make) -> str:
        make(models / name)
        return name

    def truncated(p: Path) -> None:
        data = (tmp_path / "good.safetensors").read_bytes()
        p.write_bytes(data[: len(data) // 2])

    cases = [  # (file in the models folder, words the reason must contain)
        (bad("truncated.safetensors", truncated), "damaged safetensors data"),
        (bad("nan.safetensors", lambda p: checkpoint(p, seed=4, nan=True)), "contains NaN"),
        (bad("foo.safetensors", wrong_arch), "architecture 'foo'"),
        (bad("pickle.safetensors", lambda p: torch.save(tiny_generator(TINY, 5).state_dict(), p)), "PyTorch/pickle file"),
        (bad("x2.safetensors", lambda p: checkpoint(p, seed=6, cfg=GeneratorConfig(scale=2, channels=8, blocks=1))),
         "x2 model"),
        ("missing.safetensors", "names missing.safetensors, which is not in"),
    ]
    try:
        for i, (name, words) in enumerate(cases):
            if (models / name).exists():
                signed(models, name)  # bypasses promote's checks
            else:  # recorded as the good model it will become (below), but not there yet
                signed(models, name, store.sha256_of(tmp_path / "good.safetensors"))
            st = wait_for(lambda: (s := status(root)).get("model", {}).get("refused") and
                          s["model"]["refused"]["file"] == name and s, 15, what=f"{name} refused")
            reason = st["model"]["refused"]["reason"].replace(str(models / name), "")  # not the file name
            assert words in reason, st["model"]["refused"]
            assert st["model_version"] == v1 and st["model"]["file"] == f"{v1}.safetensors"
            img = f"during-{i}.png"
            drop(inbox, img, seed=i)
            wait_for(lambda: img in done_lines(log), 20, what=f"{img} processed")
            assert done_lines(log)[img] == [v1]  # the old model still serves
        # Refused once each: no retry loop while the pointer stays on the last one.
        time.sleep(1.0)
        text = log.read_text()
        for name, _ in cases:
            assert len(re.findall(rf"model {re.escape(name)} refused", text)) == 1, text[-3000:]
        # SIGHUP (systemctl reload) gives the refused pointer exactly one more try.
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: log.read_text().count("model missing.safetensors refused") == 2, 15, what="a retry on SIGHUP")
        time.sleep(0.5)
        assert log.read_text().count("model missing.safetensors refused") == 2
        r = run_cli("status", "--config", str(config))
        assert r.returncode == 0 and "refused:     missing.safetensors" in r.stdout and f"model:       {v1}" in r.stdout, r.stdout

        # The missing file appears (same name, now a good model): tried again, and served.
        shutil.copyfile(tmp_path / "good.safetensors", models / "missing.safetensors")
        good = read_info(models / "missing.safetensors").version
        wait_for(lambda: status(root).get("model_version") == good, 15, what="the file that appeared")

        # Pointer removed: back to the bundled default (verified the same way).
        (models / "current").unlink()
        st = wait_for(lambda: (s := status(root)).get("model", {}).get("origin") == "bundled" and s, 40,
                      what="bundled default")
        assert st["model_version"] == read_info(BUNDLED_DEFAULT).version

        # Rollback to a named version restores it in the running daemon.
        r = run_cli("models", "rollback", v1, "--config", str(config))
        assert r.returncode == 0, r.stderr
        wait_for(lambda: status(root).get("model_version") == v1, 15, what="rollback to v1")
        assert files_under(root / "failed") == []
    finally:
        assert stop(proc) == 0, log.read_text()[-3000:]


def test_configured_model_path_pins_the_service(tmp_path):
    """With model.path set, a published model is not picked up (the log and status say so)."""
    from daemon.service import Service

    ckpt = tmp_path / "pinned.safetensors"
    v = checkpoint(ckpt, seed=7)
    checkpoint(tmp_path / "other.safetensors", seed=8)
    root = tmp_path / "srv"
    root.mkdir()
    cfg, _ = make_config(root, ckpt)
    svc = Service(cfg)
    try:
        svc.startup()
        store.publish(root / "models", tmp_path / "other.safetensors")
        svc.tick(time.monotonic())
        time.sleep(0.3)
        svc.tick(time.monotonic())
        assert svc.slot.pinned and svc.slot._thread is None
        assert svc.worker.upscaler.version == v
        st = status(root)
        assert st["model"]["origin"] == "configured" and st["model_version"] == v
    finally:
        svc.begin_stop("test")
        svc.shutdown()


def in_process(tmp_path: Path, ckpt: Path, **sections):
    from daemon.service import Service

    root = tmp_path / "srv"
    root.mkdir()
    cfg, _ = make_config(root, ckpt, model={"path": None}, **sections)
    return root, Service(cfg)


def test_the_old_model_is_freed_after_the_swap(tmp_path):
    import gc
    import weakref

    checkpoint(tmp_path / "v1.safetensors", seed=1)
    v2 = checkpoint(tmp_path / "v2.safetensors", seed=2)
    root, svc = in_process(tmp_path, tmp_path / "v1.safetensors")
    store.publish(root / "models", tmp_path / "v1.safetensors")
    try:
        svc.startup()
        old = weakref.ref(svc.worker.upscaler)
        store.publish(root / "models", tmp_path / "v2.safetensors")

        def swapped():
            svc.tick(time.monotonic())
            return svc.board.model_version == v2

        wait_for(swapped, 20, every=0.05, what="swap to v2")
        gc.collect()
        assert old() is None, gc.get_referrers(old())
        assert svc.board.model["version"] == v2 and svc.board.model["loading"] is None
    finally:
        svc.begin_stop("test")
        svc.shutdown()


def test_a_bad_current_at_start_up_falls_back_to_the_bundled_default(tmp_path):
    checkpoint(tmp_path / "v1.safetensors", seed=1)
    root, svc = in_process(tmp_path, tmp_path / "v1.safetensors")
    (root / "models").mkdir()
    checkpoint(root / "models" / "nan.safetensors", seed=4, nan=True)
    signed(root / "models", "nan.safetensors")
    try:
        svc.startup()
        assert svc.upscaler.version == read_info(BUNDLED_DEFAULT).version
        st = status(root)
        assert st["model"]["origin"] == "bundled"
        assert st["model"]["refused"]["file"] == "nan.safetensors" and "NaN" in st["model"]["refused"]["reason"]
        svc.tick(time.monotonic())
        assert svc.slot._thread is None  # the refused pointer is not retried
    finally:
        svc.begin_stop("test")
        svc.shutdown()


def unit_lines(name: str) -> list[str]:
    from tests.conftest import ROOT

    return [ln.strip() for ln in (ROOT / "systemd" / name).read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def test_training_units(tmp_path):
    """The timer and the oneshot unit: settings, same sandbox as the daemon, and the ExecStart
    shell really resolves the served checkpoint for --init."""

    svc, timer, daemon_unit = (unit_lines(n) for n in ("upscaled-train.service", "upscaled-train.timer", "upscaled.service"))
    for want in ("Type=oneshot", "Nice=19", "IOSchedulingClass=idle", "CPUWeight=20", "User=upscaled", "SuccessExitStatus=130"):
        assert want in svc, want
    for want in ("OnCalendar=weekly", "Persistent=true", "RandomizedDelaySec=1h", "WantedBy=timers.target"):
        assert want in timer, want
    sandbox = [ln for ln in daemon_unit if ln.split("=")[0] in (
        "ProtectSystem", "ReadWritePaths", "ProtectHome", "PrivateTmp", "NoNewPrivileges", "ProtectKernelTunables",
        "ProtectKernelModules", "ProtectControlGroups", "RestrictSUIDSGID", "LockPersonality", "RestrictAddressFamilies")]
    assert len(sandbox) == 11 and set(sandbox) <= set(svc)

    exec_start = next(ln for ln in svc if ln.startswith("ExecStart="))[len("ExecStart="):]
    assert exec_start.split() == ["/opt/upscaled/.venv/bin/upscaled", "train", "--config", "/etc/upscaled/config.yaml",
                                  "--init", "current", "--publish"]
    # `--init current` resolves to the model served now: the bundled default, then a published one.
    from argparse import Namespace

    from trainer.train import settings
    from core.config import from_dict

    cfg = from_dict({"paths": {"models": str(tmp_path / "models")}})
    args = Namespace(init="current", data=None, paired_lr=None, paired_hr=None, val=None, steps=None, out=None)
    assert settings(cfg, args).init == str(BUNDLED_DEFAULT)
    checkpoint(tmp_path / "v1.safetensors", seed=1)
    target = store.publish(tmp_path / "models", tmp_path / "v1.safetensors")
    assert settings(cfg, args).init == str(target)
