"""Executes every notebook here in place of a reader (outputs are not saved).

BAYESNOISE_SMALL=1 (the default of `make notebooks`) runs each in its small mode.
"""

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

here = Path(__file__).resolve().parent
failed = []
for path in sorted(here.glob("*.ipynb")):
    t0 = time.perf_counter()
    book = nbformat.read(path, as_version=4)
    try:
        NotebookClient(
            book, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(here)}}
        ).execute()
        print(f"ran {path.name} in {time.perf_counter() - t0:.0f} s")
    except Exception as e:  # report every notebook, then fail
        failed.append(path.name)
        print(f"FAILED {path.name}: {type(e).__name__}: {str(e)[-500:]}")
sys.exit(1 if failed else 0)
