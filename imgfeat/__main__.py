"""``python -m imgfeat``: the ``imgfeat`` command."""
import sys

from imgfeat.cli import main

sys.exit(main())
