import sys

from editor_reid.cli import main

sys.exit(main())
