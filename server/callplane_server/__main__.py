import sys

from callplane_server.cli import main

sys.exit(main())
