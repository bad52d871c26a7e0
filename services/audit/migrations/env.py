from services.audit.models import Base
from services.platform.db import run_migrations_online

run_migrations_online(Base.metadata)
