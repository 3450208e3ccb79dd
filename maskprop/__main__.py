"""``python -m maskprop`` (and ``torchrun ... -m maskprop train RECIPE``): the ``maskprop`` command."""

import sys

from .cli import main

sys.exit(main())
