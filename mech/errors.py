"""One exception type for user-facing faults.

The CLI turns a MechError into a one-line message and exit code 2; library callers catch it like any
exception. The message names the fault *and* the fix, e.g.
``unknown model spec 'orgnism': expected organism, smollm2-135m, a local HF directory or a hub id``.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn


class MechError(Exception):
    """A fault in user input (config, model spec, data) with a one-line, actionable message."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


def run_script(main: Callable[[list[str]], int]) -> NoReturn:
    """Exit with ``main(sys.argv[1:])``'s code: the entry of an experiments/ script. A MechError ends it as the CLI
    ends one, in one ``error:`` line on stderr and exit code 2 instead of a traceback."""
    try:
        code = main(sys.argv[1:])
    except MechError as e:
        print(f"error: {e}", file=sys.stderr)
        code = MechError.exit_code
    sys.exit(code)
