"""The conda channel: index, package files, the server, publishing, and which channel builds use."""
