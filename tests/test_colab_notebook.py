"""The Colab quickstart runs top to bottom on CPU against the current API (its install cell aside)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_runs_and_offload_matches_resident(tmp_path):
    cells = json.loads((ROOT / "colab" / "sparda_quickstart.ipynb").read_text())["cells"]
    code = ["import matplotlib\nmatplotlib.use('Agg')"]
    for cell in cells:
        if cell["cell_type"] == "code":
            # IPython shell and magic lines (the install cell) are not Python
            code.append("".join(line for line in cell["source"] if not line.lstrip().startswith(("!", "%"))))
    script = tmp_path / "quickstart.py"
    script.write_text("\n".join(code))
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("same tokens as resident sparda: True") == 2, proc.stdout[-2000:]
