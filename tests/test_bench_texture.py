"""bench/texture.py, the three texture measures for GAN checkpoints, on real small models and images."""

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import natural_image, save_image
from tests.daemon_helpers import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_texture_table_names_each_model_and_counts_crops_against_the_first(tmp_path: Path) -> None:
    val = tmp_path / "val"
    for i in range(2):
        save_image(val / f"v{i}.png", natural_image(64, 80, seed=i))
    tiny = tiny_checkpoint(tmp_path / "tiny.safetensors")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "texture.py"), "--val", str(val), "fidelity", str(tiny)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(2 images) and the 4 test crops" in r.stdout
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()[2:]}
    assert set(rows) == {"fidelity", str(tiny)[-48:]}
    fid = [float(v) for v in rows["fidelity"][:3]]
    assert all(0.05 < v < 2 for v in fid), fid  # ratios to the original's texture
    assert len(rows["fidelity"]) == 3 + 4  # the reference: its four crop details, nothing counted
    assert re.search(r"\([0-4] of 4\)", r.stdout.splitlines()[-1])
