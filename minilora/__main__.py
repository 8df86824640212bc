"""`python -m minilora ...` is the same as the `minilora` command."""
import sys

from minilora.apps.cli import main

sys.exit(main())
