"""Transports: the edges where bytes meet sessions. They may import the core; the core
never imports them."""
