"""The control plane's logic, free of FastAPI: routes parse and call these, tests call them too."""
