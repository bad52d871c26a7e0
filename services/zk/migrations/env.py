from services.platform.db import run_migrations_online
from services.zk.models import Base

run_migrations_online(Base.metadata)
