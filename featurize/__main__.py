"""``python -m imgfeat.featurize --manifest OUT --out FEAT [--config FILE] [flags]``: the entry point torchrun starts."""
import sys

from imgfeat.featurize.stage_cli import main

if __name__ == "__main__":
    sys.exit(main())
