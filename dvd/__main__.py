import sys

from dvd.cli import main

sys.exit(main())
