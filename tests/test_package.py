"""The package surface: ``import pytei`` stays light, and its submodules load on first access."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_light_and_submodules_are_lazy() -> None:
    code = (
        "import sys, pytei\n"
        "heavy = [m for m in ('pandas', 'matplotlib', 'scipy', 'pytei.campaign') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(pytei.results.load) and callable(pytei.load_checkpoint)\n"
        "assert issubclass(pytei.campaign.SpecError, pytei.PyteiError)\n"
        "assert 'results' in dir(pytei)\n"
        "try:\n    pytei.nope\nexcept AttributeError as err:\n    assert 'nope' in str(err)\n"
        "else:\n    raise SystemExit('pytei.nope did not raise')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
