"""`python -m authz_service` is the `authz-service` command."""

import sys

from authz_service.cli import main

# Guarded: multiprocessing's spawn re-imports the main module in every worker.
if __name__ == "__main__":
    sys.exit(main())
