"""``python -m imgfeat.metadata SRC... --out OUT``: the manifest job (same flags as ``imgfeat manifest``)."""
import sys

from imgfeat.metadata.cli_common import run_command
from imgfeat.metadata.manifest.cli import add_manifest_arguments, manifest_command

if __name__ == "__main__":
    sys.exit(run_command("python -m imgfeat.metadata", add_manifest_arguments, manifest_command))
