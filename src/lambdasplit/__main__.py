import sys

from lambdasplit.cli import main

sys.exit(main())
