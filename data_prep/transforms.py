"""``data_prep.transforms`` is ``ldm_train.data.transforms`` (the library owns it: the first-stage trainer reads raw images too,
and ``ldm_train`` never imports ``data_prep``). Kept as an alias so both names are the same module object."""
import sys

from ldm_train.data import transforms as _module

sys.modules[__name__] = _module
