"""What a ClientApp process imports before it handles a message.

A SuperNode starts one ClientApp process per message; SecAgg+'s set-up, key-sharing and
unmasking messages (three of five per round) never reach our handlers. torch, Opacus and
pandas cost seconds to import, so ``client.app`` must load without them.
"""

from __future__ import annotations

import subprocess
import sys

from simulations.flower_env import PROJECT_ROOT

HEAVY = ("torch", "opacus", "pandas", "scipy")


def test_client_app_loads_without_torch_opacus_or_pandas():
    probe = (f"import sys, client.app; heavy = {HEAVY!r}; "
             "print(sorted(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
