import sys

from deit_repro.cli import main

sys.exit(main())
