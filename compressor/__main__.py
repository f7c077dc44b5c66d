"""``python -m compressor`` and the ``compress`` command: signal handling first, then the heavy imports."""

import sys

from compressor.core.fileio import signals_deferred
from compressor.core.output import interrupt_exit_code, interrupt_on_sigterm


def run() -> None:
    interrupt_on_sigterm()  # from here on SIGTERM unwinds like Ctrl-C
    try:
        with signals_deferred():  # a signal while torch loads waits for the import, then ends the run
            from compressor.cli.main import main
    except KeyboardInterrupt as err:
        sys.stderr.write("interrupted: nothing was written\n")
        sys.exit(interrupt_exit_code(err))
    main()


if __name__ == "__main__":
    run()
