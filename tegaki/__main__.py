import sys

from tegaki.cli import main

sys.exit(main())
