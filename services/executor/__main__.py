"""python -m services.executor"""

from services.executor.mount_namespace import enter_own_mount_namespace

# First, before the imports below: as root the process execs itself again, in a mount namespace of
# its own (the bwrap backend's runtime trees are mounted there, seen by no one else and gone with
# it), and importing everything twice would slow every start.
enter_own_mount_namespace()

from services.executor.service import DEFINITION  # noqa: E402
from services.platform.bootstrap import run  # noqa: E402

run(DEFINITION)
