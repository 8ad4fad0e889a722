import sys

from kleidi.cli import main

sys.exit(main())
