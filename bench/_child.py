"""Peak-memory probe, run in a fresh process per (case, implementation, mode) by ``bench._harness``.

    python -m bench._child <bench module> <case json> <implementation> <mode>

Builds only that implementation's inputs, takes the RSS, resets the kernel's high-water mark, runs one call and
prints ``RESULT {"peak_mb": ...}``: the extra peak RSS of the call over the inputs, in MiB. Nothing else in
this process allocates, so the reading is the implementation's alone.
"""

from __future__ import annotations

import importlib
import json
import sys


def main(argv: list[str]) -> int:
    module, case_json, name, mode = argv
    from bench._harness import Case, cpu_extra_peak_mb

    mod = importlib.import_module(module)
    case = Case.from_json(case_json)
    setup = mod.setup(case, only={name})
    if name not in setup.impls:
        why = setup.skipped.get(name, "not built by setup()")
        print("RESULT " + json.dumps({"peak_mb": None, "error": f"{name} unavailable: {why}"}))
        return 0
    mb = cpu_extra_peak_mb(setup, name, mode)
    print("RESULT " + json.dumps({"peak_mb": mb}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
