"""``python -m imgfeat.preprocess --manifest OUT --out PREP ...``: the same as ``imgfeat prep``."""
import sys

from imgfeat.metadata.cli_common import run_command
from imgfeat.preprocess.cli import add_prep_args
from imgfeat.preprocess.cli import run_command as prep_command

if __name__ == "__main__":
    sys.exit(run_command("python -m imgfeat.preprocess", add_prep_args, prep_command))
