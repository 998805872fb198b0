import sys

from overlock.cli import main

sys.exit(main())
