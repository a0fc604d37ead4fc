"""``python -m metadata SRC... --out OUT``: the manifest job (same flags as ``imgfeat manifest``)."""
import sys

from metadata.cli_common import run_command
from metadata.manifest_cli import add_manifest_arguments, manifest_command

if __name__ == "__main__":
    sys.exit(run_command("python -m metadata", add_manifest_arguments, manifest_command))
