import sys

from eastwest.cli import main

sys.exit(main())
