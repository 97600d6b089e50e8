"""Files copied into the installed hub and run there by the hub venv's Python.

hubworks itself imports only ``tls_service`` (install_hub and the hub's renewal share its
certificate logic); the others are read as text and copied.
"""
