from services.packages.models import Base
from services.platform.db import run_migrations_online

run_migrations_online(Base.metadata)
