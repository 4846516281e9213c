"""Pure protocol code: line framing, JSON-RPC 2.0 messages and the wire codec.

Nothing in this package imports trio or touches a socket (see h11/wsproto): bytes in,
values out. Transports own the I/O and call into here.
"""
