import sys

from qframe.deploy.engines import main

sys.exit(main())
