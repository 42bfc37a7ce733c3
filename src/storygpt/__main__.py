import sys

from storygpt.cli.main import main

sys.exit(main())
