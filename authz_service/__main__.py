"""`python -m authz_service` is the `authz-service` command."""

import sys

from authz_service.cli import main

sys.exit(main())
