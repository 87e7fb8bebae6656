"""LwM2M 1.1 server side: paths, content formats and registration links, as pure data."""
