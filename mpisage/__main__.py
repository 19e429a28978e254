import sys

from mpisage.run import main

sys.exit(main())
