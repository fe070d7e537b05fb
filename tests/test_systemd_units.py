"""The systemd units: `systemd-analyze verify` accepts them without a word, and
`systemd-analyze security --offline=yes` rates each one at or below its documented threshold
(docs/hardening.md). Skipped only where systemd-analyze is not installed (.ci/run installs it).

Each check runs on a copy of the unit files in a temporary folder, laid out as they are installed:
the GPU drop-in (systemd/upscaled-gpu.conf) becomes upscaled.service.d/gpu.conf beside its unit,
where both verify and security merge it. The copy points ExecStart= at an existing program,
because verify insists that the command exists and /opt/upscaled/.venv is not on a test machine.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parents[1] / "systemd"
ANALYZE = shutil.which("systemd-analyze")
VENV_PROGRAM = "/opt/upscaled/.venv/bin/upscaled"  # ExecStart= of both services

# Overall exposure, as systemd-analyze prints it (0.0 best .. 10.0 worst): the highest score each
# unit may have. Measured with systemd 252 (docs/hardening.md): 0.3, 0.5, 0.3 and 0.5. The daemon's
# limit is the one issue 16 sets; the others are the measured value with a little room.
THRESHOLDS = {
    "daemon-cpu": 3.0,
    "daemon-gpu": 0.7,
    "trainer-cpu": 0.5,
    "trainer-gpu": 0.7,
    "learner-cpu": 0.5,  # upscaled-learn.service: the trainer's sandbox
    "web": 1.3,  # measured 1.1: it must have the network (AF_INET, AF_INET6), loopback peers only
}
VARIANTS = {  # name: (the service, its drop-ins (installed as SERVICE.d/gpu.conf), other units verified with it)
    "daemon-cpu": ("upscaled.service", [], []),
    "daemon-gpu": ("upscaled.service", ["upscaled-gpu.conf"], []),
    "trainer-cpu": ("upscaled-train.service", [], ["upscaled-train.timer"]),
    "trainer-gpu": ("upscaled-train.service", ["upscaled-train-gpu.conf"], ["upscaled-train.timer"]),
    "learner-cpu": ("upscaled-learn.service", [], ["upscaled-learn.timer"]),
    "web": ("upscaled-web.service", [], []),
}

needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd)")


def stage(folder: Path, variant: str, edit=None) -> Path:
    """Copy a variant's files into `folder` as installed; returns the service's path there.
    `edit(text) -> text` changes the service file (not its drop-ins)."""
    service, dropins, others = VARIANTS[variant]
    placed = {rel: rel for rel in [service, *others]}
    placed.update({rel: f"{service}.d/gpu.conf" for rel in dropins})
    for rel, dst_rel in placed.items():
        dst = folder / dst_rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        text = (SYSTEMD / rel).read_text()
        if rel.endswith(".service"):
            assert VENV_PROGRAM in text, f"{rel}: ExecStart= no longer runs {VENV_PROGRAM}; update this test"
            text = text.replace(VENV_PROGRAM, shutil.which("true") or "/bin/true")
            if edit is not None:
                text = edit(text)
        dst.write_text(text)
    return folder / service


def verify(*units: Path) -> subprocess.CompletedProcess:
    return subprocess.run([ANALYZE, "verify", "--man=no", *map(str, units)],
                          capture_output=True, text=True, timeout=60)


def exposure(unit: Path) -> float:
    r = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager", str(unit)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, f"no exposure level in the output of systemd-analyze security:\n{r.stdout}\n{r.stderr}"
    return float(m.group(1))


def without(*prefixes: str):
    """An edit that drops every line starting with one of `prefixes`."""
    def edit(text: str) -> str:
        kept = [line for line in text.splitlines() if not line.startswith(prefixes)]
        assert len(kept) < len(text.splitlines()), f"none of {prefixes} in the unit"
        return "\n".join(kept) + "\n"
    return edit


@needs_analyze
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_verify_is_silent(variant, tmp_path):
    service = stage(tmp_path, variant)
    others = [tmp_path / rel for rel in VARIANTS[variant][2]]
    r = verify(service, *others)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


@needs_analyze
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_exposure_at_or_below_threshold(variant, tmp_path):
    score = exposure(stage(tmp_path, variant))
    assert score <= THRESHOLDS[variant], f"{variant}: exposure {score} above its threshold {THRESHOLDS[variant]}"


@needs_analyze
def test_threshold_option_agrees(tmp_path):
    """.ci/run relies on --threshold= (exposure x 10) failing above the limit."""
    service = stage(tmp_path, "daemon-cpu")
    args = [ANALYZE, "security", "--offline=yes", "--no-pager", str(service)]
    limit = round(THRESHOLDS["daemon-cpu"] * 10)
    assert subprocess.run([*args, f"--threshold={limit}"], capture_output=True).returncode == 0
    assert subprocess.run([*args, "--threshold=0"], capture_output=True).returncode != 0


@needs_analyze
@pytest.mark.parametrize("line", [
    "PrivateNetwork=", "SystemCallFilter=", "CapabilityBoundingSet=", "PrivateUsers=", "ProtectProc=",
    "RestrictNamespaces=", "ProtectKernelLogs=",
])
def test_dropping_a_hardening_line_scores_worse(line, tmp_path):
    intact = exposure(stage(tmp_path / "intact", "daemon-cpu"))
    dropped = exposure(stage(tmp_path / "dropped", "daemon-cpu", edit=without(line)))
    assert dropped > intact


@needs_analyze
def test_unhardened_daemon_fails_the_threshold(tmp_path):
    """The sandbox removed (the unit as it was before issue 16 scored 7.1): the check can fail."""
    def unsandboxed(text: str) -> str:
        keep = ("User=", "Group=", "UMask=", "NoNewPrivileges=", "ProtectSystem=", "ReadWritePaths=",
                "ProtectHome=", "PrivateTmp=", "ProtectKernelTunables=", "ProtectKernelModules=",
                "ProtectControlGroups=", "RestrictSUIDSGID=", "LockPersonality=")
        start = text.index("# Sandboxing")
        end = text.index("[Install]")
        body = [line for line in text[start:end].splitlines() if line.startswith(keep)]
        return text[:start] + "\n".join(body) + "\nRestrictAddressFamilies=AF_UNIX AF_INET AF_INET6\n\n" + text[end:]

    assert exposure(stage(tmp_path, "daemon-cpu", edit=unsandboxed)) > THRESHOLDS["daemon-cpu"]


@needs_analyze
def test_gpu_dropin_is_merged_and_verified(tmp_path):
    cpu = exposure(stage(tmp_path / "cpu", "daemon-cpu"))
    gpu_service = stage(tmp_path / "gpu", "daemon-gpu")
    assert exposure(gpu_service) > cpu  # the drop-in was read: it opens devices
    (gpu_service.parent / "upscaled.service.d" / "zz-typo.conf").write_text("[Service]\nPrivateDevices=maybe\n")
    r = verify(gpu_service)
    assert "zz-typo.conf" in r.stdout + r.stderr  # and verify reads drop-ins too


def settings(path: Path) -> dict[str, list[str]]:
    """Key -> every value assigned to it, in order (the unit plus any drop-ins applied after it)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.mark.parametrize("service", ["upscaled.service", "upscaled-train.service"])
def test_measured_incompatibilities_stay_out(service):
    """Measured under systemd (docs/hardening.md): torch fails to start with either of these."""
    units = [SYSTEMD / service, SYSTEMD / service.replace(".service", "-gpu.conf")]
    for unit in units:
        s = settings(unit)
        assert s.get("MemoryDenyWriteExecute", ["no"])[-1] in ("no", "false", "0", ""), unit
        assert s.get("ProcSubset", ["all"])[-1] in ("all", ""), unit


def test_daemon_unit_keeps_its_behaviour():
    s = settings(SYSTEMD / "upscaled.service")
    for key, value in {"Type": "notify", "NotifyAccess": "main", "WatchdogSec": "120", "TimeoutStopSec": "180",
                       "KillMode": "mixed", "Restart": "on-failure", "User": "upscaled", "Group": "upscaled",
                       "ReadWritePaths": "/srv/upscaled", "ProtectSystem": "strict", "UMask": "0002"}.items():
        assert s[key][-1] == value, key
    assert s["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    t = settings(SYSTEMD / "upscaled-train.service")
    for key, value in {"Type": "oneshot", "SuccessExitStatus": "130", "TimeoutStopSec": "300", "User": "upscaled",
                       "ReadWritePaths": "/srv/upscaled", "Nice": "19", "IOSchedulingClass": "idle"}.items():
        assert t[key][-1] == value, key


def test_web_unit_has_the_network_it_needs_and_keeps_a_training_run_resumable():
    """upscaled-web.service listens (the daemon never does), writes only where the page acts,
    and stops a training run started from the page with SIGTERM, on which it saves its state."""
    s = settings(SYSTEMD / "upscaled-web.service")
    assert "PrivateNetwork" not in s and set(s["RestrictAddressFamilies"][-1].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert s["IPAddressDeny"][-1] == "any" and s["IPAddressAllow"][-1] == "localhost"
    assert s["ReadWritePaths"][-1].split() == ["/srv/upscaled/inbox", "/srv/upscaled/failed", "/srv/upscaled/models",
                                               "-/srv/upscaled/runs"]
    assert s["KillMode"][-1] == "control-group" and s["KillSignal"][-1] == "SIGTERM"
    assert s.get("MemoryDenyWriteExecute", ["no"])[-1] in ("no", "false", "0", "")
    assert s.get("ProcSubset", ["all"])[-1] in ("all", "")
    d = settings(SYSTEMD / "upscaled.service")
    assert d["PrivateNetwork"][-1] == "yes" and d["RestrictAddressFamilies"][-1] == "AF_UNIX"
