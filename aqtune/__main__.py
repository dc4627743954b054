import sys

from aqtune.cli import main

sys.exit(main())
