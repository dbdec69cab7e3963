"""Helper run as its own process on Windows: raise Ctrl+C on a child's console.

Usage: python winctrl.py PID. See windows.py for why this is the graceful stop.
It runs as a script (not imported) so that detaching from a console never
happens in the CLI's own process.
"""

import ctypes
import sys

CTRL_C_EVENT = 0


def main() -> int:
    pid = int(sys.argv[1])
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    kernel32.FreeConsole()
    if not kernel32.AttachConsole(pid):
        return 1
    kernel32.SetConsoleCtrlHandler(None, True)  # this helper ignores the Ctrl+C it raises
    ok = kernel32.GenerateConsoleCtrlEvent(CTRL_C_EVENT, 0)
    kernel32.FreeConsole()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
