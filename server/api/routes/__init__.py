"""One APIRouter per resource; each route parses, checks who calls, calls a service."""
