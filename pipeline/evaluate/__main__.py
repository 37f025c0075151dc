import sys

from pipeline.evaluate.cli import main

sys.exit(main())
