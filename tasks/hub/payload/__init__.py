"""Files copied into the installed hub and run there, by its own Python (not imported by hubworks)."""
