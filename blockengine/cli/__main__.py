"""``python -m blockengine.cli``: the blockengine multi-call program."""
import sys

from .main import main

sys.exit(main())
