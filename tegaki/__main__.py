"""`python -m tegaki`: the same as the `tegaki` command."""

import sys

from tegaki.cli import main

sys.exit(main())
