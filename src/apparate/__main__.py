import sys

from apparate.cli import main

sys.exit(main())
