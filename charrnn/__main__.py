"""`python -m charrnn`: the same command line as `charrnn`."""

import sys

from charrnn.cli import main

sys.exit(main())
