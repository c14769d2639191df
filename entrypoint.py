"""Container and command-line entrypoint: ``python entrypoint.py run --manifest job.yaml``."""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] in (["run"], ["launch"]):  # service.cli.JOB_COMMANDS
        # Before any other import: a SIGTERM while the libraries load is kept for the run.
        from service.signals import catch_early_signals

        catch_early_signals()
    from service.cli import main

    sys.exit(main())
