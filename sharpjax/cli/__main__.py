"""``python -m sharpjax.cli``: the ``sharpjax`` command."""

import sys

from sharpjax.cli import main

if __name__ == "__main__":
  sys.exit(main())
