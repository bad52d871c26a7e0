"""python -m services.system"""

from services.platform.bootstrap import run
from services.system.service import DEFINITION

run(DEFINITION)
